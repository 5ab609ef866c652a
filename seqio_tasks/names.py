"""Task names: bigscience t-zero's naming for prompt tasks, and the paper's prompt grid.

Names are stable keys (experts' provenance, libraries, result files), so they follow t-zero exactly:
`task_clean(f"{dataset}_{subset}_{template}")` with the subset omitted when there is none, ANLI
rounds as a suffix (`anli_<template>_r1`), and `<task>_score_eval` for rank-classification twins.

The grid (296 training prompts over 36 datasets, 113 held-out prompts over 11 datasets, 13
BIG-bench tasks) ships as package data and is read on first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import json
import re
from typing import Iterable, Optional, Sequence


SCORE_EVAL_SUFFIX = "_score_eval"
ALL_PROMPTS_SUFFIX = "_all_prompts"
RANDOM_PROMPT_SUFFIX = "_random_prompt"
BIGBENCH_FORMAT_SUFFIX = "_bbfmt"


def task_clean(text: str) -> str:
  """t-zero's `task_clean`: every run of characters other than word characters, '.' and '_' ->
  '_'."""
  return re.sub(r"[^\w\d\._]+", "_", text)


def prompt_task_name(dataset: str, subset: Optional[str], template: str,
                     anli_round: Optional[str] = None) -> str:
  """The t-zero task name of one (dataset, subset, template), e.g. `super_glue_cb_can_we_infer`."""
  name = task_clean(f"{dataset}_{subset}_{template}" if subset else f"{dataset}_{template}")
  return f"{name}_{anli_round}" if anli_round else name


def dataset_task_prefix(dataset: str, subset: Optional[str]) -> str:
  return task_clean(f"{dataset}_{subset}" if subset else dataset)


def score_eval_name(task: str) -> str:
  return task + SCORE_EVAL_SUFFIX


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """One prompt of the paper's grid."""
  task: str                 # t-zero task name
  dataset: str              # Hugging Face dataset name
  subset: Optional[str]     # Hugging Face config name
  prompt: str               # promptsource template name
  role: str                 # 'train' or 'heldout'
  eval_dataset: str         # the dataset as results aggregate it (ANLI rounds are three)
  splits: tuple[tuple[str, str], ...]  # (task split, source split), e.g. ('validation', 'dev_r1')
  answer_choices: bool      # whether the template has answer choices
  fixed_choices: Optional[tuple[str, ...]]
  original_task: Optional[bool]
  choices_in_prompt: Optional[bool]
  metrics: tuple[str, ...]

  @property
  def split_map(self) -> dict[str, str]:
    return dict(self.splits)


def _read_json(name: str):
  return json.loads(importlib.resources.files("seqio_tasks").joinpath("data", name).read_text(
      encoding="utf-8"))


_DEFAULT_SPLITS = (("train", "train"), ("validation", "validation"), ("test", "test"))


@functools.lru_cache(maxsize=1)
def _metadata() -> dict[tuple[str, Optional[str], str], dict]:
  return {(r["dataset"], r["subset"], r["prompt"]): r for r in _read_json("prompt_metadata.json")}


def _spec(dataset, subset, prompt, role, eval_dataset, splits, anli_round=None) -> PromptSpec:
  meta = _metadata()[(dataset, subset, prompt)]
  fixed = meta.get("fixed_choices")
  return PromptSpec(
      task=prompt_task_name(dataset, subset, prompt, anli_round), dataset=dataset, subset=subset,
      prompt=prompt, role=role, eval_dataset=eval_dataset, splits=splits,
      answer_choices=bool(meta["answer_choices"]), fixed_choices=tuple(fixed) if fixed else None,
      original_task=meta.get("original_task"), choices_in_prompt=meta.get("choices_in_prompt"),
      metrics=tuple(meta.get("metrics") or ()))


@functools.lru_cache(maxsize=1)
def train_prompts() -> tuple[PromptSpec, ...]:
  """The 296 training prompts (36 T0 training datasets)."""
  # Imported here: this file's pure functions are loaded on their own by the launchers.
  from seqio_tasks import seen_eval  # pylint: disable=g-import-not-at-top
  specs = []
  for entry in _read_json("t0_train_296.json"):
    ds, sub = entry["dataset"], entry["subset"]
    for prompt in entry["prompts"]:
      # The split the paper evaluated seen tasks on (test, or a train slice, for datasets
      # without a validation split; `seen_eval`).
      specs.append(_spec(ds, sub, prompt, "train", dataset_task_prefix(ds, sub),
                         seen_eval.train_splits(ds)))
  return tuple(specs)


@functools.lru_cache(maxsize=1)
def heldout_prompts() -> tuple[PromptSpec, ...]:
  """The 113 held-out prompts (11 evaluation datasets; ANLI rounds counted separately)."""
  specs = []
  for entry in _read_json("t0_heldout_113.json"):
    ds, sub = entry["hf_dataset"], entry["hf_subset"]
    anli_round = None
    splits = _DEFAULT_SPLITS
    if ds == "anli":
      anli_round = entry["split_or_config"].split("_")[-1]  # dev_r1 -> r1
      splits = (("train", f"train_{anli_round}"), ("validation", f"dev_{anli_round}"),
                ("test", f"test_{anli_round}"))
    for prompt in entry["prompts"]:
      specs.append(_spec(ds, sub, prompt, "heldout", entry["eval_dataset"], splits, anli_round))
  return tuple(specs)


@functools.lru_cache(maxsize=1)
def bigbench_tasks() -> tuple[str, ...]:
  """The 13 BIG-bench tasks of the paper."""
  return tuple(_read_json("bigbench_13.json"))


def train_datasets() -> list[tuple[str, Optional[str]]]:
  """The 36 training (dataset, subset) pairs, in grid order."""
  seen: dict[tuple[str, Optional[str]], None] = {}
  for spec in train_prompts():
    seen.setdefault((spec.dataset, spec.subset), None)
  return list(seen)


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
  """Registered names that look like `name` (for 'unknown task' errors)."""
  return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def unknown_name_error(kind: str, name: str, candidates: Sequence[str]) -> KeyError:
  near = closest(name, candidates)
  hint = (f" Did you mean: {', '.join(near)}?" if near
          else " Run `expert-t5x tasks list` to see them.")
  return KeyError(f"unknown {kind} {name!r}.{hint}")
