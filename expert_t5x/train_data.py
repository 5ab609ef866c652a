"""Training data: a seqio task or mixture -> tokenized, feature-converted, deterministic batches.

Built only on seqio's public API (`get_mixture_or_task(name).get_dataset(...)` and
`seqio.EncDecFeatureConverter(pack=...)`), so any registered task works. For a Task the pipeline is

    task.get_dataset(lengths, split, shuffle=False, shard_info=this host's shard)
      -> optional subsample (at most `max_examples`, see below) -> cache
      -> shuffle(seed, reshuffled every epoch) -> repeat -> feature converter -> batch(per host)

with `tf.data.Options().deterministic = True`, so the batch sequence is a pure function of
(task, seed, shard). Mixtures are sampled by seqio itself (shuffle with the seed, endless repeat).
Every example carries `example_key` (`[1]` int64): a 62-bit hash of (dataset, subset, prompt,
example_id), or of the input text when the task has no example ids; the retrieval keys exported
with an expert are drawn from the keys the expert trained on.

Subsampling ("at most N examples") is a seeded selection keyed by (dataset, subset, example_id):
an example is kept when its hash is among the N smallest of the split. The prompt is not part of
the hash, so every prompt of a dataset keeps the same underlying examples, and all prompts of a
dataset keep the same ids under an `_all_prompts` task. This is deterministic and streaming but is
*not* the paper's exact subset (a torch.randperm with seed 42).

TensorFlow and seqio are imported here only (model code stays TF-free).
"""

from __future__ import annotations

import dataclasses
import difflib
import heapq
import logging
import math
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from expert_t5x import validation

EXAMPLE_KEY = "example_key"
_HASH_BUCKETS = 2**62
_SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass
class DatasetConfig:
  """T5X's `utils.DatasetConfig` fields plus the paper's data settings.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: e.g. `{'inputs': 256, 'targets': 128}`.
    split: dataset split.
    batch_size: global batch size (per expert when experts are stacked).
    shuffle: shuffle examples (reshuffled every epoch).
    seed: data order seed.
    use_cached: read seqio's cache (off by default: no cache is assumed to exist).
    pack: pack examples (the paper does not).
    num_epochs: passes over the data; with `TRAIN_STEPS = None` the step budget is
      `num_epochs * ceil(n / batch_size)`.
    max_examples: keep at most this many examples of a Task (seeded, example-id keyed).
    subsample_seed: seed of that selection.
    shuffle_buffer_size: tf.data shuffle buffer.
  """
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 8
  shuffle: bool = True
  seed: Optional[int] = 0
  use_cached: bool = False
  pack: bool = False
  num_epochs: Optional[int] = None
  max_examples: Optional[int] = None
  subsample_seed: int = 42
  shuffle_buffer_size: int = _SHUFFLE_BUFFER

  def check(self) -> None:
    """Settings out of range, named by their gin macros (`train` calls it before writing; not on
    construction, so a config can be built, then replaced field by field)."""
    validation.positive_int("BATCH_SIZE", self.batch_size, "set --gin.BATCH_SIZE=N")
    validation.optional_positive_int("NUM_EPOCHS", self.num_epochs or None)
    validation.optional_positive_int("MAX_EXAMPLES", self.max_examples)
    for key, length in dict(self.task_feature_lengths or {}).items():
      validation.positive_int(f"TASK_FEATURE_LENGTHS[{key!r}]", length)


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # Keep TensorFlow off accelerators: JAX owns them (T5X does the same).
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  return tf


def get_task(name: str) -> Any:
  """`seqio.get_mixture_or_task(name)`, with one clear error naming close matches."""
  import seqio  # pylint: disable=g-import-not-at-top
  try:
    import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    pass
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown task or mixture MIXTURE_OR_TASK_NAME={name!r}; import the module "
                     f"that registers it in your gin file.{hint}") from None


def is_mixture(task: Any) -> bool:
  """Whether a registry entry is a seqio.Mixture (a mixture of tasks)."""
  import seqio  # pylint: disable=g-import-not-at-top
  return isinstance(task, seqio.Mixture)


def _string_feature(ex: Mapping[str, Any], name: str):
  tf = _tf()
  value = ex.get(name)
  if value is None:
    return tf.constant("")
  if value.dtype != tf.string:
    value = tf.strings.as_string(value)
  return value


def _hash(parts) -> Any:
  tf = _tf()
  return tf.strings.to_hash_bucket_fast(tf.strings.join(parts, separator="|"), _HASH_BUCKETS)


