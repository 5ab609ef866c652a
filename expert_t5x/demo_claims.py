"""The demo's claims: what the synthetic setup is designed to show, measured, with a verdict.

Each claim is one of the paper's arguments for distributed experts, tested where a tiny model can
test it. A claim has a headline number with a paired bootstrap interval (both sides resampled
with the same example weights: `aggregation.bootstrap_difference`) and a verdict: it *holds* when
the interval clears its threshold (lies above 0, or above chance), and *does not hold* otherwise,
including when the interval straddles it. A verdict therefore needs the effect to be clear, so
runs that differ only in seed or thread count give the same verdicts.

Every function takes `PromptOutcomes` (or prediction records) read back from the evaluator's own
files; nothing here scores a model.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from expert_t5x import aggregation

HOLDS = "holds"
FAILS = "does not hold"
CLAIM_IDS = ("experts_learn", "no_negative_transfer", "continual_unchanged", "multitask_forgets",
             "retrieval_unseen_prompts", "merging_composition")


def make_claim(claim_id: str, title: str, statement: str, rule: str, value: float,
               ci: Optional[Sequence[float]], holds: bool, unit: str = "points",
               details: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """One claim as the summary and results.json record it."""
  if claim_id not in CLAIM_IDS:
    raise ValueError(f"unknown demo claim {claim_id!r}; expected one of {CLAIM_IDS}.")
  return {"id": claim_id, "title": title, "statement": statement, "rule": rule,
          "value": float(value), "ci": None if ci is None else [float(c) for c in ci],
          "unit": unit, "verdict": HOLDS if holds else FAILS, "details": dict(details or {})}


def verdict_line(claim: Mapping[str, Any]) -> str:
  """The report's one-line verdict of a claim (the CI check reads these back)."""
  ci = claim["ci"]
  interval = f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""
  return (f"- **{claim['verdict']}** ({claim['id']}): {claim['statement']}: "
          f"{claim['value']:.1f} {claim['unit']}{interval}; rule: {claim['rule']}.")


def _difference(a: Sequence[aggregation.PromptOutcomes], b: Sequence[aggregation.PromptOutcomes],
                samples: int, seed: int) -> dict[str, Any]:
  return aggregation.bootstrap_difference(a, b, max(1, samples), seed)


