"""Aggregates rank-classification outcomes: prompt accuracy, dataset and overall means, bootstrap.

The paper's protocol (and T0's), fixed here once:

1. **Prompt accuracy** = 100 x the fraction of a prompt's scored examples whose argmax choice
   (ties to the lowest index) is the gold choice.
2. **Dataset score** = the mean of its prompts' accuracies (the *median* variant takes the median,
   the T0 paper's plots).
3. **Overall** = the unweighted mean over datasets. ANLI's rounds R1/R2/R3 are three datasets (their
   tasks carry `eval_dataset` anli_r1/r2/r3), which gives the paper's 11-dataset mean.

**Bootstrap**: B replicates from `numpy.random.default_rng(seed)`. For each dataset (in sorted name
order) the example ids of that dataset are resampled with replacement, and the *same* resample
weights every prompt of the dataset (prompts render the same examples), then the whole
aggregation is recomputed. Intervals are the 2.5 / 97.5 percentiles. Every entry (base, each
expert) sees the same resamples, so intervals of different experts are paired.

Score normalisations besides the paper's sum: `mean` (per target token, done by the model) and
`per_char` (lm-eval's `acc_norm`: the summed log-prob divided by the choice string's length in
characters), applied here from the choice strings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

SCORINGS = ("sum", "mean", "per_char")
DEFAULT_BOOTSTRAP_SAMPLES = 1000
PERCENTILES = (2.5, 97.5)
# Replicates per block when building resample weights (bounds memory to block x num_ids floats).
_BLOCK = 125


def check_scoring(scoring: str) -> str:
  if scoring not in SCORINGS:
    raise ValueError(f"scoring must be one of {SCORINGS}; got {scoring!r} (the paper's protocol "
                     "is 'sum').")
  return scoring


def per_char_scores(scores: np.ndarray, choices: Sequence[str]) -> np.ndarray:
  """`[K]` summed log-probs divided by each choice's length in characters (lm-eval `acc_norm`).

  An empty choice string keeps its summed score (nothing to divide by).
  """
  lengths = np.array([max(len(c), 1) for c in choices], np.float64)
  scores = np.asarray(scores, np.float64)
  return scores[..., :len(choices)] / lengths


def predict(scores: np.ndarray) -> np.ndarray:
  """Argmax over the last axis, ties to the lowest index (absent choices are -inf)."""
  # np.argmax returns the first maximum, which is the tie rule of the paper's code.
  return np.argmax(np.asarray(scores), axis=-1)


@dataclasses.dataclass
class PromptOutcomes:
  """The scored examples of one (entry, prompt task).

  Attributes:
    task: the task name (one eval prompt).
    dataset: the dataset it aggregates under (`TaskInfo.eval_dataset`; ANLI rounds separate).
    prompt: the prompt (template) name.
    example_ids: `[n]` int64 ids of the scored (not excluded) examples.
    correct: `[n]` bool, whether the prediction equals the gold choice.
  """
  task: str
  dataset: str
  prompt: str
  example_ids: np.ndarray
  correct: np.ndarray

  def __post_init__(self):
    self.example_ids = np.asarray(self.example_ids, np.int64).reshape(-1)
    self.correct = np.asarray(self.correct, bool).reshape(-1)
    if self.example_ids.shape != self.correct.shape:
      raise ValueError(f"PromptOutcomes {self.task!r}: {self.example_ids.size} example ids but "
                       f"{self.correct.size} outcomes.")
    if len(np.unique(self.example_ids)) != self.example_ids.size:
      raise ValueError(f"PromptOutcomes {self.task!r}: duplicate example ids; each example must be "
                       "scored once per prompt.")

  @property
  def accuracy(self) -> float:
    """Percent correct (NaN when no example was scored)."""
    return 100.0 * float(self.correct.mean()) if self.correct.size else float("nan")


def _by_dataset(outcomes: Sequence[PromptOutcomes]) -> dict[str, list[PromptOutcomes]]:
  groups: dict[str, list[PromptOutcomes]] = {}
  for o in outcomes:
    if o.correct.size:  # A prompt with no scored example has no accuracy to aggregate.
      groups.setdefault(o.dataset, []).append(o)
  return {d: groups[d] for d in sorted(groups)}


def aggregate_accuracies(prompt_accuracy: Mapping[str, float],
                         dataset_of: Mapping[str, str]) -> dict:
  """Point estimates from per-prompt accuracies.

  Args:
    prompt_accuracy: {task: accuracy in percent}.
    dataset_of: {task: dataset}.

  Returns:
    {'datasets': {dataset: {'mean', 'median', 'num_prompts'}}, 'mean', 'median', 'num_datasets'}:
    `mean` = mean over datasets of the dataset means; `median` = mean over datasets of the dataset
    medians.
  """
  per_dataset: dict[str, list[float]] = {}
  for task, acc in prompt_accuracy.items():
    if task not in dataset_of:
      raise KeyError(f"aggregate: task {task!r} has no dataset; pass dataset_of[{task!r}].")
    if not np.isnan(acc):
      per_dataset.setdefault(dataset_of[task], []).append(float(acc))
  datasets = {d: {"mean": float(np.mean(v)), "median": float(np.median(v)), "num_prompts": len(v)}
              for d, v in sorted(per_dataset.items())}
  if not datasets:
    return {"datasets": {}, "mean": float("nan"), "median": float("nan"), "num_datasets": 0}
  return {"datasets": datasets,
          "mean": float(np.mean([d["mean"] for d in datasets.values()])),
          "median": float(np.mean([d["median"] for d in datasets.values()])),
          "num_datasets": len(datasets)}


def aggregate(outcomes: Sequence[PromptOutcomes]) -> dict:
  """`aggregate_accuracies` over outcomes, plus each prompt's accuracy and example count."""
  prompts = {o.task: {"dataset": o.dataset, "prompt": o.prompt, "accuracy": o.accuracy,
                      "num_examples": int(o.correct.size)} for o in outcomes}
  out = aggregate_accuracies({t: p["accuracy"] for t, p in prompts.items()},
                             {t: p["dataset"] for t, p in prompts.items()})
  out["prompts"] = prompts
  return out


