"""Side registry of task provenance (seqio tasks have no metadata slot).

For every task this package registers: where its data comes from (source kind, dataset, subset,
prompt), its role in the paper's protocol (`train` / `heldout`), whether the prompt asks the
original task, and how to get its canonical examples in Python (`examples_fn`), which the
evaluator uses without tf.data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

from seqio_tasks import names

# (split, seed) -> iterator of canonical examples.
ExamplesFn = Callable[[str], Iterator[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What a registered task is, independent of seqio."""
  name: str
  kind: str                      # prompt | score_eval | all_prompts | random_prompt | bigbench
                                 # | continual | demo
  source: str                    # promptsource | bigbench | continual | demo
  dataset: str
  subset: Optional[str] = None
  prompt: Optional[str] = None   # template name (None for multi-prompt tasks)
  role: Optional[str] = None     # 'train' | 'heldout' | None
  original_task: Optional[bool] = None
  eval_dataset: Optional[str] = None
  has_choices: bool = False
  splits: tuple[str, ...] = ("train", "validation")
  vocabulary: str = "t5"         # 't5' (SentencePiece) | 'bytes'
  base_task: Optional[str] = None  # the grouped task a `_score_eval` twin expands
  prompts: tuple[str, ...] = ()  # member prompt tasks of a dataset task
  format: Optional[str] = None   # BIG-bench formatting: 'elm' | 'bigbench'
  metrics: tuple[str, ...] = ()

  def provenance(self) -> dict[str, Any]:
    """The record an expert's metadata stores (Expert format v1 `provenance` entries)."""
    return {"task": self.name, "dataset": self.dataset, "subset": self.subset,
            "prompt": self.prompt, "role": self.role}


_INFOS: dict[str, TaskInfo] = {}
_EXAMPLES: dict[str, ExamplesFn] = {}
_DATA_OPTIONS: dict[str, Callable[[], dict[str, Any]]] = {}


def register(info: TaskInfo, examples_fn: Optional[ExamplesFn] = None) -> None:
  _INFOS[info.name] = info
  if examples_fn is not None:
    _EXAMPLES[info.name] = examples_fn


def remove(name: str) -> None:
  _INFOS.pop(name, None)
  _EXAMPLES.pop(name, None)
  _DATA_OPTIONS.pop(name, None)


def set_data_options(name: str, options_fn: Callable[[], dict[str, Any]]) -> None:
  """Registers how to read the settings that decide a task's examples (resolved at use)."""
  _DATA_OPTIONS[name] = options_fn


def data_options(name: str) -> dict[str, Any]:
  """The settings that decided `name`'s examples now (e.g. BIG-bench format and multiple-gold
  rule), for results to record; {} for tasks without any."""
  get(name)
  return dict(_DATA_OPTIONS[name]()) if name in _DATA_OPTIONS else {}


def get(name: str) -> TaskInfo:
  """The provenance of a task; an unknown name suggests the closest registered names."""
  if name not in _INFOS:
    raise names.unknown_name_error("task", name, list(_INFOS))
  return _INFOS[name]


def examples_fn(name: str) -> ExamplesFn:
  get(name)
  if name not in _EXAMPLES:
    raise ValueError(f"task {name!r} has no Python example reader.")
  return _EXAMPLES[name]


def all_infos() -> list[TaskInfo]:
  return list(_INFOS.values())


def task_names() -> list[str]:
  return list(_INFOS)
