"""The compositional-instruction tasks of the paper as seqio tasks, read from local files.

Training tasks of the two expert kinds the paper merges (`compositional_train`): the XSum
summarizer (`compositional_xsum_DOC_write_summary_of_above`) and one Tatoeba translator per
language (`compositional_tatoeba_eng_<lang>`); and the composed XL-Sum evaluation tasks
(`compositional_eval`: `compositional_xlsum_translate_to_<lang>_and_summarize`), reported with
ROUGE (the paper's metric) and BLEU, as ELM's `xlsum` metrics. Data: `sources/compositional.py`.
"""

from __future__ import annotations

from typing import Callable, Optional

import seqio

from seqio_tasks import metrics
from seqio_tasks import provenance
from seqio_tasks import registry
from seqio_tasks import vocab
from seqio_tasks.sources import canonical
from seqio_tasks.sources import compositional

SUMMARY_TASK = f"compositional_xsum_{compositional.SUMMARY_PROMPT}"


def translation_task(lang: str) -> str:
  return f"compositional_tatoeba_eng_{lang}"


def composed_task(lang: str) -> str:
  return f"compositional_xlsum_translate_to_{lang}_and_summarize"


def train_tasks() -> list[str]:
  return [SUMMARY_TASK] + [translation_task(l) for l in compositional.LANGUAGES]


def eval_tasks() -> list[str]:
  return [composed_task(l) for l in compositional.LANGUAGES]


def _add(name: str, dataset: str, subset: Optional[str], prompt: str, splits: tuple[str, ...],
         role: str, fn: Callable, vocabulary: seqio.Vocabulary) -> None:
  source = canonical.CanonicalSource(name=name, splits=splits, python_fn=lambda split: fn(split),
                                     dataset=dataset, subset=subset, prompt=prompt)
  info = provenance.TaskInfo(
      name=name, kind="compositional", source="compositional", dataset=dataset, subset=subset,
      prompt=prompt, role=role, original_task=True, eval_dataset=dataset, splits=splits,
      metrics=("ROUGE", "BLEU"),
      vocabulary="bytes" if isinstance(vocabulary, seqio.ByteVocabulary) else "t5")
  registry.add_task(info, source, vocabulary=vocabulary, scoring=False,
                    metric_fns=[metrics.rouge, metrics.bleu])


def register_all(vocabulary: Optional[seqio.Vocabulary] = None) -> list[str]:
  """Registers the 6 training and 5 composed tasks (T5's vocabulary unless another is given)."""
  vocabulary = vocabulary or vocab.T5_VOCABULARY
  train_splits = ("train", "validation")
  _add(SUMMARY_TASK, "xsum", None, compositional.SUMMARY_PROMPT, train_splits, "train",
       compositional.summary_examples, vocabulary)
  for lang in compositional.LANGUAGES:
    _add(translation_task(lang),
         "tatoeba",
         f"eng-{lang}",
         compositional.translation_instruction(lang),
         train_splits,
         "train",
         lambda split, lang=lang: compositional.translation_examples(lang, split),
         vocabulary)
    _add(composed_task(lang), "xlsum", lang, compositional.composed_instruction(lang),
         ("validation",), "heldout",
         lambda split, lang=lang: compositional.composed_examples(lang, split), vocabulary)
  return train_tasks() + eval_tasks()
