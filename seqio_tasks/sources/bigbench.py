"""BIG-bench JSON tasks (`task.json`, with subtasks) as canonical examples, in two named formats.

Directory layout under BIGBENCH_DIR (what `expert-t5x data fetch bigbench` extracts):
`<dir>/<task>/task.json` and, for tasks with subtasks, `<dir>/<task>/<subtask>/task.json`.

* `elm` (default; the paper's numbers): ELM's `retrieval/make_benchmarks.py`. Each prefix is read
  from the task file with ELM's default, and a value present in the file is used as it is (the
  empty string included): input = `task_prefix ("") + example_input_prefix ("\\nQ: ") + input +
  (choice_prefix ("\\n choice: ") + choice_prefix.join(choices) if append_choices_to_input (True))
  + example_output_prefix ("\\nA: ")`; choices = `target_scores` keys in JSON order; no
  deduplication; gold = the choice scored 1 (none: an error, as in ELM).
* `bigbench` (BIG-bench 1.0.0's `bigbench/api/json_task.py`; task suffix `_bbfmt`): duplicate
  examples (by their JSON) dropped; `default_format_fn` appends `choice_prefix` ("\\n  choice: ")
  + the choices in `np.random.RandomState(42).permutation(sorted(keys))`, a generator made afresh
  for every example; input = `task_prefix + example_input_prefix ("\\nQ: ") + ... +
  example_output_prefix ("\\nA: ")`; gold = the first key with the maximal score; the scored
  choice list is the keys in JSON order.

Several top-scored choices (score 1 in `elm`, the maximal score in `bigbench`; one example of
`hindu_knowledge`) follow the rule `seqio_tasks.settings.BIGBENCH_MULTIPLE_GOLD`
(`EXPERT_T5X_BIGBENCH_MULTIPLE_GOLD`): `first` (default: the first in JSON order, BIG-bench's gold
rule), `skip` (left out, counted) or `error`. Either way they are counted in the task's stats, and
`data_options` gives the rule that evaluation results record.

Subtasks are pooled under the parent (`bigbench_<task>`) in sorted subtask order, as both ELM's
and BIG-bench's code do, and are also tasks of their own (`bigbench_<task>_<subtask>`).
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


MULTIPLE_GOLD_SETTING = "BIGBENCH_MULTIPLE_GOLD"


def multiple_gold_rule(rule: Optional[str] = None) -> str:
  """`rule` when given (checked), else the configured rule (`first` by default)."""
  if rule is None:
    return settings.get_option(MULTIPLE_GOLD_SETTING)
  allowed = ("first", "skip", "error")
  if rule not in allowed:
    raise ValueError(f"BIG-bench multiple-gold rule {rule!r} is not one of {allowed}.")
  return rule


def data_options(fmt: str, rule: Optional[str] = None) -> dict[str, str]:
  """What decides a BIG-bench task's examples besides its files (recorded in eval results)."""
  return {"format": fmt, "multiple_gold": multiple_gold_rule(rule)}


def _gold_indices(fmt: str, scores: Mapping[str, Any], where: str) -> list[int]:
  """Positions (JSON order) of the top-scored choices: score 1 (ELM) or the maximal score."""
  values = list(scores.values())
  if fmt == "elm":
    gold = [i for i, v in enumerate(values) if v == 1]
    if not gold:
      raise ValueError(f"{where}: no choice has score 1, which the elm format needs (ELM's "
                       "make_benchmarks.py raises too); use the 'bigbench' format (`_bbfmt`).")
    return gold
  best, worst = max(values), min(values)
  if (len(values) == 1 and best == 0) or (len(values) > 1 and best <= worst):
    raise ValueError(f"{where}: no correct choice (all target_scores equal), as BIG-bench's "
                     "json_task refuses too.")
  return [i for i, v in enumerate(values) if v == best]


def _format_elm(data: Mapping[str, Any], example: Mapping[str, Any], choices: list[str]) -> str:
  # ELM make_benchmarks.py: dataset_prompt_setting (the defaults) and bigbench_input (the f-string).
  task_prefix = data.get("task_prefix", "")
  input_prefix = data.get("example_input_prefix", "\nQ: ")
  output_prefix = data.get("example_output_prefix", "\nA: ")
  choice_prefix = data.get("choice_prefix", "\n choice: ")
  # Truthiness, as ELM: logic_grid_puzzle's "false" (a string) appends the choices.
  choices_text = (choice_prefix + choice_prefix.join(choices)
                  if data.get("append_choices_to_input", True) else "")
  return f"{task_prefix}{input_prefix}{example['input']}{choices_text}{output_prefix}"


