"""The canonical example: the one schema every source is normalised to.

    {inputs: str, targets: str, answer_choices: list[str], label_index: int (-1 if none),
     example_id: int64, dataset: str, subset: str ("" if none), prompt: str}

Training reads `inputs`/`targets`; rank classification scores `answer_choices` (grouped, one example
with all its choices) and checks the argmax against `label_index`. This module also gives the
evaluator a Python path to a task's canonical examples (`load_examples`) that needs no tf.data.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

CANONICAL_KEYS = ("inputs", "targets", "answer_choices", "label_index", "example_id", "dataset",
                  "subset", "prompt")
STRING_KEYS = ("inputs", "targets", "dataset", "subset", "prompt")


def make_example(*, inputs: str, targets: str, answer_choices: Optional[Sequence[str]],
                 example_id: int, dataset: str, subset: Optional[str], prompt: str,
                 label_index: Optional[int] = None) -> dict[str, Any]:
  """Builds a canonical example; `label_index` defaults to the position of `targets` in the
  choices."""
  choices = [str(c) for c in (answer_choices or [])]
  if label_index is None:
    stripped = targets.strip()
    label_index = next((i for i, c in enumerate(choices) if c.strip() == stripped), -1)
  return {"inputs": inputs, "targets": targets, "answer_choices": choices,
          "label_index": int(label_index), "example_id": int(example_id), "dataset": dataset,
          "subset": subset or "", "prompt": prompt}


def validate_example(example: Mapping[str, Any], where: str = "example") -> None:
  """Raises one clear error when `example` does not follow the canonical schema."""
  missing = [k for k in CANONICAL_KEYS if k not in example]
  if missing:
    raise ValueError(f"{where}: missing canonical keys {missing}; expected {list(CANONICAL_KEYS)}.")
  for key in STRING_KEYS:
    if not isinstance(example[key], str):
      raise ValueError(f"{where}: {key!r} must be a str, got {type(example[key]).__name__}.")
  choices = example["answer_choices"]
  if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
    raise ValueError(f"{where}: 'answer_choices' must be a list of str.")
  label = example["label_index"]
  if not isinstance(label, int) or not (label == -1 or 0 <= label < len(choices)):
    raise ValueError(f"{where}: 'label_index' {label!r} must be -1 or an index into the "
                     f"{len(choices)} answer choices.")


@dataclasses.dataclass
class ExampleStats:
  """Counts kept while building examples, so that nothing is dropped silently."""
  examples: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # Noted, kept.
  no_choices: int = 0
  target_not_in_choices: int = 0

  def add(self, example: Mapping[str, Any]) -> None:
    self.examples += 1
    if not example["answer_choices"]:
      self.no_choices += 1
    elif example["label_index"] < 0:
      self.target_not_in_choices += 1

  def summary(self, task: str, scoring: bool) -> str:
    parts = [f"{task}: {self.examples} examples"]
    parts += [f"{n} skipped ({why})" for why, n in sorted(self.skipped.items())]
    parts += [f"{n} with {why}" for why, n in sorted(self.kept.items())]
    if scoring and self.no_choices:
      parts.append(f"{self.no_choices} without answer choices")
    if scoring and self.target_not_in_choices:
      parts.append(f"{self.target_not_in_choices} whose target is not among the answer choices")
    return ", ".join(parts)

  def report(self, task: str, scoring: bool) -> None:
    problems = sum(self.skipped.values()) + sum(self.kept.values()) + (
        self.no_choices + self.target_not_in_choices if scoring else 0)
    if problems:
      logging.warning("%s", self.summary(task, scoring))


def tally(examples: Iterable[Mapping[str, Any]]) -> ExampleStats:
  stats = ExampleStats()
  for ex in examples:
    stats.add(ex)
  return stats


def regroup_score_rows(rows: Iterable[Mapping[str, Any]], *, dataset: str, subset: Optional[str],
                       prompt: str) -> list[dict[str, Any]]:
  """Regroups P3's pre-expanded `_score_eval` rows (one per choice) by `idx[0]` into canonical
  examples.

  Each row carries `idx = [example, choice]`, `inputs_pretokenized`, `targets_pretokenized` (the
  choice), `is_correct` and, in P3, the full `answer_choices`.
  """
  groups: dict[int, list[Mapping[str, Any]]] = collections.OrderedDict()
  for row in rows:
    groups.setdefault(int(row["idx"][0]), []).append(row)
  out = []
  for example_id, members in groups.items():
    members = sorted(members, key=lambda r: int(r["idx"][1]))
    choices = list(members[0].get("answer_choices") or []) or [
        r["targets_pretokenized"] for r in members]
    correct = [int(r["idx"][1]) for r in members if bool(r["is_correct"])]
    label = correct[0] if correct else -1
    out.append(make_example(
        inputs=members[0]["inputs_pretokenized"],
        targets=choices[label] if label >= 0 else "", answer_choices=choices,
        example_id=example_id, dataset=dataset, subset=subset, prompt=prompt, label_index=label))
  return out


def load_examples(task_name: str, split: str = "validation",
                  max_examples: Optional[int] = None, subset: str = "first"
                  ) -> list[dict[str, Any]]:
  """The canonical (grouped) examples of a registered task, read without tf.data pipelines.

  `_score_eval` names give the examples of their grouped base task. `subset` 'first' keeps the
  first `max_examples`; 'paper' the paper's evaluation subset (`seen_eval.paper_subset`: the first
  `max_examples`, 300 by default, of torch's seed-42 permutation).
  """
  from seqio_tasks import provenance  # pylint: disable=g-import-not-at-top
  from seqio_tasks import seen_eval  # pylint: disable=g-import-not-at-top
  info = provenance.get(task_name)
  if split not in info.splits:
    raise ValueError(f"task {task_name!r} has no split {split!r}; it has {list(info.splits)}.")
  iterator: Iterator[dict[str, Any]] = provenance.examples_fn(task_name)(split)
  if subset == "paper":
    return seen_eval.apply_subset(list(iterator), subset, max_examples, info.dataset)
  seen_eval.apply_subset([], subset, None, None)  # validates the name
  if max_examples is not None:
    iterator = itertools.islice(iterator, max_examples)
  return list(iterator)


def tf_output_signature() -> dict[str, Any]:
  """The tf.TensorSpec of a canonical example (imports TensorFlow)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {
      "inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string),
      "answer_choices": tf.TensorSpec([None], tf.string),
      "label_index": tf.TensorSpec([], tf.int32), "example_id": tf.TensorSpec([], tf.int64),
      "dataset": tf.TensorSpec([], tf.string), "subset": tf.TensorSpec([], tf.string),
      "prompt": tf.TensorSpec([], tf.string),
  }


def from_tf(example: Mapping[str, Any]) -> dict[str, Any]:
  """Converts one numpy-valued canonical example (from `as_numpy_iterator`) back to Python types."""
  def text(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return {
      "inputs": text(example["inputs"]), "targets": text(example["targets"]),
      "answer_choices": [text(c) for c in example["answer_choices"]],
      "label_index": int(example["label_index"]), "example_id": int(example["example_id"]),
      "dataset": text(example["dataset"]), "subset": text(example["subset"]),
      "prompt": text(example["prompt"]),
  }
