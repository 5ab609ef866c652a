"""`CanonicalSource`: a seqio DataSource of canonical examples, TFRecords first, Python second.

At `get_dataset` time the source looks for a P3-layout directory named after the task (or one of
its alternative names) under the P3_DIR roots: bigscience's P3 or our own `tasks render`
output. When one holds the split, examples are read from TFRecords with no Python inside tf.data.
Otherwise the source renders on the fly through `tf.data.Dataset.from_generator` over a Python
example function (fine for small runs; not checkpointable).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import seqio

from seqio_tasks import examples as examples_lib
from seqio_tasks.sources import p3

PythonFn = Callable[[str], Iterator[dict[str, Any]]]


class CanonicalSource(seqio.DataSource):
  """Canonical examples of one task from TFRecords when present, else from a Python function."""

  def __init__(self, *, name: str, splits: Sequence[str], python_fn: PythonFn, dataset: str,
               subset: Optional[str], prompt: str, dir_names: Optional[Sequence[str]] = None,
               tf_fn: Optional[Callable[..., Any]] = None,
               split_aliases: Optional[Mapping[str, str]] = None):
    super().__init__(splits=splits, num_input_examples=None, caching_permitted=True)
    self.name = name
    self._python_fn = python_fn
    self._tf_fn = tf_fn
    self._dir_names = tuple(dir_names or (name,))
    self._meta = dict(dataset=dataset, subset=subset, prompt=prompt)
    # A split a P3 directory may hold under another name (e.g. seen-task `validation` = `test`).
    self._aliases = dict(split_aliases or {})

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def _locate(self, split: str) -> tuple[Optional[str], str]:
    """(P3-layout directory, its split name) this source reads `split` from; (None, split) if
    none."""
    for name in (split, self._aliases.get(split)):
      for dir_name in self._dir_names if name else ():
        found = p3.find_task_dir(dir_name)
        if found and name in p3.available_splits(found):
          return found, name
    return None, split

  def tfrecord_dir(self, split: str) -> Optional[str]:
    """The P3-layout directory this source reads `split` from, if any."""
    return self._locate(split)[0]

  def num_input_examples(self, split: str) -> Optional[int]:
    found, name = self._locate(split)
    return p3.num_examples(found, name) if found else None

  def iter_examples(self, split: str) -> Iterator[dict[str, Any]]:
    """Canonical examples in Python (the evaluator's path)."""
    found, name = self._locate(split)
    if found:
      yield from p3.iter_canonical(found, name, **self._meta)
    else:
      yield from self._python_fn(split)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: Optional[int] = 1):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del shuffle, seed, sequence_length, use_cached, num_epochs  # The Task shuffles.
    if split not in self.splits:
      raise ValueError(f"task {self.name!r} has no split {split!r}; it has {list(self.splits)}.")
    found, name = self._locate(split)
    if found and not p3.is_score_rows(found, name):
      return p3.canonical_dataset(found, name, shard_info=shard_info, **self._meta)
    ds = self._tf_fn(split, shard_info) if (self._tf_fn is not None and not found) else None
    if ds is None:
      ds = tf.data.Dataset.from_generator(lambda: self.iter_examples(split),
                                          output_signature=examples_lib.tf_output_signature())
      if shard_info is not None:
        ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds
