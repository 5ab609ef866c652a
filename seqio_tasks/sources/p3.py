"""P3-layout TFRecord directories: reading (bigscience's P3 and our own renders) and writing.

Layout of one task directory: `<root>/<task>/<split>.tfrecord-NNNNN-of-MMMMM`, `info.<split>.json`
(`{"features": {name: {"dtype", "shape"}}}`) and `stats.<split>.json` (`{"examples": N}`).
Features: P3's `inputs` / `targets` (token ids), `inputs_pretokenized`, `targets_pretokenized`,
`answer_choices`, and in `_score_eval` directories `idx`, `is_correct`, `weight` (one row per
choice). Our renders add the canonical `label_index`, `example_id`, `dataset`, `subset`, `prompt`.
Reading needs no Python inside tf.data, so iterator state can be checkpointed.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

from expert_t5x import file_io
from seqio_tasks import examples as examples_lib
from seqio_tasks import settings

SPLITS = ("train", "validation", "test")


def find_task_dir(task: str, roots: Optional[Sequence[str]] = None) -> Optional[str]:
  """The first `<root>/<task>` holding TFRecords, over the P3_DIR roots (None if none has it)."""
  for root in (settings.get_roots("P3_DIR") if roots is None else roots):
    path = os.path.join(root, task)
    if glob.glob(os.path.join(path, "*.tfrecord*")):
      return path
  return None


def split_files(task_dir: str, split: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(task_dir, f"{split}.tfrecord*")))
  if not files:
    raise FileNotFoundError(f"no TFRecords for split {split!r} in {task_dir!r} (looked for "
                            f"{split}.tfrecord-*); splits present: {available_splits(task_dir)}.")
  return files


def available_splits(task_dir: str) -> list[str]:
  names = {os.path.basename(f).split(".tfrecord")[0]
           for f in glob.glob(os.path.join(task_dir, "*.tfrecord*"))}
  return sorted(names)


def read_info(task_dir: str, split: str) -> dict[str, Any]:
  path = os.path.join(task_dir, f"info.{split}.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def num_examples(task_dir: str, split: str) -> Optional[int]:
  path = os.path.join(task_dir, f"stats.{split}.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return int(json.load(f)["examples"])


def is_score_rows(task_dir: str, split: str) -> bool:
  """Whether a directory holds pre-expanded rank-classification rows (P3 `_score_eval`)."""
  features = read_info(task_dir, split).get("features")
  if features is not None:
    return "idx" in features
  return os.path.basename(os.path.normpath(task_dir)).endswith("_score_eval")


def _feature_description():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  fixed = lambda dtype, default: tf.io.FixedLenFeature([], dtype, default_value=default)
  return {
      "inputs_pretokenized": fixed(tf.string, ""),
      "targets_pretokenized": fixed(tf.string, ""),
      "answer_choices": tf.io.VarLenFeature(tf.string),
      "label_index": fixed(tf.int64, -2),  # -2: absent, computed from the choices.
      "example_id": fixed(tf.int64, -1),  # -1: absent, the row position is used.
      "dataset": fixed(tf.string, ""),
      "subset": fixed(tf.string, ""),
      "prompt": fixed(tf.string, ""),
      "idx": tf.io.FixedLenFeature([2], tf.int64, default_value=[-1, -1]),
      "is_correct": fixed(tf.int64, 0),
      "weight": fixed(tf.float32, 1.0),
  }


def read_rows(files: Sequence[str]):
  """The parsed, densified rows of P3-layout TFRecord files, in file order (a tf.data.Dataset)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  description = _feature_description()

  def parse(record):
    row = tf.io.parse_single_example(record, description)
    row["answer_choices"] = tf.sparse.to_dense(row["answer_choices"], default_value="")
    return row

  return tf.data.TFRecordDataset(list(files)).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                                  deterministic=True)


