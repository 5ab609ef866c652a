"""The paper's 13 BIG-bench tasks as seqio tasks, in the `elm` and `bigbench` formats.

Names: `bigbench_<task>` (subtasks pooled) and `bigbench_<task>_<subtask>`; the BIG-bench-format
variant adds `_bbfmt`. Each is a scoring task (rank classification over `target_scores` keys) with
one split, `validation` (BIG-bench tasks have no splits). The multiple-gold rule
(`seqio_tasks.settings.BIGBENCH_MULTIPLE_GOLD`) is read at use and recorded through
`provenance.data_options`.
"""

from __future__ import annotations

from typing import Optional

from seqio_tasks import names
from seqio_tasks import provenance
from seqio_tasks import registry
from seqio_tasks import vocab
from seqio_tasks.sources import bigbench
from seqio_tasks.sources import canonical

SPLITS = ("validation",)


def task_name(task: str, subtask: Optional[str] = None, fmt: str = "elm") -> str:
  name = f"bigbench_{task}" + (f"_{subtask}" if subtask else "")
  return names.task_clean(name + (names.BIGBENCH_FORMAT_SUFFIX if fmt == "bigbench" else ""))


def register(task: str, subtask: Optional[str], fmt: str) -> str:
  name = task_name(task, subtask, fmt)

  def python_fn(split: str):
    del split
    return bigbench.iter_examples(task, subtask, fmt=fmt)

  source = canonical.CanonicalSource(name=name, splits=SPLITS, python_fn=python_fn,
                                     dataset=f"bigbench_{task}", subset=subtask, prompt=fmt)
  info = provenance.TaskInfo(name=name, kind="bigbench", source="bigbench",
                             dataset=f"bigbench_{task}", subset=subtask, prompt=fmt,
                             role="heldout", original_task=True, eval_dataset=f"bigbench_{task}",
                             has_choices=True, splits=SPLITS, format=fmt)
  registry.add_task(info, source, vocabulary=vocab.T5_VOCABULARY, scoring=True)
  provenance.set_data_options(name, lambda: bigbench.data_options(fmt))
  return name


def register_all() -> list[str]:
  added = []
  for fmt in bigbench.FORMATS:
    for task in names.bigbench_tasks():
      added.append(register(task, None, fmt))
      for subtask in bigbench.SUBTASKS.get(task, ()):
        added.append(register(task, subtask, fmt))
  return added