def _resample_weights(num_ids: int, num_samples: int, rng: np.random.Generator):
  """Yields `[block, num_ids]` float64 counts: how often each id is drawn in each replicate."""
  for start in range(0, num_samples, _BLOCK):
    block = min(_BLOCK, num_samples - start)
    draws = rng.integers(0, num_ids, size=(block, num_ids))
    # Offsets put each replicate's draws in its own row of one flat histogram.
    flat = (draws + np.arange(block)[:, None] * num_ids).reshape(-1)
    yield np.bincount(flat, minlength=block * num_ids).reshape(block, num_ids).astype(np.float64)


def _prompt_replicates(grouped: Mapping[str, Mapping[str, list[PromptOutcomes]]],
                       num_samples: int, rng: np.random.Generator
                       ) -> dict[str, dict[str, np.ndarray]]:
  """{entry: {task: [B] replicate accuracies}}; every entry and prompt of a dataset is resampled
  with the same example weights (shared resamples, so differences are paired)."""
  datasets = sorted({d for g in grouped.values() for d in g})
  prompt_reps: dict[str, dict[str, np.ndarray]] = {e: {} for e in grouped}
  for dataset in datasets:
    ids = np.unique(np.concatenate([o.example_ids for g in grouped.values()
                                    for o in g.get(dataset, [])]))
    # Per (entry, prompt): correctness and presence aligned to `ids` (prompts may miss some ids).
    columns = []
    for entry, g in grouped.items():
      for o in g.get(dataset, []):
        pos = np.searchsorted(ids, o.example_ids)
        correct, present = np.zeros(ids.size), np.zeros(ids.size)
        correct[pos], present[pos] = o.correct, 1.0
        columns.append((entry, o.task, correct, present))
    correct_m = np.stack([c[2] for c in columns], 1)  # [n, columns]
    present_m = np.stack([c[3] for c in columns], 1)
    blocks = []
    for weights in _resample_weights(ids.size, num_samples, rng):
      hits, seen = weights @ correct_m, weights @ present_m  # [block, columns]
      with np.errstate(invalid="ignore", divide="ignore"):
        blocks.append(100.0 * hits / seen)
    reps = np.concatenate(blocks, 0)  # [B, columns]
    for j, (entry, task, _, _) in enumerate(columns):
      prompt_reps[entry][task] = reps[:, j]
  return prompt_reps


