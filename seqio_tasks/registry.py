"""Registers canonical-example tasks with seqio and with the provenance side registry.

Every task's source yields canonical examples; the preprocessors decide what the model sees:
generation/training tasks tokenize `inputs`/`targets`; scoring tasks first expand each example
into one row per answer choice (`rank_classification`, mode `eval`).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import seqio

from seqio_tasks import metrics
from seqio_tasks import preprocessors
from seqio_tasks import provenance
from seqio_tasks import vocab
from seqio_tasks.sources import canonical


def _make_room(kind: str, name: str, names: Sequence[str], replace: bool) -> bool:
  """Whether `name` must be removed first; a name taken without `replace` is an error (two
  registrations of one name would otherwise silently keep only the last)."""
  if name not in names:
    return False
  if not replace:
    raise ValueError(f"{kind} {name!r} is already registered; pass replace=True to replace it, or "
                     f"remove it first (seqio.{kind}Registry.remove).")
  return True


def add_task(info: provenance.TaskInfo, source: canonical.CanonicalSource, *,
             vocabulary: seqio.Vocabulary, scoring: bool,
             metric_fns: Optional[Sequence[Callable]] = None,
             num_classes: Optional[int] = None, replace: bool = False) -> None:
  """Adds one task to `seqio.TaskRegistry` and to provenance; a same-named task is an error
  unless `replace`."""
  if _make_room("Task", info.name, seqio.TaskRegistry.names(), replace):
    seqio.TaskRegistry.remove(info.name)
  if scoring:
    steps = [functools.partial(preprocessors.rank_classification_canonical, mode="eval"),
             seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(required=False),
             seqio.preprocessors.append_eos]
    metric_fns = [functools.partial(metrics.rank_classification, num_classes=num_classes)]
    postprocess = metrics.rank_classification_postprocessor
  else:
    steps = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(required=False),
             seqio.preprocessors.append_eos_after_trim]
    metric_fns = list(metric_fns or [metrics.accuracy])
    postprocess = metrics.strip_postprocessor
  seqio.TaskRegistry.add(info.name,
                         source=source,
                         output_features=vocab.output_features(vocabulary),
                         preprocessors=steps,
                         postprocess_fn=postprocess,
                         metric_fns=metric_fns)
  provenance.register(info, source.iter_examples)


def add_mixture(name: str, tasks: Sequence[str], rate: Optional[Callable] = None, *,
                replace: bool = False) -> None:
  """Adds a seqio mixture (a same-named one is an error unless `replace`); the default rate weighs
  tasks equally."""
  if _make_room("Mixture", name, seqio.MixtureRegistry.names(), replace):
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, rate or 1.0) for t in tasks])
