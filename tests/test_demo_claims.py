"""The demo's claims and the paired bootstrap behind them, on hand-computed outcomes."""

import numpy as np
import pytest

from expert_t5x import aggregation
from expert_t5x import demo_claims


def _o(task, dataset, correct, ids=None):
  ids = np.arange(len(correct)) if ids is None else ids
  return aggregation.PromptOutcomes(task, dataset, "p", ids, np.array(correct, bool))


def test_difference_of_identical_sides_is_exactly_zero():
  a = [_o("t1", "d1", [1, 0, 1, 1, 0]), _o("t2", "d2", [0, 0, 1])]
  d = aggregation.bootstrap_difference(a, a, 200, 0)
  assert d == {"difference": 0.0, "ci": [0.0, 0.0]}


def test_difference_follows_the_papers_aggregation():
  """Mean over a dataset's prompts, then over datasets, by hand: a = ((75 + 25) / 2 + 100) / 2
  = 75, b = ((25 + 25) / 2 + 0) / 2 = 12.5."""
  a = [_o("t1", "d1", [1, 1, 1, 0]), _o("t2", "d1", [1, 0, 0, 0]), _o("t3", "d2", [1, 1])]
  b = [_o("t1", "d1", [1, 0, 0, 0]), _o("t2", "d1", [0, 0, 0, 1]), _o("t3", "d2", [0, 0])]
  d = aggregation.bootstrap_difference(a, b, 500, 1)
  assert d["difference"] == pytest.approx(62.5)
  assert d["ci"][0] <= 62.5 <= d["ci"][1]


def test_difference_is_paired():
  """a is right wherever b is, and on two more examples: in every paired resample a >= b, so the
  interval cannot go below 0 (resampled independently, a could score 0 while b scores 100)."""
  a = [_o("t", "d", [1, 1, 1, 0])]
  b = [_o("t", "d", [1, 0, 0, 0])]
  d = aggregation.bootstrap_difference(a, b, 2000, 0)
  assert d["difference"] == 50.0
  assert 0.0 <= d["ci"][0] < 50.0 < d["ci"][1] <= 100.0


def test_difference_refuses_unlike_sides():
  with pytest.raises(ValueError, match="cover other datasets"):
    aggregation.bootstrap_difference([_o("t", "d1", [1])], [_o("t", "d2", [1])])


def _record(task, i, scores, experts=("e",)):
  return {"task": task, "example_id": i, "choice_scores": scores, "expert_ids": list(experts)}


def test_records_unchanged_compares_scores_and_experts_bitwise():
  before = [_record("t", 0, [-1.0, -2.0]), _record("t", 1, [-0.5, -0.25]),
            _record("u", 0, [-3.0, -1.0])]
  same = [dict(r) for r in before]
  assert demo_claims.records_unchanged(before, same) == {
      "t": {"examples": 2, "unchanged": 2}, "u": {"examples": 1, "unchanged": 1}}
  after = [_record("t", 0, [-1.0, -2.0000002]), _record("t", 1, [-0.5, -0.25], ("f",))]
  per_task = demo_claims.records_unchanged(before, after)
  assert per_task == {"t": {"examples": 2, "unchanged": 0}, "u": {"examples": 1, "unchanged": 0}}
  claim = demo_claims.continual_unchanged(per_task, ["demo_new"])
  assert claim["verdict"] == demo_claims.FAILS and claim["value"] == 100.0
  held = demo_claims.continual_unchanged(demo_claims.records_unchanged(before, same), ["x"])
  assert held["verdict"] == demo_claims.HOLDS and held["value"] == 0.0


def test_experts_learn_needs_every_lower_bound_above_chance():
  experts = [{"id": "a", "kind": "prompt", "own_accuracy": 90.0, "own_ci": [80.0, 97.0],
              "chance": 0.5},
             {"id": "b", "kind": "prompt", "own_accuracy": 60.0, "own_ci": [48.0, 71.0],
              "chance": 0.5},
             {"id": "m", "kind": "multitask", "own_accuracy": 10.0, "own_ci": None,
              "chance": 0.5}]
  claim = demo_claims.experts_learn(experts)
  assert claim["verdict"] == demo_claims.FAILS and claim["details"]["weakest"] == "b"
  assert claim["value"] == 10.0 and claim["ci"] == [-2.0, 21.0]
  experts[1]["own_ci"] = [52.0, 71.0]
  assert demo_claims.experts_learn(experts)["verdict"] == demo_claims.HOLDS


def test_no_negative_transfer_verdict_is_on_the_conflicting_tasks():
  ones, halves = [1] * 40, [1, 0] * 20
  train = {("pa", "pa_score_eval"): _o("pa_score_eval", "A", ones),
           ("pb", "pb_score_eval"): _o("pb_score_eval", "B", ones),
           ("mt", "pa_score_eval"): _o("pa_score_eval", "A", halves),
           ("mt", "pb_score_eval"): _o("pb_score_eval", "B", ones)}
  claim = demo_claims.no_negative_transfer(train, {"A": ["pa"], "B": ["pb"]}, ["A"], "mt", 300, 0)
  assert claim["verdict"] == demo_claims.HOLDS and claim["value"] == 50.0
  assert claim["details"]["tasks"]["B"]["difference"] == 0.0
  none = demo_claims.no_negative_transfer(train, {"A": ["pa"], "B": ["pb"]}, ["B"], "mt", 300, 0)
  assert none["verdict"] == demo_claims.FAILS  # an interval of [0, 0] does not clear 0


def test_verdict_line_and_unknown_claims():
  claim = demo_claims.make_claim("merging_composition", "M", "merged minus RoE", "lower bound > 0",
                                 -1.25, [-4.0, 2.0], False)
  assert demo_claims.verdict_line(claim) == (
      "- **does not hold** (merging_composition): merged minus RoE: -1.2 points [-4.0, 2.0]; "
      "rule: lower bound > 0.")
  with pytest.raises(ValueError, match="unknown demo claim 'x'"):
    demo_claims.make_claim("x", "", "", "", 0.0, None, True)