def _identity_parts(ex: Mapping[str, Any], with_prompt: bool) -> list[Any]:
  """String parts identifying an example: (dataset, subset, [prompt], example_id) or its text."""
  if "example_id" in ex:
    parts = [_string_feature(ex, "dataset"), _string_feature(ex, "subset")]
    if with_prompt:
      parts.append(_string_feature(ex, "prompt"))
    return parts + [_string_feature(ex, "example_id")]
  text = "inputs_pretokenized" if "inputs_pretokenized" in ex else "inputs"
  value = ex[text]
  if value.dtype != _tf().string:
    value = _tf().strings.reduce_join(_tf().strings.as_string(value), separator=" ")
  return [value]


def selection_hash(ex: Mapping[str, Any], seed: int) -> Any:
  """The subsampling hash: (seed, dataset, subset, example_id); no prompt."""
  return _hash([_tf().constant(str(seed))] + _identity_parts(ex, with_prompt=False))


def add_example_key(ex: Mapping[str, Any]) -> dict[str, Any]:
  """Adds `example_key` (`[1]` int64): the hash of (dataset, subset, prompt, example_id)."""
  out = dict(ex)
  out[EXAMPLE_KEY] = _tf().reshape(_hash(_identity_parts(ex, with_prompt=True)), [1])
  return out


def _task_dataset(cfg: DatasetConfig, shard: Optional[tuple[int, int]] = None,
                  sequence_length: Optional[Mapping[str, int]] = None) -> Any:
  """The task's tokenized examples in source order (one pass, this shard)."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = get_task(cfg.mixture_or_task_name)
  shard_info = seqio.ShardInfo(index=shard[0], num_shards=shard[1]) if shard else None
  return task.get_dataset(sequence_length=sequence_length, split=cfg.split, shuffle=False,
                          shard_info=shard_info, num_epochs=1, use_cached=cfg.use_cached)


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What one pass over a Task found: examples kept (n) and the subsampling threshold."""
  num_examples: int
  num_source_examples: int
  threshold: Optional[int]


def scan_task(cfg: DatasetConfig) -> DataInfo:
  """One pass over the split: counts examples and, with `max_examples`, finds the hash threshold
  that keeps at most that many (all rows of a selected example id are kept together)."""
  task = get_task(cfg.mixture_or_task_name)
  if is_mixture(task):
    raise ValueError(f"{cfg.mixture_or_task_name!r} is a mixture: epochs and max_examples need a "
                     "Task; set TRAIN_STEPS explicitly for mixtures.")
  tf = _tf()
  ds = _task_dataset(cfg).map(lambda ex: selection_hash(ex, cfg.subsample_seed))
  hashes = np.fromiter(ds.batch(4096).unbatch().as_numpy_iterator(), dtype=np.int64)
  del tf
  total = len(hashes)
  if total == 0:
    raise ValueError(f"Task {cfg.mixture_or_task_name!r} has no examples in split {cfg.split!r}.")
  if cfg.max_examples is None or total <= cfg.max_examples:
    return DataInfo(total, total, None)
  values, counts = np.unique(hashes, return_counts=True)  # sorted by hash
  kept = np.cumsum(counts)
  last = int(np.searchsorted(kept, cfg.max_examples, side="right")) - 1
  if last < 0:
    raise ValueError(f"max_examples={cfg.max_examples} is smaller than the rows of one example "
                     f"of {cfg.mixture_or_task_name!r}; raise it.")
  return DataInfo(int(kept[last]), total, int(values[last]))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return math.ceil(num_examples / batch_size)


def get_dataset(cfg: DatasetConfig, shard_id: int = 0, num_shards: int = 1,
                info: Optional[DataInfo] = None) -> Any:
  """Per-host batches (`batch_size // num_shards` rows) as an endless deterministic tf.data.Dataset.

  Features: T5X's encoder-decoder model features (int32) plus `example_key` `[B, 1]` int64.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  tf = _tf()
  if cfg.batch_size % num_shards:
    raise ValueError(f"BATCH_SIZE={cfg.batch_size} is not divisible by the {num_shards} data "
                     "shards (hosts); choose a multiple.")
  lengths = dict(cfg.task_feature_lengths)
  task = get_task(cfg.mixture_or_task_name)
  if is_mixture(task):
    shard_info = seqio.ShardInfo(index=shard_id, num_shards=num_shards)
    ds = task.get_dataset(sequence_length=lengths, split=cfg.split, shuffle=cfg.shuffle,
                          seed=cfg.seed, shard_info=shard_info, num_epochs=None,
                          use_cached=cfg.use_cached)
  else:
    ds = _task_dataset(cfg, (shard_id, num_shards), lengths)
    if info is not None and info.threshold is not None:
      threshold = info.threshold
      ds = ds.filter(lambda ex: selection_hash(ex, cfg.subsample_seed) <= threshold)
    ds = ds.cache()
    if cfg.shuffle:
      ds = ds.shuffle(cfg.shuffle_buffer_size, seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
  ds = ds.map(add_example_key)
  converter = seqio.EncDecFeatureConverter(
      pack=cfg.pack, passthrough_features={
          EXAMPLE_KEY: seqio.FeatureConverter.FeatureSpec(dtype=tf.int64, rank=1)})
  ds = converter(ds, {**lengths, EXAMPLE_KEY: 1})
  ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def batch_iterator(cfg: DatasetConfig, shard_id: int = 0, num_shards: int = 1,
                   info: Optional[DataInfo] = None, skip_batches: int = 0
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches, skipping the first `skip_batches` (to resume at a data position)."""
  ds = get_dataset(cfg, shard_id, num_shards, info)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds.prefetch(2).as_numpy_iterator()