def canonical_dataset(task_dir: str, split: str, *, dataset: str, subset: Optional[str],
                      prompt: str, shard_info=None):
  """Canonical examples of a grouped (non score-row) P3-layout directory as a tf.data.Dataset."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = read_rows(split_files(task_dir, split)).enumerate()
  if shard_info is not None:
    # Row-level sharding after enumerate keeps row-position ids identical on every host.
    ds = ds.shard(shard_info.num_shards, shard_info.index)

  def to_canonical(position, row):
    choices = row["answer_choices"]
    target = row["targets_pretokenized"]
    matches = tf.where(tf.equal(tf.strings.strip(choices), tf.strings.strip(target)))[:, 0]
    found = tf.cond(tf.size(matches) > 0, lambda: tf.cast(matches[0], tf.int32),
                    lambda: tf.constant(-1, tf.int32))
    label = tf.where(row["label_index"] == -2, found, tf.cast(row["label_index"], tf.int32))
    example_id = tf.where(row["example_id"] < 0, position, row["example_id"])
    default = lambda key, value: tf.where(row[key] == "", tf.constant(value), row[key])
    return {"inputs": row["inputs_pretokenized"], "targets": target, "answer_choices": choices,
            "label_index": label, "example_id": example_id,
            "dataset": default("dataset", dataset), "subset": default("subset", subset or ""),
            "prompt": default("prompt", prompt)}

  return ds.map(to_canonical, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def iter_canonical(task_dir: str, split: str, *, dataset: str, subset: Optional[str],
                   prompt: str) -> Iterable[dict[str, Any]]:
  """Canonical examples of any P3-layout directory in Python (score rows are regrouped)."""
  if is_score_rows(task_dir, split):
    rows = [{k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in row.items()}
            for row in read_rows(split_files(task_dir, split)).as_numpy_iterator()]
    for row in rows:
      row["answer_choices"] = [c.decode("utf-8") for c in row["answer_choices"]]
    yield from examples_lib.regroup_score_rows(rows, dataset=dataset, subset=subset, prompt=prompt)
    return
  ds = canonical_dataset(task_dir, split, dataset=dataset, subset=subset, prompt=prompt)
  for ex in ds.as_numpy_iterator():
    yield examples_lib.from_tf(ex)


# ---------------------------------------------------------------------------------------------
# Writing


def _tf_example(example: Mapping[str, Any], vocabulary=None):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  b = lambda values: tf.train.Feature(bytes_list=tf.train.BytesList(
      value=[v.encode("utf-8") for v in values]))
  i = lambda values: tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))
  feature = {
      "inputs_pretokenized": b([example["inputs"]]),
      "targets_pretokenized": b([example["targets"]]),
      "answer_choices": b(example["answer_choices"]),
      "label_index": i([example["label_index"]]), "example_id": i([example["example_id"]]),
      "dataset": b([example["dataset"]]), "subset": b([example["subset"]]),
      "prompt": b([example["prompt"]]),
  }
  if vocabulary is not None:
    feature["inputs"] = i(vocabulary.encode(example["inputs"]))
    feature["targets"] = i(vocabulary.encode(example["targets"]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def _info(with_ids: bool) -> dict[str, Any]:
  features = {
      "inputs_pretokenized": {"dtype": "string", "shape": []},
      "targets_pretokenized": {"dtype": "string", "shape": []},
      "answer_choices": {"dtype": "string", "shape": [None]},
      "label_index": {"dtype": "int32", "shape": []}, "example_id": {"dtype": "int64", "shape": []},
      "dataset": {"dtype": "string", "shape": []}, "subset": {"dtype": "string", "shape": []},
      "prompt": {"dtype": "string", "shape": []},
  }
  if with_ids:
    features["inputs"] = {"dtype": "int32", "shape": [None]}
    features["targets"] = {"dtype": "int32", "shape": [None]}
  return {"features": features, "num_shards": 1}


def write_split(task_dir: str, split: str, examples: Iterable[Mapping[str, Any]],
                vocabulary=None) -> int:
  """Writes canonical examples as one P3-layout shard (+ info and stats); returns the count.

  Written to a temporary name and renamed, so an interrupted render leaves no partial split.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(task_dir, exist_ok=True)
  final = os.path.join(task_dir, f"{split}.tfrecord-00000-of-00001")
  count = 0
  with file_io.atomic_path(final) as tmp:  # a hidden name, outside the shard pattern
    with tf.io.TFRecordWriter(tmp) as writer:
      for ex in examples:
        examples_lib.validate_example(ex, where=f"{task_dir} {split} example {count}")
        writer.write(_tf_example(ex, vocabulary).SerializeToString())
        count += 1
    for old in glob.glob(os.path.join(task_dir, f"{split}.tfrecord-*")):
      os.remove(old)
  file_io.atomic_write_json(os.path.join(task_dir, f"info.{split}.json"),
                            _info(vocabulary is not None), indent=1)
  file_io.atomic_write_json(os.path.join(task_dir, f"stats.{split}.json"), {"examples": count})
  return count
