"""The continual-learning (CT0) tasks of the paper as seqio tasks, read from local files."""

from __future__ import annotations

from seqio_tasks import metrics
from seqio_tasks import names
from seqio_tasks import provenance
from seqio_tasks import registry
from seqio_tasks import vocab
from seqio_tasks.sources import canonical
from seqio_tasks.sources import continual


def task_name(dataset: str, prompt: str) -> str:
  return names.prompt_task_name(dataset, None, prompt)


def register_all() -> list[str]:
  added = []
  for dataset, prompt in continual.CT0_PROMPTS:
    name = task_name(dataset, prompt)

    def python_fn(split, name=name, dataset=dataset, prompt=prompt):
      return continual.iter_examples(task=name, dataset=dataset, prompt=prompt, split=split)

    source = canonical.CanonicalSource(name=name, splits=continual.SPLITS, python_fn=python_fn,
                                       dataset=dataset, subset=None, prompt=prompt)
    info = provenance.TaskInfo(name=name, kind="continual", source="continual", dataset=dataset,
                               prompt=prompt, role="train", original_task=True,
                               eval_dataset=dataset, splits=continual.SPLITS,
                               metrics=("ROUGE", "BLEU"))
    registry.add_task(info, source, vocabulary=vocab.T5_VOCABULARY, scoring=False,
                      metric_fns=[metrics.rouge, metrics.bleu])
    added.append(name)
  return added