# ------------------------------------------------------------------------ retrieval keys


def key_rank(example_key: int, seed: int) -> int:
  """Seeded order for choosing retrieval keys among seen examples."""
  import hashlib  # pylint: disable=g-import-not-at-top
  return int.from_bytes(hashlib.sha256(f"{seed}|{example_key}".encode()).digest()[:8], "little")


def choose_keys(seen: Sequence[int], num_keys: int, seed: int) -> list[int]:
  """The `num_keys` distinct seen example keys with the smallest seeded rank."""
  unique = sorted(set(int(k) for k in seen), key=lambda k: key_rank(k, seed))
  return unique[:num_keys]


class KeyRecorder:
  """`choose_keys` over a stream: the `num_keys` distinct keys of smallest rank seen so far.

  Holds only those keys (a max-heap on rank and their set), so a training run records its retrieval
  keys as it goes; a key pushed out never returns, since the rank it must beat only falls.
  """

  def __init__(self, num_keys: int, seed: int, keys: Iterable[int] = ()):
    self.num_keys, self.seed = num_keys, seed
    self._heap: list[tuple[int, int]] = []  # (-rank, key): the largest kept rank on top
    self._kept: set[int] = set()
    self.add(keys)

  def add(self, keys: Iterable[int]) -> None:
    for key in map(int, keys):
      if key in self._kept or self.num_keys <= 0:
        continue
      entry = (-key_rank(key, self.seed), key)
      if len(self._heap) < self.num_keys:
        heapq.heappush(self._heap, entry)
      elif entry[0] > self._heap[0][0]:
        self._kept.discard(heapq.heapreplace(self._heap, entry)[1])
      else:
        continue
      self._kept.add(key)

  def keys(self) -> list[int]:
    """The kept keys in `choose_keys`' order (smallest rank first)."""
    return [key for _, key in sorted(self._heap, reverse=True)]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def lookup_examples(cfg: DatasetConfig, example_keys: Sequence[int], task_name: str
                    ) -> list[dict[str, Any]]:
  """Retrieval-key records (Expert format's `keys.jsonl` fields) for these example keys.

  One pass over the task's examples in source order; for a mixture, over each of its tasks.
  """
  wanted = set(int(k) for k in example_keys)
  task = get_task(cfg.mixture_or_task_name)
  names = [t.name for t in task.tasks] if is_mixture(task) else [cfg.mixture_or_task_name]
  found: dict[int, dict[str, Any]] = {}
  for name in names:
    sub = dataclasses.replace(cfg, mixture_or_task_name=name)
    ds = _task_dataset(sub).map(add_example_key)
    for ex in ds.as_numpy_iterator():
      key = int(ex[EXAMPLE_KEY][0])
      if key in wanted and key not in found:
        found[key] = _key_record(ex, name)
        if len(found) == len(wanted):
          break
    if len(found) == len(wanted):
      break
  missing = len(wanted) - len(found)
  if missing:
    logging.warning("%d of %d retrieval keys were not found again in %s.", missing, len(wanted),
                    task_name)
  return [found[k] for k in example_keys if k in found]


def _key_record(ex: Mapping[str, Any], task_name: str) -> dict[str, Any]:
  def get(name):
    return _text(ex[name]) if name in ex else None
  inputs = get("inputs_pretokenized")
  targets = get("targets_pretokenized")
  choices = [_text(c) for c in ex["answer_choices"]] if "answer_choices" in ex else []
  return {
      "inputs": inputs, "targets": targets, "answer_choices": choices,
      "example_id": int(ex["example_id"]) if "example_id" in ex else None,
      "task": task_name, "dataset": get("dataset"), "subset": get("subset"),
      "prompt": get("prompt"),
  }
