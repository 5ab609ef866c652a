"""Promptsource templates applied to raw rows, giving canonical examples (T0's on-the-fly route).

The example id is the row's position in its split. `choice` draws are seeded by (seed, prompt task
name, example id), so a prompt task, its `_score_eval` twin and the dataset tasks render a given
row identically. Rows that render to no target (e.g. unlabeled test rows) are skipped, as t-zero
does, and counted.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from seqio_tasks import examples as examples_lib
from seqio_tasks import seen_eval
from seqio_tasks import settings
from seqio_tasks import templates as templates_lib
from seqio_tasks.sources import raw

DEFAULT_SEED = 0

RowsFn = Callable[[str, Optional[str], str], Iterator[Mapping[str, Any]]]


def template_for(dataset: str, subset: Optional[str], prompt: str) -> templates_lib.PromptTemplate:
  return templates_lib.get_template(settings.get_path("PROMPTSOURCE_DIR"), dataset, subset, prompt)


def render_row(template: templates_lib.PromptTemplate, row: Mapping[str, Any], *, task: str,
               example_id: int, dataset: str, subset: Optional[str], prompt: str,
               seed: int = DEFAULT_SEED) -> tuple[Optional[dict[str, Any]], Optional[str]]:
  """(canonical example, None) or (None, reason it was skipped). Render errors name the example."""
  rng = templates_lib.example_rng(seed, task, example_id)
  try:
    parts, choices = template.render(row, rng=rng)
  except Exception as e:  # pylint: disable=broad-except
    where = f"{dataset}/{subset}" if subset else dataset
    raise ValueError(f"template {prompt!r} of dataset {where} failed to render example "
                     f"{example_id}: {type(e).__name__}: {e}") from e
  if len(parts) != 2:
    return None, "no '|||' separator in the rendering"
  inputs, targets = parts
  if not targets:
    return None, "empty target"
  if not inputs:
    return None, "empty input"
  return examples_lib.make_example(
      inputs=inputs, targets=targets, answer_choices=choices, example_id=example_id,
      dataset=dataset, subset=subset, prompt=prompt), None


def iter_prompt_examples(*, task: str, dataset: str, subset: Optional[str], prompt: str,
                         split: str, source_split: str, seed: int = DEFAULT_SEED,
                         template: Optional[templates_lib.PromptTemplate] = None,
                         rows_fn: RowsFn = raw.iter_rows, scoring: bool = False
                         ) -> Iterator[dict[str, Any]]:
  """Canonical examples of one prompt over one split of raw rows (the paper's row slice where its
  `validation` is one, `seen_eval.select_rows`)."""
  template = template or template_for(dataset, subset, prompt)
  rows = seen_eval.select_rows(dataset, split, rows_fn(dataset, subset, source_split))
  yield from _render_all(lambda _: (template, task, prompt), rows, dataset=dataset,
                         subset=subset, seed=seed, report_as=task, scoring=scoring)


def iter_random_prompt_examples(*, name: str, members: Sequence[tuple[str, str]], dataset: str,
                                subset: Optional[str], source_split: str, seed: int = DEFAULT_SEED,
                                rows_fn: RowsFn = raw.iter_rows) -> Iterator[dict[str, Any]]:
  """One seeded random prompt per row (the full-fine-tuning dataset expert's data).

  Args:
    name: the dataset task's name (part of the per-row prompt draw).
    members: (prompt task name, template name) pairs to draw from.
    dataset, subset: the raw dataset.
    source_split: the raw split.
    seed: drawing seed.
    rows_fn: raw row reader.
  """
  loaded = [(template_for(dataset, subset, prompt), task, prompt) for task, prompt in members]
  picks = lambda example_id: random.Random(f"{seed}/{name}/{example_id}").choice(loaded)
  yield from _render_all(picks, enumerate(rows_fn(dataset, subset, source_split)), dataset=dataset,
                         subset=subset, seed=seed, report_as=name, scoring=False)


def _render_all(picks: Callable[[int], tuple[Any, str, str]],
                rows: Iterable[tuple[int, Mapping[str, Any]]], *,
                dataset: str, subset: Optional[str], seed: int, report_as: str,
                scoring: bool) -> Iterator[dict[str, Any]]:
  """Renders each (example id = row position, row) with the (template, task, prompt) of
  `picks(example_id)`; counts and reports skips."""
  stats = examples_lib.ExampleStats()
  for example_id, row in rows:
    template, task, prompt = picks(example_id)
    ex, why = render_row(template, row, task=task, example_id=example_id, dataset=dataset,
                         subset=subset, prompt=prompt, seed=seed)
    if ex is None:
      stats.skipped[why] += 1
      continue
    stats.add(ex)
    yield ex
  stats.report(report_as, scoring)
