"""BIG-bench JSON tasks (`task.json`, with subtasks) as canonical examples, in two named formats.

Directory layout under BIGBENCH_DIR (what `expert-t5x data fetch bigbench` extracts):
`<dir>/<task>/task.json` and, for tasks with subtasks, `<dir>/<task>/<subtask>/task.json`.

* `elm` (default; the paper's numbers): input = `task_prefix + (example_input_prefix or "\\nQ: ")
  + input + ("\\n choice: " + "\\n choice: ".join(choices) if append_choices_to_input) +
  (example_output_prefix or "\\nA: ")`; choices = `target_scores` keys in JSON order; no
  deduplication; gold = the choice with score 1 (exactly one required).
* `bigbench` (BIG-bench's own `json_task` formatting; task suffix `_bbfmt`): duplicate examples
  (by their JSON) dropped; choices appended with `choice_prefix` (default `"\\n  choice: "`) in a
  permutation of the sorted keys drawn from one `numpy.random.RandomState(seed)` per (sub)task in
  example order; gold = the first key with the maximal score; the scored choice list is the keys
  in JSON order.

Subtasks are pooled under the parent (`bigbench_<task>`) in sorted subtask order, as the paper's
code does, and are also tasks of their own (`bigbench_<task>_<subtask>`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Optional

from seqio_tasks import examples as examples_lib
from seqio_tasks import settings

FORMATS = ("elm", "bigbench")
DEFAULT_SEED = 42

# Subtasks of the paper's 13 tasks (BIG-bench 1.0.0); the loader checks them against the files.
SUBTASKS: dict[str, tuple[str, ...]] = {
    "conceptual_combinations": ("contradictions", "emergent_properties",
                                "fanciful_fictional_combinations", "homonyms", "invented_words",
                                "surprising_uncommon_combinations"),
    "logical_deduction": ("five_objects", "seven_objects", "three_objects"),
}


def task_dir(task: str, root: Optional[str] = None) -> str:
  return os.path.join(root or settings.get_path("BIGBENCH_DIR"), task)


def read_task_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"BIG-bench task file {path!r} does not exist; run "
                            "`expert-t5x data fetch bigbench` or set EXPERT_T5X_BIGBENCH_DIR.")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e


def list_subtasks(task: str, root: Optional[str] = None) -> list[str]:
  """Subtask directory names of a task on disk, sorted."""
  base = task_dir(task, root)
  if not os.path.isdir(base):
    return []
  return sorted(d for d in os.listdir(base)
                if os.path.exists(os.path.join(base, d, "task.json")))


def _format_elm(data: Mapping[str, Any], example: Mapping[str, Any], where: str
                ) -> tuple[str, list[str], int]:
  scores = example["target_scores"]
  choices = list(scores)
  gold = [i for i, c in enumerate(choices) if scores[c] == 1]
  if len(gold) != 1:
    raise ValueError(f"{where}: the elm format needs exactly one choice with score 1, found "
                     f"{len(gold)}; use the 'bigbench' format for graded scores.")
  text = data.get("task_prefix", "") + (data.get("example_input_prefix") or "\nQ: ")
  text += example["input"]
  if data.get("append_choices_to_input", True):
    text += "\n choice: " + "\n choice: ".join(choices)
  text += data.get("example_output_prefix") or "\nA: "
  return text, choices, gold[0]


def _format_bigbench(data: Mapping[str, Any], example: Mapping[str, Any], rng
                     ) -> tuple[str, list[str], int]:
  scores = example["target_scores"]
  choices = list(scores)
  choice_prefix = data.get("choice_prefix", "\n  choice: ")
  text = example["input"]
  if data.get("append_choices_to_input", True):
    permuted = rng.permutation(sorted(choices))
    text += choice_prefix + choice_prefix.join(str(c) for c in permuted)
  best = max(scores.values())
  gold = next(i for i, c in enumerate(choices) if scores[c] == best)
  text = (data.get("task_prefix", "") + data.get("example_input_prefix", "\nQ: ") + text
          + data.get("example_output_prefix", "\nA: "))
  return text, choices, gold


def iter_task_file(path: str, *, fmt: str, dataset: str, subset: str, prompt: str,
                   first_id: int = 0, seed: int = DEFAULT_SEED,
                   stats: Optional[examples_lib.ExampleStats] = None
                   ) -> Iterator[dict[str, Any]]:
  """Canonical examples of one `task.json` (examples without `target_scores` are counted, skipped)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"BIG-bench format {fmt!r} is not one of {FORMATS}.")
  data = read_task_json(path)
  items = data.get("examples", [])
  if fmt == "bigbench":
    seen, unique = set(), []
    for ex in items:
      key = json.dumps(ex)
      if key not in seen:
        seen.add(key)
        unique.append(ex)
    items = unique
  rng = np.random.RandomState(seed)
  stats = stats if stats is not None else examples_lib.ExampleStats()
  example_id = first_id
  for position, ex in enumerate(items):
    if "target_scores" not in ex:
      stats.skipped["no target_scores (not multiple choice)"] += 1
      continue
    where = f"{path} example {position}"
    text, choices, gold = (_format_elm(data, ex, where) if fmt == "elm"
                           else _format_bigbench(data, ex, rng))
    out = examples_lib.make_example(inputs=text, targets=choices[gold], answer_choices=choices,
                                    example_id=example_id, dataset=dataset, subset=subset,
                                    prompt=prompt, label_index=gold)
    stats.add(out)
    example_id += 1
    yield out


def iter_examples(task: str, subtask: Optional[str] = None, *, fmt: str = "elm",
                  root: Optional[str] = None, seed: int = DEFAULT_SEED
                  ) -> Iterator[dict[str, Any]]:
  """Canonical examples of a task (subtasks pooled) or of one subtask."""
  base = task_dir(task, root)
  dataset, prompt = f"bigbench_{task}", fmt
  stats = examples_lib.ExampleStats()
  if subtask is not None:
    yield from iter_task_file(os.path.join(base, subtask, "task.json"), fmt=fmt, dataset=dataset,
                              subset=subtask, prompt=prompt, seed=seed, stats=stats)
    return
  subtasks = list_subtasks(task, root)
  parent = os.path.join(base, "task.json")
  next_id = 0
  if not subtasks or (os.path.exists(parent) and "examples" in read_task_json(parent)):
    for ex in iter_task_file(parent, fmt=fmt, dataset=dataset, subset="", prompt=prompt,
                             seed=seed, stats=stats):
      next_id = ex["example_id"] + 1
      yield ex
  for sub in subtasks:
    for ex in iter_task_file(os.path.join(base, sub, "task.json"), fmt=fmt, dataset=dataset,
                             subset=sub, prompt=prompt, first_id=next_id, seed=seed, stats=stats):
      next_id = ex["example_id"] + 1
      yield ex
  stats.report(f"bigbench_{task}", scoring=True)
