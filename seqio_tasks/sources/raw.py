"""Raw dataset rows for promptsource templates: local JSONL / Parquet files or Hugging Face
`datasets`.

Rows are looked up under each RAW_DIR root (`seqio_tasks.settings`; `EXPERT_T5X_RAW_DIR`,
several roots separated by `os.pathsep`), in this order:

1. `<root>/<dataset>[/<subset>]/<split>.jsonl` (one JSON object per line, the Hugging Face columns);
2. `<root>/<dataset>[/<subset>]/<split>.parquet` (needs pyarrow);
3. `<root>/<dataset>[/<subset>]/` saved with `datasets.save_to_disk` (needs `datasets`).

A root spelled `hf:` means `datasets.load_dataset(dataset, subset, split=split)`, for users whose
`datasets` cache or hub access is set up. Recent `datasets` releases run no loading scripts and
story_cloze needs a manual download, so for those use P3 TFRecords or local files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

from seqio_tasks import settings

HF_ROOT = "hf:"


def _base(root: str, dataset: str, subset: Optional[str]) -> str:
  return os.path.join(root, dataset, subset) if subset else os.path.join(root, dataset)


def candidate_paths(dataset: str, subset: Optional[str], split: str) -> list[str]:
  paths = []
  for root in settings.get_roots("RAW_DIR"):
    if root == HF_ROOT:
      continue
    base = _base(root, dataset, subset)
    paths += [os.path.join(base, f"{split}.jsonl"), os.path.join(base, f"{split}.parquet"),
              os.path.join(base, "dataset_dict.json")]
  return paths


def _iter_jsonl(path: str) -> Iterator[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_number}: not a JSON object ({e}).") from e


def _iter_parquet(path: str) -> Iterator[dict[str, Any]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs pyarrow; `pip install pyarrow`.") from e
  yield from pq.read_table(path).to_pylist()


def _iter_datasets(dataset: str, subset: Optional[str], split: str,
                   from_disk: Optional[str]) -> Iterator[dict[str, Any]]:
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading Hugging Face datasets needs the `datasets` package; "
                      "`pip install datasets`, or use local JSONL/Parquet files.") from e
  if from_disk is not None:
    data = datasets.load_from_disk(from_disk)
    if split not in data:
      raise KeyError(f"{from_disk!r} has no split {split!r}; it has {list(data)}.")
    yield from data[split]
  else:
    yield from datasets.load_dataset(dataset, subset, split=split)


def find_rows(dataset: str, subset: Optional[str], split: str) -> Optional[str]:
  """Where rows of (dataset, subset, split) would be read from; None when nowhere."""
  for root in settings.get_roots("RAW_DIR"):
    if root == HF_ROOT:
      return HF_ROOT
    base = _base(root, dataset, subset)
    for name in (f"{split}.jsonl", f"{split}.parquet", "dataset_dict.json"):
      if os.path.exists(os.path.join(base, name)):
        return os.path.join(base, name)
  return None


def iter_rows(dataset: str, subset: Optional[str], split: str) -> Iterator[dict[str, Any]]:
  """The raw rows of one split; a clear error names every place looked at."""
  where = find_rows(dataset, subset, split)
  if where is None:
    looked = candidate_paths(dataset, subset, split)
    raise FileNotFoundError(
        f"no raw rows for dataset {dataset!r} subset {subset!r} split {split!r}: looked for "
        f"{looked or 'nothing (RAW_DIR is not set)'}; set {settings.env_var('RAW_DIR')} to a "
        "directory of <dataset>[/<subset>]/<split>.jsonl files (or 'hf:' for "
        "datasets.load_dataset),"
        f" or point {settings.env_var('P3_DIR')} at P3 / rendered TFRecords.")
  if where == HF_ROOT:
    yield from _iter_datasets(dataset, subset, split, None)
  elif where.endswith(".jsonl"):
    yield from _iter_jsonl(where)
  elif where.endswith(".parquet"):
    yield from _iter_parquet(where)
  else:
    yield from _iter_datasets(dataset, subset, split, os.path.dirname(where))
