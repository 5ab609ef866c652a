"""Continual-learning (CT0) tasks from local files: JSONL rows plus a user-supplied templates file.

promptsource 0.2.3 has none of CT0's prompts and their data is not on the registries, so each
dataset lives under CONTINUAL_DIR as

    <dir>/<dataset>/templates.yaml          promptsource's YAML format (user-supplied)
    <dir>/<dataset>/{train,validation,test}.jsonl   rows with at least `inputs` and `targets`

and each (dataset, template) pair of `CT0_PROMPTS` becomes the task `<dataset>_<template>`
(t-zero naming). Metrics: ROUGE (rouge-score) and BLEU (sacrebleu).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

from seqio_tasks import settings
from seqio_tasks import templates as templates_lib
from seqio_tasks.sources import prompted
from seqio_tasks.sources import raw

# The paper's 10 continual experts over the 8 CT0 datasets (dataset, training template).
CT0_PROMPTS: tuple[tuple[str, str], ...] = (
    ("wiki_auto", "simplification_1"),
    ("ct0_gigaword", "constrain_contain+make_a_title"),
    ("ct0_gigaword", "constrain_end+make_a_title"),
    ("ct0_gigaword", "constrain_start+make_a_title"),
    ("haiku", "do_nothing"),
    ("covid_qa", "covid_qa_deepset"),
    ("eli5", "generate_a_question_1"),
    ("empathetic_dialogues", "dialogue_with_emotion"),
    ("esnli", "explain_why"),
    ("twitter_top20", "tweet_as+about"),
)
SPLITS = ("train", "validation", "test")


def dataset_dir(dataset: str) -> str:
  return os.path.join(settings.get_path("CONTINUAL_DIR"), dataset)


def templates_path(dataset: str) -> str:
  return os.path.join(dataset_dir(dataset), "templates.yaml")


def split_path(dataset: str, split: str) -> str:
  return os.path.join(dataset_dir(dataset), f"{split}.jsonl")


def missing_files(dataset: str, splits=SPLITS) -> list[str]:
  """The files a continual dataset needs that are absent (for `tasks check`)."""
  wanted = [templates_path(dataset)] + [split_path(dataset, s) for s in splits]
  return [p for p in wanted if not os.path.exists(p)]


def _rows(dataset: str, subset: Optional[str], split: str) -> Iterator[dict[str, Any]]:
  del subset
  path = split_path(dataset, split)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"continual data file {path!r} does not exist; write {dataset}'s {split} rows there as "
        f"JSONL with 'inputs' and 'targets' (set {settings.env_var('CONTINUAL_DIR')} to move it).")
  yield from raw._iter_jsonl(path)  # pylint: disable=protected-access


def iter_examples(*, task: str, dataset: str, prompt: str, split: str) -> Iterator[dict[str, Any]]:
  """Canonical examples of one continual prompt task."""
  all_templates = templates_lib.load_templates_file(templates_path(dataset))
  if prompt not in all_templates:
    raise KeyError(f"{templates_path(dataset)} has no template named {prompt!r}; it has "
                   f"{sorted(all_templates)}.")
  yield from prompted.iter_prompt_examples(
      task=task, dataset=dataset, subset=None, prompt=prompt, split=split, source_split=split,
      template=all_templates[prompt], rows_fn=_rows)
