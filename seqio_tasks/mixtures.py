"""Mixtures and suites: named task lists of the paper's protocol (and of the demo).

| name                  | tasks                                                          |
|-----------------------|----------------------------------------------------------------|
| `t0_train`            | the 296 training prompt tasks                                  |
| `t0_train_score_eval` | `_score_eval` of the training prompts with answer choices      |
| `t0_eval_score_eval`  | `_score_eval` of the 113 held-out prompts                      |
| `bigbench_13`         | the 13 pooled BIG-bench tasks (elm format)                     |
| `ct0_continual`       | the 10 continual-learning prompt tasks (trained experts)       |
| `ct0_target_eval`     | the paper's 16 continual target prompts                        |
| `compositional_train` | the XSum summarizer and 5 Tatoeba translator training tasks    |
| `compositional_eval`  | XL-Sum under 'translate to <lang> and summarize' (5 languages) |
| `demo_train`          | demo training prompts (generation mode)                        |
| `demo_heldout`        | `_score_eval` of demo held-out prompts and held-out tasks      |

Each is registered as a seqio mixture; `suite(name)` gives its task list without seqio.
"""

from __future__ import annotations

from typing import Callable

from seqio_tasks import bigbench_tasks
from seqio_tasks import compositional_tasks
from seqio_tasks import continual_tasks
from seqio_tasks import demo
from seqio_tasks import names
from seqio_tasks import registry
from seqio_tasks.sources import continual


def _t0_train() -> list[str]:
  return [s.task for s in names.train_prompts()]


def _t0_train_score_eval() -> list[str]:
  return [names.score_eval_name(s.task) for s in names.train_prompts() if s.answer_choices]


def _t0_eval_score_eval() -> list[str]:
  return [names.score_eval_name(s.task) for s in names.heldout_prompts()]


def _bigbench_13() -> list[str]:
  return [bigbench_tasks.task_name(t) for t in names.bigbench_tasks()]


def _ct0_continual() -> list[str]:
  return [continual_tasks.task_name(d, p) for d, p in continual.CT0_PROMPTS]


def _ct0_target_eval() -> list[str]:
  return [continual_tasks.task_name(d, p) for d, p in continual.CT0_TARGET_PROMPTS]


SUITES: dict[str, Callable[[], list[str]]] = {
    "t0_train": _t0_train,
    "t0_train_score_eval": _t0_train_score_eval,
    "t0_eval_score_eval": _t0_eval_score_eval,
    "bigbench_13": _bigbench_13,
    "ct0_continual": _ct0_continual,
    "ct0_target_eval": _ct0_target_eval,
    "compositional_train": compositional_tasks.train_tasks,
    "compositional_eval": compositional_tasks.eval_tasks,
    "demo_train": demo.train_tasks,
    "demo_heldout": demo.heldout_tasks,
}


def suite(name: str) -> list[str]:
  """The task names of a suite; an unknown name suggests the closest ones."""
  if name not in SUITES:
    raise names.unknown_name_error("suite", name, list(SUITES))
  return SUITES[name]()


def _rate_by_examples(task) -> float:
  """T0's rate: the number of training examples when known (rendered/P3 stats), else 1."""
  count = task.source.num_input_examples("train")
  return float(count) if count else 1.0


def register_all() -> list[str]:
  for name in SUITES:
    registry.add_mixture(name, suite(name), rate=_rate_by_examples if name == "t0_train" else None)
  return list(SUITES)
