"""BERTScore precision on a local transformers model directory (the paper's continual metric).

ELM scores covid_qa, eli5, empathetic dialogues, e-SNLI and twitter with `load_metric('bertscore',
model_type='microsoft/deberta-large-mnli')` and reports the mean **precision**. This is the same
computation as the `bert-score` package's defaults (Zhang et al. 2020), with no idf and no baseline
rescaling: each sentence is encoded with its special tokens (truncated at the tokenizer's maximum
length); the token embeddings are the hidden states after layer `num_layers` (bert-score's choice
for deberta-large-mnli is 18), scaled to unit length; a candidate token's score is its best cosine
similarity with any reference token (special tokens included); the candidate's precision is the
mean over its tokens other than [CLS] and [SEP]. Each pair is encoded unpadded, so batching never
changes a score.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import numpy as np

# bert-score's default layer for the paper's model (bert_score.utils.model2layers).
DEBERTA_LARGE_MNLI_LAYERS = 18


@functools.lru_cache(maxsize=2)
def _load(model_dir: str) -> tuple[Any, Any]:
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    raise FileNotFoundError(
        f"BERTScore model directory {model_dir!r} has no config.json; save the model there with "
        "transformers' save_pretrained (the paper used microsoft/deberta-large-mnli).")
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("BERTScore needs torch and transformers: pip install 'expert_t5x[parity]'."
                      ) from e
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModel.from_pretrained(model_dir)
  model.eval()
  if hasattr(model, "encoder") and hasattr(model, "decoder"):
    model = model.encoder  # As bert-score does for encoder-decoder models.
  return tokenizer, model


def _encode(tokenizer: Any, text: str) -> list[int]:
  """Token ids with special tokens, as bert-score's `sent_encode`."""
  import transformers  # pylint: disable=g-import-not-at-top
  text = text.strip()
  if not text:  # bert-score: build_inputs_with_special_tokens([]), which is this.
    return tokenizer.encode("", add_special_tokens=True)
  kwargs = {}
  if isinstance(tokenizer, (transformers.GPT2Tokenizer, transformers.RobertaTokenizer)):
    kwargs["add_prefix_space"] = True
  return tokenizer.encode(text, add_special_tokens=True, max_length=tokenizer.model_max_length,
                          truncation=True, **kwargs)


def _embed(tokenizer: Any, model: Any, text: str, num_layers: int) -> tuple[np.ndarray, list[int]]:
  import torch  # pylint: disable=g-import-not-at-top
  ids = _encode(tokenizer, text)
  with torch.no_grad():
    out = model(input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                output_hidden_states=True)
  hidden = out.hidden_states[num_layers][0].double().numpy()
  return hidden / np.linalg.norm(hidden, axis=-1, keepdims=True), ids


def precision_scores(targets: Sequence[str], predictions: Sequence[str], model_dir: str,
                     num_layers: int = DEBERTA_LARGE_MNLI_LAYERS) -> list[float]:
  """BERTScore precision (a fraction) of each prediction against its target."""
  if len(targets) != len(predictions):
    raise ValueError(f"BERTScore: {len(targets)} targets but {len(predictions)} predictions.")
  tokenizer, model = _load(os.path.abspath(model_dir))
  depth = model.config.num_hidden_layers
  if not 0 <= num_layers <= depth:
    raise ValueError(f"BERTScore: num_layers {num_layers} is outside the {depth} layers of "
                     f"{model_dir!r}; pass a layer between 0 and {depth}.")
  skip = {tokenizer.cls_token_id, tokenizer.sep_token_id} - {None}
  out = []
  for target, prediction in zip(targets, predictions):
    ref, _ = _embed(tokenizer, model, target, num_layers)
    hyp, ids = _embed(tokenizer, model, prediction, num_layers)
    best = (hyp @ ref.T).max(axis=1)
    keep = np.array([i not in skip for i in ids])
    out.append(float(best[keep].mean()) if keep.any() else 0.0)
  return out


def bertscore_precision(targets: Sequence[str], predictions: Sequence[str], model_dir: str,
                        num_layers: int = DEBERTA_LARGE_MNLI_LAYERS) -> dict[str, float]:
  """Mean BERTScore precision in percent (ELM reports the mean precision as a fraction)."""
  scores = precision_scores(targets, predictions, model_dir, num_layers)
  return {"bertscore_precision": 100.0 * float(np.mean(scores)) if scores else float("nan")}
