"""The continual-learning (CT0) tasks of the paper as seqio tasks, read from local files.

The 16 target prompts of the paper are registered (`ct0_target_eval`); the 10 of them that the paper
trains an expert on (`ct0_continual`) also have a `train` split. `TaskInfo.metrics` names the
paper's metric first: every task is reported with exact match, ROUGE and BLEU, and the BERTScore
datasets also with BERTScore precision.
"""

from __future__ import annotations

from typing import Optional

import seqio

from seqio_tasks import metrics
from seqio_tasks import names
from seqio_tasks import provenance
from seqio_tasks import registry
from seqio_tasks import vocab
from seqio_tasks.sources import canonical
from seqio_tasks.sources import continual


def task_name(dataset: str, prompt: str) -> str:
  return names.prompt_task_name(dataset, None, prompt)


def register_all(vocabulary: Optional[seqio.Vocabulary] = None) -> list[str]:
  """Registers the 16 target tasks (T5's vocabulary unless another is given, e.g. for ByT5)."""
  vocabulary = vocabulary or vocab.T5_VOCABULARY
  added = []
  for dataset, prompt in continual.CT0_TARGET_PROMPTS:
    name = task_name(dataset, prompt)
    splits = continual.splits_of(dataset, prompt)

    def python_fn(split, name=name, dataset=dataset, prompt=prompt):
      return continual.iter_examples(task=name, dataset=dataset, prompt=prompt, split=split)

    source = canonical.CanonicalSource(name=name, splits=splits, python_fn=python_fn,
                                       dataset=dataset, subset=None, prompt=prompt)
    trained = (dataset, prompt) in continual.CT0_EXPERTS
    paper_metric = continual.CT0_METRICS[dataset]
    info = provenance.TaskInfo(
        name=name, kind="continual", source="continual", dataset=dataset, prompt=prompt,
        role="train" if trained else "heldout", original_task=True, eval_dataset=dataset,
        splits=splits, metrics=tuple(dict.fromkeys((paper_metric, "ROUGE", "BLEU"))),
        vocabulary="bytes" if isinstance(vocabulary, seqio.ByteVocabulary) else "t5")
    registry.add_task(info, source, vocabulary=vocabulary, scoring=False,
                      metric_fns=[metrics.rouge, metrics.bleu])
    added.append(name)
  return added


def expert_settings(task: str) -> continual.ExpertSettings:
  """The paper's training settings of a continual task's expert (one line if it has none)."""
  by_task = {task_name(d, p): s for (d, p), s in continual.CT0_EXPERTS.items()}
  if task not in by_task:
    raise KeyError(f"{task!r} is not one of the paper's 10 continual experts; expected one of "
                   f"{sorted(by_task)}.")
  return by_task[task]
