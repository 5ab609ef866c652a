"""The scoring engine: tokenizing, length-bucketed batching and jitted, sharded scoring.

Every consumer that scores answer choices or decodes (the evaluator, `infer`, training's accuracy
check, RoE's label-free merge selection) goes through this one path::

  canonical examples -> `encode_examples` (EOS appended, truncated like seqio)
    -> `make_batches` (sorted by length, padded to powers of two)
    -> `Scorer.score` / `Scorer.generate` (each input encoded once, all its choices in one decoder
       pass, data-parallel over the ('data', 'model') mesh) -> `decode_text` for decodes

`ScoringOptions` names the protocol (the paper's: summed target log-probs including EOS, argmax
with ties to the lowest index) and is recorded in every result.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expert_t5x import aggregation
from expert_t5x import experts as experts_lib
from expert_t5x import models
from expert_t5x import network
from expert_t5x import partitioning
from expert_t5x import validation

if TYPE_CHECKING:
  from expert_t5x.eval_experts import Chunk
  from expert_t5x.eval_tasks import Vocabulary

PyTree = Any
GOLD_POLICIES = ("exclude", "count_wrong")
MIN_BUCKET = 8


# ------------------------------------------------------------------------------------ options


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
  """The named scoring protocol, recorded in every shard and result.

  Attributes:
    scoring: 'sum' (the paper), 'mean' (per target token) or 'per_char' (lm-eval acc_norm).
    logit_vocab_limit: normalise log-probs over the first N logits (the paper's code: 32100).
    gold_not_in_choices: 'exclude' (counted, reported, left out of accuracy) or 'count_wrong'
      (counted as an error, as string matching in the paper's code did).
  """
  scoring: str = "sum"
  logit_vocab_limit: Optional[int] = None
  gold_not_in_choices: str = "exclude"

  def __post_init__(self):
    aggregation.check_scoring(self.scoring)
    if self.gold_not_in_choices not in GOLD_POLICIES:
      raise validation.UsageError(f"gold_not_in_choices must be one of {GOLD_POLICIES}; got "
                       f"{self.gold_not_in_choices!r}.")
    if self.logit_vocab_limit is not None:
      validation.positive_int(validation.label(self, "logit_vocab_limit"), self.logit_vocab_limit)
      if self.logit_vocab_limit < 2:
        raise validation.UsageError(f"logit_vocab_limit must be None or >= 2; got "
                                    f"{self.logit_vocab_limit}.")

  def to_json(self) -> dict[str, Any]:
    return {"scoring": self.scoring, "logit_vocab_limit": self.logit_vocab_limit,
            "gold_not_in_choices": self.gold_not_in_choices, "include_eos": True,
            "tie_break": "lowest_index"}


# ---------------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass
class Encoded:
  """One tokenized example: `inputs [Li]`, `choices` (K arrays) or `targets` for generation."""
  index: int
  inputs: np.ndarray
  choices: list[np.ndarray]
  targets: Optional[np.ndarray] = None


def _with_eos(ids: Sequence[int], eos_id: int,
              max_length: Optional[int]) -> tuple[np.ndarray, bool]:
  """Tokens + EOS, truncated to `max_length` (EOS kept last, like seqio's append_eos_after_trim)."""
  ids = list(ids)
  truncated = max_length is not None and len(ids) + 1 > max_length
  if truncated:
    ids = ids[:max_length - 1]
  return np.asarray(ids + [eos_id], np.int32), truncated


def encode_examples(examples: Sequence[Mapping[str, Any]], vocabulary: Vocabulary,
                    feature_lengths: Mapping[str, Optional[int]], scoring: bool
                    ) -> tuple[list[Encoded], dict[str, int]]:
  """Tokenizes inputs and every answer choice once; returns the encodings and truncation counts."""
  eos = int(vocabulary.eos_id)
  cache: dict[str, tuple[np.ndarray, bool]] = {}
  counts = {"inputs_truncated": 0, "targets_truncated": 0}

  def target(text: str) -> np.ndarray:
    if text not in cache:  # Choice sets repeat across examples ("yes"/"no"...).
      cache[text] = _with_eos(vocabulary.encode(text), eos, feature_lengths.get("targets"))
    ids, truncated = cache[text]
    counts["targets_truncated"] += int(truncated)
    return ids

  out = []
  for i, ex in enumerate(examples):
    inputs, truncated = _with_eos(vocabulary.encode(ex["inputs"]), eos,
                                  feature_lengths.get("inputs"))
    counts["inputs_truncated"] += int(truncated)
    if scoring:
      out.append(Encoded(i, inputs, [target(c) for c in ex["answer_choices"]]))
    else:
      out.append(Encoded(i, inputs, [], target(ex["targets"])))
  return out, counts


def bucket(length: int, minimum: int = MIN_BUCKET) -> int:
  """Padded length: the next power of two (bounds the number of compiled shapes)."""
  return max(minimum, 1 << max(0, int(length) - 1).bit_length())


@dataclasses.dataclass
class Batch:
  """A padded batch: `rows` example positions (-1 = padding), `inputs [B, Li]`,
  `choices [B, K, Lt]` (all-zero rows = absent choices)."""
  rows: np.ndarray
  inputs: np.ndarray
  choices: Optional[np.ndarray]


def make_batches(encoded: Sequence[Encoded], batch_size: int, scoring: bool = True) -> list[Batch]:
  """Length-bucketed batches of exactly `batch_size` rows (the last one padded).

  Examples are sorted by (input length, longest choice), so each batch pads little; lengths are
  padded to powers of two and the number of choices to the batch's maximum.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  todo = [e for e in encoded if e.choices or not scoring]

  def key(e: Encoded):
    longest = max((len(c) for c in e.choices), default=0)
    return (len(e.inputs), longest, len(e.choices), e.index)

  todo.sort(key=key)
  batches = []
  for start in range(0, len(todo), batch_size):
    members = todo[start:start + batch_size]
    li = bucket(max(len(e.inputs) for e in members))
    inputs = np.zeros((batch_size, li), np.int32)
    inputs[:, 0] = 1  # Padding rows hold a lone EOS so every encoder row attends to something.
    rows = np.full((batch_size,), -1, np.int64)
    choices = None
    if scoring:
      k = max(len(e.choices) for e in members)
      lt = bucket(max(len(c) for e in members for c in e.choices))
      choices = np.zeros((batch_size, k, lt), np.int32)
    for r, e in enumerate(members):
      rows[r] = e.index
      inputs[r, :] = 0
      inputs[r, :len(e.inputs)] = e.inputs
      if scoring:
        for j, c in enumerate(e.choices):
          choices[r, j, :len(c)] = c
    batches.append(Batch(rows, inputs, choices))
  return batches



# ------------------------------------------------------------------------------------- scorer


class Scorer:
  """Jitted, sharded scoring and decoding of batches under the base and expert chunks.

  Compiled functions are kept per scorer, one per (kind, expert config, stacked): chunks of the
  same kind reuse them (jit retraces only for new shapes). Reuse a scorer (`evaluate(scorer=...)`)
  to share them across evaluations of one base.

  Args:
    t5_config: the network config.
    params: base parameters (placed on the mesh once, sharded by their logical axes).
    partitioner: mesh and rules; batches are split along 'data'.
    options: the scoring protocol.
    base_dtype: the dtype the frozen base is applied in (`models.EncoderDecoderModel.base_dtype`).
  """

  def __init__(self, t5_config: network.T5Config, params: PyTree,
               partitioner: partitioning.PjitPartitioner, options: ScoringOptions,
               base_dtype: str = "float32"):
    self.t5_config = t5_config
    self.partitioner = partitioner
    self.options = options
    self.base_dtype = base_dtype
    model = models.EncoderDecoderModel(network.Transformer(t5_config))
    abstract = jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (1, MIN_BUCKET),
                                "decoder_input_tokens": (1, MIN_BUCKET)}))
    self.flat_axes = partitioning.params_logical_axes(abstract)
    self.param_sharding = partitioner.sharding_for(
        partitioning.logical_axes_tree(params, self.flat_axes))
    self.params = jax.device_put(params, self.param_sharding)
    self._compiled_fns: dict[Any, Callable] = {}
    self._chunk: Optional[Chunk] = None
    self.set_expert(None, None)

  # -- experts

  def set_chunk(self, chunk: Chunk) -> None:
    """Loads a chunk's experts onto the mesh (full experts are folded into the base once)."""
    if self._chunk is chunk:
      return
    tree, stacked = chunk.load()
    self.set_expert(tree, chunk.config, num_experts=len(chunk.specs) if stacked else 1)
    self._chunk = chunk

  def set_expert(self, tree: Optional[PyTree], config: Optional[experts_lib.ExpertConfig],
                 num_experts: int = 1) -> None:
    """Scores under an expert tree in memory (None: the base alone); `num_experts` > 1 when the
    tree is stacked. A full expert's delta is folded into the base once."""
    self._chunk, self._expert, self._expert_sharding = None, None, None
    self._params_for_chunk = self.params
    self._stacked = num_experts > 1
    self._num_experts = num_experts
    self._config = config
    if tree is None:
      return
    if isinstance(self._config, experts_lib.FullConfig):
      fold = jax.jit(lambda p, e: experts_lib.effective_params(p, e, config),
                     out_shardings=self.param_sharding)
      with jax.set_mesh(self.partitioner.mesh):
        self._params_for_chunk = fold(self.params, tree)
      self._config = None  # Folded: the network runs as the base.
      return
    specs = jax.tree.map(lambda a: jax.sharding.PartitionSpec(*a),
                         experts_lib.logical_axes(tree, self.flat_axes, stacked=self._stacked),
                         is_leaf=lambda x: isinstance(x, tuple))
    sharding = self.partitioner.sharding_for(specs)
    self._expert = jax.device_put(jax.tree.map(jnp.asarray, tree), sharding)
    self._expert_sharding = sharding

  def _model(self) -> models.EncoderDecoderModel:
    return models.EncoderDecoderModel(network.Transformer(self.t5_config),
                                      decode_fn="temperature_sample", expert_config=self._config,
                                      base_dtype=self.base_dtype)

  def _compiled(self, kind: str) -> Callable:
    # Experts that differ only in their init seed share one compiled function.
    config_key = None if self._config is None else json.dumps(
        {k: v for k, v in experts_lib.config_to_json(self._config).items() if k != "init_seed"},
        sort_keys=True)
    key = (kind, config_key, self._stacked)
    if key in self._compiled_fns:
      return self._compiled_fns[key]
    model, options = self._model(), self.options
    normalize = "mean" if options.scoring == "mean" else "sum"
    data = self.partitioner.data_sharding
    expert_sharding = self._expert_sharding
    if kind == "score":
      def fn(params, expert, inputs, choices, expert_index):
        return model.score_choices(params, inputs, choices, expert=expert,
                                   expert_index=expert_index, normalize=normalize,
                                   logit_vocab_limit=options.logit_vocab_limit)
    else:
      def fn(params, expert, inputs, decoder_inputs, expert_index):
        batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs}
        if expert_index is not None:
          batch["expert_index"] = expert_index
        return model.predict_batch(params, batch, None, expert=expert,
                                   decoder_params={"temperature": 0.0})
    in_sh = (self.param_sharding, expert_sharding, data, data, data if self._stacked else None)
    self._compiled_fns[key] = self.partitioner.partition(fn, in_sh, data)
    return self._compiled_fns[key]

  def _rows(self, array: np.ndarray) -> tuple[jax.Array, Optional[jax.Array], int]:
    """Repeats each example once per stacked expert; returns (rows, expert_index, experts)."""
    if not self._stacked:
      return array, None, 1
    num = self._num_experts
    rows = np.repeat(array, num, axis=0)  # [B * E, ...], example-major
    index = np.tile(np.arange(num, dtype=np.int32), array.shape[0])
    return rows, index, num

  def _put(self, x: Optional[np.ndarray]) -> Optional[jax.Array]:
    if x is None:
      return None
    return jax.device_put(x, self.partitioner.data_sharding)

  def score(self, batch: Batch) -> np.ndarray:
    """`[B, E, K]` float32 choice scores (E = experts in the chunk, 1 for the base)."""
    inputs, index, num = self._rows(batch.inputs)
    choices, _, _ = self._rows(batch.choices)
    out = self._compiled("score")(self._params_for_chunk, self._expert, self._put(inputs),
                                  self._put(choices), self._put(index))
    return np.asarray(out).reshape(batch.inputs.shape[0], num, -1)

  def generate(self, batch: Batch, max_length: int) -> np.ndarray:
    """`[B, E, max_length]` greedy decodes."""
    inputs, index, num = self._rows(batch.inputs)
    decoder_inputs = np.zeros((inputs.shape[0], max_length), np.int32)
    out = self._compiled("generate")(self._params_for_chunk, self._expert, self._put(inputs),
                                     self._put(decoder_inputs), self._put(index))
    return np.asarray(out).reshape(batch.inputs.shape[0], num, max_length)

  # -- whole example sets

  def score_encoded(self, encoded: Sequence[Encoded], batch_size: int,
                    progress: Any = None) -> dict[int, np.ndarray]:
    """{example index: `[E, K]` choice scores} of every encoded example that has choices."""
    scores: dict[int, np.ndarray] = {}
    for batch in make_batches(encoded, batch_size, scoring=True):
      out = self.score(batch)  # [B, E, K]
      for r, row in enumerate(batch.rows):
        if row >= 0:
          scores[int(row)] = out[r]
      if progress is not None:
        progress.update(int((batch.rows >= 0).sum()) * self._num_experts)
    return scores

  def generate_encoded(self, encoded: Sequence[Encoded], vocabulary: Vocabulary, batch_size: int,
                       max_length: int, progress: Any = None) -> dict[int, list[str]]:
    """{example index: one greedy decode per expert (text)} of every encoded example."""
    texts: dict[int, list[str]] = {}
    for batch in make_batches(encoded, batch_size, scoring=False):
      out = self.generate(batch, max_length)  # [B, E, L]
      for r, row in enumerate(batch.rows):
        if row >= 0:
          texts[int(row)] = [decode_text(vocabulary, out[r, e]) for e in range(out.shape[1])]
      if progress is not None:
        progress.update(int((batch.rows >= 0).sum()) * self._num_experts)
    return texts


def decode_text(vocabulary: Vocabulary, ids: np.ndarray) -> str:
  """A decode's text: the tokens before the first EOS, padding dropped, whitespace stripped."""
  ids = [int(t) for t in ids]
  eos = int(vocabulary.eos_id)
  if eos in ids:
    ids = ids[:ids.index(eos)]
  return vocabulary.decode([t for t in ids if t > 0]).strip()


def choice_scores(row: np.ndarray, choices: Sequence[str], options: ScoringOptions) -> np.ndarray:
  """One example's float64 scores of its `choices` (per-character normalised for 'per_char')."""
  row = np.asarray(row[:len(choices)], np.float64)
  if options.scoring == "per_char":
    row = aggregation.per_char_scores(row, choices)
  return row