def experts_learn(experts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Every prompt expert beats chance on its own prompt: the smallest lower interval bound minus
  chance is above 0."""
  pes = [e for e in experts if e["kind"] == "prompt"]
  margins = [((e["own_ci"] or [e["own_accuracy"]] * 2)[0] - 100.0 * e["chance"], e) for e in pes]
  worst, expert = min(margins, key=lambda m: m[0])
  ci = expert["own_ci"] or [expert["own_accuracy"]] * 2
  chance = 100.0 * expert["chance"]
  passed = sum(int(m > 0) for m, _ in margins)
  return make_claim(
      "experts_learn", "Experts learn their tasks",
      "the weakest prompt expert's accuracy on its own prompt, minus chance",
      "every prompt expert's lower bound above chance", expert["own_accuracy"] - chance,
      [ci[0] - chance, ci[1] - chance], passed == len(pes),
      details={"passed": passed, "total": len(pes), "weakest": expert["id"]})


def no_negative_transfer(train_outcomes: Mapping[tuple[str, str], aggregation.PromptOutcomes],
                         experts_of: Mapping[str, Sequence[str]], conflicting: Sequence[str],
                         multitask_id: str, samples: int, seed: int) -> dict[str, Any]:
  """Each task under its own prompt experts vs under the multitask model, on the training
  prompts; the verdict is on the conflicting tasks.

  Args:
    train_outcomes: {(entry id, eval task): outcomes} of the training prompts.
    experts_of: {dataset: its prompt experts}; expert `e` is scored on `e + '_score_eval'`.
    conflicting: the datasets whose label conventions conflict.
  """
  rows, own_all, mt_all = {}, {}, {}
  for dataset, pes in experts_of.items():
    own = [train_outcomes[(e, e + "_score_eval")] for e in pes]
    mt = [train_outcomes[(multitask_id, e + "_score_eval")] for e in pes]
    own_all[dataset], mt_all[dataset] = own, mt
    d = _difference(own, mt, samples, seed)
    rows[dataset] = {"expert": aggregation.aggregate(own)["mean"],
                     "multitask": aggregation.aggregate(mt)["mean"],
                     "difference": d["difference"], "ci": d["ci"],
                     "conflicting": dataset in conflicting}
  own = [o for d in conflicting for o in own_all[d]]
  mt = [o for d in conflicting for o in mt_all[d]]
  d = _difference(own, mt, samples, seed)
  return make_claim(
      "no_negative_transfer", "No negative task transfer",
      "own expert minus multitask model on the conflicting tasks' prompts", "lower bound above 0",
      d["difference"], d["ci"], d["ci"][0] > 0, details={"tasks": rows,
                                                         "conflicting": list(conflicting)})


def records_unchanged(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
                      ) -> dict[str, dict[str, Any]]:
  """{task: {'examples', 'unchanged'}}: how many examples keep bitwise-equal choice scores and
  experts between two routed evaluations' prediction records."""
  def index(records):
    return {(r["task"], r["example_id"]): r for r in records}
  a, b = index(before), index(after)
  out: dict[str, dict[str, Any]] = {}
  for key, r in a.items():
    row = out.setdefault(key[0], {"examples": 0, "unchanged": 0})
    row["examples"] += 1
    other = b.get(key)
    row["unchanged"] += int(other is not None and other["choice_scores"] == r["choice_scores"]
                            and other["expert_ids"] == r["expert_ids"])
  return out


def continual_unchanged(per_task: Mapping[str, Mapping[str, Any]], added: Sequence[str]
                        ) -> dict[str, Any]:
  """Earlier tasks' RoE scores after new experts joined the library, compared bitwise."""
  total = sum(r["examples"] for r in per_task.values())
  same = sum(r["unchanged"] for r in per_task.values())
  changed = 100.0 * (total - same) / max(1, total)
  return make_claim(
      "continual_unchanged", "Continual learning: earlier tasks unchanged",
      "earlier tasks' examples whose RoE scores changed after adding experts "
      f"({', '.join(added)})", "no example changed (bitwise)", changed, [changed, changed],
      same == total and total > 0, unit="%", details={"tasks": dict(per_task),
                                                     "examples": total, "unchanged": same})


def multitask_forgets(before: Sequence[aggregation.PromptOutcomes],
                      after: Sequence[aggregation.PromptOutcomes], samples: int, seed: int,
                      costs: Mapping[str, Any],
                      retrained: Sequence[aggregation.PromptOutcomes]) -> dict[str, Any]:
  """What the multitask model loses on the earlier prompts when fine-tuned on new tasks only;
  `retrained` (reported, no verdict): a multitask model retrained on every prompt instead."""
  d = _difference(before, after, samples, seed)
  return make_claim(
      "multitask_forgets", "Continual learning: a multitask model forgets",
      "multitask accuracy on earlier prompts before minus after fine-tuning on the new tasks",
      "lower bound above 0", d["difference"], d["ci"], d["ci"][0] > 0,
      details={"before": aggregation.aggregate(list(before))["mean"],
               "after": aggregation.aggregate(list(after))["mean"],
               "retrained": aggregation.aggregate(list(retrained))["mean"],
               "costs": dict(costs)})


def retrieval_unseen_prompts(roe: Sequence[aggregation.PromptOutcomes],
                             base: Sequence[aggregation.PromptOutcomes],
                             multitask: Sequence[aggregation.PromptOutcomes], samples: int,
                             seed: int, routing: Mapping[str, Any]) -> dict[str, Any]:
  """RoE on held-out prompts of training tasks, against the base (verdict) and the multitask
  model (reported)."""
  d = _difference(roe, base, samples, seed)
  vs_mt = _difference(roe, multitask, samples, seed)
  return make_claim(
      "retrieval_unseen_prompts", "Retrieval of Experts on unseen prompts",
      "RoE (retrieved prompt expert) minus the base on held-out prompts of training tasks",
      "lower bound above 0", d["difference"], d["ci"], d["ci"][0] > 0,
      details={"vs_multitask": vs_mt, "routing": dict(routing)})


def merging_composition(merged: Sequence[aggregation.PromptOutcomes],
                        roe: Sequence[aggregation.PromptOutcomes],
                        base: Sequence[aggregation.PromptOutcomes], samples: int, seed: int,
                        top_k: int, task: str) -> dict[str, Any]:
  """Merging the top retrieved experts against the single retrieved one on a held-out task that
  needs what two training tasks teach."""
  d = _difference(merged, roe, samples, seed)
  return make_claim(
      "merging_composition", "Merging experts on an unseen compositional task",
      f"merged top-{top_k} minus the single retrieved expert on {task}", "lower bound above 0",
      d["difference"], d["ci"], d["ci"][0] > 0,
      details={"vs_base": _difference(merged, base, samples, seed),
               "merged": aggregation.aggregate(list(merged))["mean"],
               "roe": aggregation.aggregate(list(roe))["mean"],
               "base": aggregation.aggregate(list(base))["mean"]})