def _format_bigbench(data: Mapping[str, Any], example: Mapping[str, Any], choices: list[str],
                     seed: int) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top
  # json_task.default_format_fn: a fresh RandomState(seed) per example permutes the sorted keys.
  text = example["input"]
  if data.get("append_choices_to_input", True):
    prefix = data.get("choice_prefix", "\n  choice: ")
    text += prefix + prefix.join(np.random.RandomState(seed=seed).permutation(sorted(choices)))
  text = data.get("example_input_prefix", "\nQ: ") + text + data.get("example_output_prefix",
                                                                     "\nA: ")
  return str(data.get("task_prefix", "")) + text  # JsonTask prepends its task_prefix.


def _distinct(items: list[Any]) -> list[Any]:
  """JsonTask's deduplication: examples with equal `json.dumps` dropped, order kept."""
  seen, unique = set(), []
  for ex in items:
    key = json.dumps(ex)
    if key not in seen:
      seen.add(key)
      unique.append(ex)
  return unique


def iter_task_file(path: str, *, fmt: str, dataset: str, subset: str, prompt: str,
                   first_id: int = 0, seed: int = DEFAULT_SEED, rule: Optional[str] = None,
                   stats: Optional[examples_lib.ExampleStats] = None
                   ) -> Iterator[dict[str, Any]]:
  """Canonical examples of one `task.json` (examples without `target_scores` are counted,
  skipped)."""
  if fmt not in FORMATS:
    raise ValueError(f"BIG-bench format {fmt!r} is not one of {FORMATS}.")
  rule = multiple_gold_rule(rule)
  data = read_task_json(path)
  items = data.get("examples", [])
  if fmt == "bigbench":
    items = _distinct(items)
  stats = stats if stats is not None else examples_lib.ExampleStats()
  example_id = first_id
  for position, ex in enumerate(items):
    if "target_scores" not in ex:
      stats.skipped["no target_scores (not multiple choice)"] += 1
      continue
    where = f"{path} example {position}"
    choices = [str(c) for c in ex["target_scores"]]
    gold = _gold_indices(fmt, ex["target_scores"], where)
    if len(gold) > 1:
      why = f"several top-scored choices, multiple_gold rule {rule!r}"
      if rule == "error":
        raise ValueError(f"{where}: {len(gold)} choices share the top score "
                         f"({[choices[i] for i in gold]}); set "
                         f"seqio_tasks.settings.{MULTIPLE_GOLD_SETTING} (or "
                         f"${settings.env_var(MULTIPLE_GOLD_SETTING)}) to 'first' or 'skip'.")
      if rule == "skip":
        stats.skipped[why] += 1
        continue
      stats.kept[why + " (the first kept)"] += 1
    text = (_format_elm(data, ex, choices) if fmt == "elm"
            else _format_bigbench(data, ex, choices, seed))
    out = examples_lib.make_example(inputs=text, targets=choices[gold[0]], answer_choices=choices,
                                    example_id=example_id, dataset=dataset, subset=subset,
                                    prompt=prompt, label_index=gold[0])
    stats.add(out)
    example_id += 1
    yield out


def iter_examples(task: str, subtask: Optional[str] = None, *, fmt: str = "elm",
                  root: Optional[str] = None, seed: int = DEFAULT_SEED, rule: Optional[str] = None,
                  stats: Optional[examples_lib.ExampleStats] = None
                  ) -> Iterator[dict[str, Any]]:
  """Canonical examples of a task (subtasks pooled) or of one subtask; `stats` (if given) counts."""
  base = task_dir(task, root)
  dataset, prompt = f"bigbench_{task}", fmt
  rule = multiple_gold_rule(rule)
  stats = stats if stats is not None else examples_lib.ExampleStats()
  name = f"bigbench_{task}" + (f"_{subtask}" if subtask else "")
  if subtask is not None:
    yield from iter_task_file(os.path.join(base, subtask, "task.json"), fmt=fmt, dataset=dataset,
                              subset=subtask, prompt=prompt, seed=seed, rule=rule, stats=stats)
    stats.report(name, scoring=True)
    return
  subtasks = list_subtasks(task, root)
  parent = os.path.join(base, "task.json")
  next_id = 0
  if not subtasks or (os.path.exists(parent) and "examples" in read_task_json(parent)):
    for ex in iter_task_file(parent, fmt=fmt, dataset=dataset, subset="", prompt=prompt,
                             seed=seed, rule=rule, stats=stats):
      next_id = ex["example_id"] + 1
      yield ex
  for sub in subtasks:
    for ex in iter_task_file(os.path.join(base, sub, "task.json"), fmt=fmt, dataset=dataset,
                             subset=sub, prompt=prompt, first_id=next_id, seed=seed, rule=rule,
                             stats=stats):
      next_id = ex["example_id"] + 1
      yield ex
  stats.report(name, scoring=True)
