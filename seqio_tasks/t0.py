"""The paper's T0 grid as seqio tasks: 296 training prompts, 113 held-out prompts, dataset tasks.

For every prompt: `<task>` (inputs -> target, the prompt expert's data) and, when the template has
answer choices, `<task>_score_eval` (rank classification). For each of the 36 training datasets:
`<ds>[_<subset>]_all_prompts` (all its prompts concatenated: the adapter dataset expert) and
`<ds>[_<subset>]_random_prompt` (one seeded random prompt per row: the full-fine-tuning dataset
expert). Sources: P3-layout TFRecords under P3_DIR when present, else promptsource templates over
raw rows. Templates are loaded at first use, never at registration.
"""

from __future__ import annotations

import functools
import itertools
from typing import Optional

from seqio_tasks import metrics
from seqio_tasks import names
from seqio_tasks import provenance
from seqio_tasks import registry
from seqio_tasks import seen_eval
from seqio_tasks import vocab
from seqio_tasks.sources import canonical
from seqio_tasks.sources import prompted


def _prompt_source(spec: names.PromptSpec, *, name: str, dir_names, scoring: bool
                   ) -> canonical.CanonicalSource:
  split_map = spec.split_map

  def python_fn(split: str):
    return prompted.iter_prompt_examples(
        task=spec.task, dataset=spec.dataset, subset=spec.subset, prompt=spec.prompt, split=split,
        source_split=split_map.get(split, split), scoring=scoring)

  return canonical.CanonicalSource(name=name, splits=tuple(split_map), python_fn=python_fn,
                                   dataset=spec.dataset, subset=spec.subset, prompt=spec.prompt,
                                   dir_names=dir_names,
                                   split_aliases=seen_eval.p3_split_aliases(spec.dataset)
                                   if spec.role == "train" else None)


def _info(spec: names.PromptSpec, name: str, kind: str, **overrides) -> provenance.TaskInfo:
  fields = dict(name=name, kind=kind, source="promptsource", dataset=spec.dataset,
                subset=spec.subset, prompt=spec.prompt, role=spec.role,
                original_task=spec.original_task, eval_dataset=spec.eval_dataset,
                has_choices=spec.answer_choices, splits=tuple(spec.split_map),
                metrics=spec.metrics)
  fields.update(overrides)
  return provenance.TaskInfo(**fields)


def register_prompt(spec: names.PromptSpec) -> list[str]:
  """Registers `<task>` and, for templates with answer choices, `<task>_score_eval`."""
  added = [spec.task]
  registry.add_task(_info(spec, spec.task, "prompt"),
                    _prompt_source(spec, name=spec.task, dir_names=(spec.task,), scoring=False),
                    vocabulary=vocab.T5_VOCABULARY, scoring=False,
                    metric_fns=metrics.metrics_for(spec.metrics))
  if spec.answer_choices:
    score = names.score_eval_name(spec.task)
    # The base task's grouped rows first (read tf-native); a `_score_eval` directory may hold
    # P3's pre-expanded rows, which are regrouped.
    source = _prompt_source(spec, name=score, dir_names=(spec.task, score),
                            scoring=True)
    registry.add_task(_info(spec, score, "score_eval", base_task=spec.task), source,
                      vocabulary=vocab.T5_VOCABULARY, scoring=True,
                      num_classes=len(spec.fixed_choices) if spec.fixed_choices else None)
    added.append(score)
  return added


def _dataset_source(name: str, specs: list[names.PromptSpec], random_prompt: bool
                    ) -> canonical.CanonicalSource:
  first = specs[0]
  split_map = first.split_map
  members = [(s.task, s.prompt) for s in specs]

  def python_fn(split: str):
    source_split = split_map.get(split, split)
    if random_prompt:
      return prompted.iter_random_prompt_examples(
          name=name, members=members, dataset=first.dataset, subset=first.subset,
          source_split=source_split)
    member_sources = [_prompt_source(s, name=s.task, dir_names=(s.task,), scoring=False)
                      for s in specs]
    return itertools.chain.from_iterable(m.iter_examples(split) for m in member_sources)

  def tf_fn(split: str, shard_info):
    # All prompts: concatenate the members' TFRecord datasets when every member has them.
    if random_prompt:
      return None
    member_sources = [_prompt_source(s, name=s.task, dir_names=(s.task,), scoring=False)
                      for s in specs]
    if not all(m.tfrecord_dir(split) for m in member_sources):
      return None
    datasets = [m.get_dataset(split, shard_info=shard_info) for m in member_sources]
    return functools.reduce(lambda a, b: a.concatenate(b), datasets)

  return canonical.CanonicalSource(name=name, splits=tuple(split_map), python_fn=python_fn,
                                   tf_fn=tf_fn, dataset=first.dataset, subset=first.subset,
                                   prompt="" if not random_prompt else "random", dir_names=(name,))


def register_dataset_tasks(dataset: str, subset: Optional[str]) -> list[str]:
  """Registers `<ds>[_<subset>]_all_prompts` and `<ds>[_<subset>]_random_prompt`."""
  specs = [s for s in names.train_prompts() if (s.dataset, s.subset) == (dataset, subset)]
  prefix = names.dataset_task_prefix(dataset, subset)
  added = []
  for suffix, random_prompt in ((names.ALL_PROMPTS_SUFFIX, False),
                                (names.RANDOM_PROMPT_SUFFIX, True)):
    name = prefix + suffix
    info = provenance.TaskInfo(
        name=name, kind="random_prompt" if random_prompt else "all_prompts", source="promptsource",
        dataset=dataset, subset=subset, prompt=None, role="train", eval_dataset=prefix,
        has_choices=False, splits=tuple(specs[0].split_map), prompts=tuple(s.task for s in specs))
    registry.add_task(info, _dataset_source(name, specs, random_prompt),
                      vocabulary=vocab.T5_VOCABULARY, scoring=False)
    added.append(name)
  return added


def register_all() -> dict[str, list[str]]:
  """Registers the whole grid; returns {'train': [...], 'heldout': [...], 'dataset': [...]}."""
  out: dict[str, list[str]] = {"train": [], "heldout": [], "dataset": []}
  for spec in names.train_prompts():
    out["train"] += register_prompt(spec)
  for spec in names.heldout_prompts():
    out["heldout"] += register_prompt(spec)
  for dataset, subset in names.train_datasets():
    out["dataset"] += register_dataset_tasks(dataset, subset)
  return out
