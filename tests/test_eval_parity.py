"""Evaluator choice scores against transformers' PyTorch T5 on the same random weights (an HF
checkpoint loaded by the evaluator's own base loader)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from expert_t5x import base_models
from expert_t5x import evaluation  # pylint: disable=g-import-not-at-top,wrong-import-position
from expert_t5x import results  # pylint: disable=g-import-not-at-top,wrong-import-position

import eval_fakes  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.parity


def _hf_checkpoint(path):
  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=eval_fakes.VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
      num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(cfg)
  with torch.no_grad():
    model.lm_head.weight = torch.nn.Parameter(torch.randn(eval_fakes.VOCAB_SIZE, 32))
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(path)
  return model.eval()


def test_choice_scores_equal_pytorch_t5(tmp_path):
  hf = _hf_checkpoint(str(tmp_path / "hf"))
  base = base_models.load_base(checkpoint_path=str(tmp_path / "hf"))
  source = eval_fakes.make_source(n=6)
  evaluation.evaluate(tasks="nli_p1,qa_q1", output_dir=str(tmp_path / "out"), base=base,
                      batch_size=8, progress=False, task_source=source, bootstrap_samples=0)
  preds = results.read_jsonl(str(tmp_path / "out" / results.PREDICTIONS_FILE))
  vocab = source.vocabulary("nli_p1")
  examples = (source.examples("nli_p1", "validation", None)
              + source.examples("qa_q1", "validation", None))
  for rec, ex in zip(preds, examples):
    enc = torch.tensor([vocab.encode(ex["inputs"]) + [1]])
    want = []
    for choice in ex["answer_choices"]:
      labels = torch.tensor([vocab.encode(choice) + [1]])
      with torch.no_grad():
        logits = hf(input_ids=enc, labels=labels).logits.double()
      logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
      want.append(float(logp.sum()))  # Summed over every target token, EOS included.
    np.testing.assert_allclose(rec["choice_scores"], want, rtol=1e-5, atol=1e-4)