def _dataset_replicates(members: Sequence[PromptOutcomes], reps: Mapping[str, np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
  stack = np.stack([reps[o.task] for o in members], 1)  # [B, prompts]
  return np.nanmean(stack, 1), np.nanmedian(stack, 1)


def bootstrap(entries: Mapping[str, Sequence[PromptOutcomes]],
              num_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0,
              percentiles: Sequence[float] = PERCENTILES) -> dict[str, dict]:
  """Bootstrap intervals for several entries (base, experts) under shared resamples.

  Args:
    entries: {entry id: its prompt outcomes}.
    num_samples: B, the number of replicates.
    seed: seeds `numpy.random.default_rng`.
    percentiles: the interval's lower and upper percentiles.

  Returns:
    {entry id: {'mean': [lo, hi], 'median': [lo, hi], 'datasets': {d: {'mean': [lo, hi],
    'median': [lo, hi]}}, 'prompts': {task: [lo, hi]}}}.
  """
  if num_samples < 1:
    raise ValueError(f"bootstrap num_samples must be >= 1; got {num_samples}.")
  rng = np.random.default_rng(seed)
  grouped = {e: _by_dataset(o) for e, o in entries.items()}
  prompt_reps = _prompt_replicates(grouped, num_samples, rng)
  lo_p, hi_p = percentiles

  def interval(values: np.ndarray) -> list[float]:
    return [float(np.nanpercentile(values, lo_p)), float(np.nanpercentile(values, hi_p))]

  out: dict[str, dict] = {}
  for entry, g in grouped.items():
    ds_mean, ds_median = {}, {}
    for dataset, members in g.items():
      ds_mean[dataset], ds_median[dataset] = _dataset_replicates(members, prompt_reps[entry])
    result = {"datasets": {d: {"mean": interval(ds_mean[d]), "median": interval(ds_median[d])}
                           for d in g},
              "prompts": {t: interval(v) for t, v in prompt_reps[entry].items()}}
    if g:
      result["mean"] = interval(np.mean(np.stack(list(ds_mean.values()), 1), 1))
      result["median"] = interval(np.mean(np.stack(list(ds_median.values()), 1), 1))
    else:
      result["mean"] = result["median"] = [float("nan"), float("nan")]
    out[entry] = result
  return out


def bootstrap_difference(a: Sequence[PromptOutcomes], b: Sequence[PromptOutcomes],
                         num_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0,
                         percentiles: Sequence[float] = PERCENTILES) -> dict[str, Any]:
  """Paired bootstrap of mean(a) - mean(b) (the paper's aggregation: prompts, then datasets).

  Both sides are resampled with the same example weights, so `a` and `b` should score the same
  examples of the same datasets (for example two methods on the same prompts).

  Returns:
    {'difference': the observed difference in points, 'ci': [lo, hi]}.
  """
  if num_samples < 1:
    raise ValueError(f"bootstrap num_samples must be >= 1; got {num_samples}.")
  grouped = {"a": _by_dataset(a), "b": _by_dataset(b)}
  if sorted(grouped["a"]) != sorted(grouped["b"]):
    raise ValueError(f"bootstrap_difference: the two sides cover other datasets "
                     f"({sorted(grouped['a'])} vs {sorted(grouped['b'])}); compare like with like.")
  reps = _prompt_replicates(grouped, num_samples, np.random.default_rng(seed))
  sides = []
  for side in ("a", "b"):
    means = [_dataset_replicates(m, reps[side])[0] for m in grouped[side].values()]
    sides.append(np.mean(np.stack(means, 1), 1))
  delta = sides[0] - sides[1]
  observed = aggregate(list(a))["mean"] - aggregate(list(b))["mean"]
  return {"difference": float(observed),
          "ci": [float(np.nanpercentile(delta, percentiles[0])),
                 float(np.nanpercentile(delta, percentiles[1]))]}


def accuracy_matrix(entries: Mapping[str, Sequence[PromptOutcomes]],
                    prompt_ids: Optional[Sequence[str]] = None) -> tuple[np.ndarray, list[str],
                                                                         list[str]]:
  """`acc[E, P]` (percent; NaN where an entry lacks a prompt), entry ids and prompt ids."""
  expert_ids = list(entries)
  if prompt_ids is None:
    prompt_ids = sorted({o.task for outs in entries.values() for o in outs})
  col = {t: j for j, t in enumerate(prompt_ids)}
  acc = np.full((len(expert_ids), len(prompt_ids)), np.nan, np.float64)
  for i, e in enumerate(expert_ids):
    for o in entries[e]:
      if o.task in col:
        acc[i, col[o.task]] = o.accuracy
  return acc, expert_ids, list(prompt_ids)


def oracle(acc: np.ndarray, expert_ids: Sequence[str], prompt_ids: Sequence[str],
           dataset_of: Mapping[str, str]) -> dict:
  """The oracle (an upper bound that uses labels): the best expert per prompt, then aggregated.

  As the paper's oracle rows: for each eval prompt, the expert of highest accuracy on it (ties to
  the first in `expert_ids`; NaN cells never win), then the usual aggregation of those
  accuracies (mean over a dataset's prompts, mean over datasets; median beside it).

  Args:
    acc: `[E, P]` accuracies in percent (NaN where an expert lacks a prompt), as in matrix.npz.
    expert_ids: the E expert ids.
    prompt_ids: the P prompt (task) ids.
    dataset_of: {prompt id: its dataset}.

  Returns:
    {'prompts': [{'task', 'dataset', 'expert', 'accuracy', 'candidates'}], 'datasets', 'mean',
     'median', 'num_datasets', 'num_experts'}; a prompt no expert scored has expert None.
    `candidates` ranks the experts that scored the prompt by accuracy (ties: `expert_ids` order) as
    [{'expert', 'accuracy'}], the format `expert-t5x merge --retrieval` reads: the oracle top-k
    merge.
  """
  acc = np.asarray(acc, np.float64)
  if acc.shape != (len(expert_ids), len(prompt_ids)):
    raise ValueError(f"oracle: acc has shape {acc.shape} but there are {len(expert_ids)} experts "
                     f"and {len(prompt_ids)} prompts; pass the matrix with its own ids.")
  missing = [t for t in prompt_ids if t not in dataset_of]
  if missing:
    raise KeyError(f"oracle: prompts {missing[:5]} have no dataset; pass dataset_of for every "
                   "prompt (results.json 'tasks' holds them).")
  prompts, best_acc = [], {}
  for j, task in enumerate(prompt_ids):
    column = acc[:, j]
    if np.all(np.isnan(column)):
      prompts.append({"task": task, "dataset": dataset_of[task], "expert": None,
                      "accuracy": float("nan"), "candidates": []})
      continue
    best = int(np.nanargmax(column))  # The first maximum: ties go to the earlier expert.
    best_acc[task] = float(column[best])
    scored = [i for i in range(len(expert_ids)) if not np.isnan(column[i])]
    ranked = sorted(scored, key=lambda i: -column[i])  # stable: ties keep expert order
    prompts.append({"task": task, "dataset": dataset_of[task], "expert": expert_ids[best],
                    "accuracy": best_acc[task],
                    "candidates": [{"expert": expert_ids[i], "accuracy": float(column[i])}
                                   for i in ranked]})
  summary = aggregate_accuracies(best_acc, dataset_of)
  summary.update({"prompts": prompts, "num_experts": len(expert_ids)})
  return summary
