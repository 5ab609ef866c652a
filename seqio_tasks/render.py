"""Renders tasks once into P3-layout TFRecords in the canonical schema (`expert-t5x tasks render`).

The output directory `<out>/<task>/` is what the P3_DIR setting reads: point
`EXPERT_T5X_P3_DIR` (or `seqio_tasks.settings.P3_DIR`) at `<out>` and training / evaluation read the
TFRecords through tf.data only (fast, deterministic, checkpointable iterators).
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Optional, Sequence

from seqio_tasks import provenance
from seqio_tasks.sources import p3


def render_task(name: str, out_dir: str, *, splits: Optional[Sequence[str]] = None,
                max_examples: Optional[int] = None, vocabulary=None,
                log: Callable[[str], None] = print) -> dict[str, int]:
  """Writes `<out_dir>/<name>/<split>.tfrecord-00000-of-00001` per split; returns the counts.

  Splits whose source data is missing are reported and skipped; if none can be rendered the last
  error is raised.
  """
  info = provenance.get(name)
  wanted = list(splits or info.splits)
  unknown = [s for s in wanted if s not in info.splits]
  if unknown:
    raise ValueError(f"task {name!r} has no split(s) {unknown}; it has {list(info.splits)}.")
  counts: dict[str, int] = {}
  last_error: Optional[Exception] = None
  for split in wanted:
    iterator = provenance.examples_fn(name)(split)
    if max_examples is not None:
      iterator = itertools.islice(iterator, max_examples)
    try:
      counts[split] = p3.write_split(os.path.join(out_dir, name), split, iterator, vocabulary)
    except (FileNotFoundError, KeyError) as e:
      last_error = e
      log(f"{name} {split}: skipped ({e})")
      continue
    log(f"{name} {split}: {counts[split]} examples -> {os.path.join(out_dir, name)}")
  if not counts and last_error is not None:
    raise last_error
  return counts
