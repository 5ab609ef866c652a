"""Aggregation of rank-classification outcomes: hand-computed means/medians, ANLI as three datasets,
bootstrap reproducibility, shared resamples across a dataset's prompts, score normalisations."""

import numpy as np
import pytest

from expert_t5x import aggregation


def _outcomes(task, dataset, correct, ids=None):
  correct = np.asarray(correct, bool)
  ids = np.arange(correct.size) if ids is None else np.asarray(ids)
  return aggregation.PromptOutcomes(task, dataset, task, ids, correct)


def _hand_example():
  # Accuracies: anli_r1 prompts 50 and 100, anli_r2 0, anli_r3 100, cb 25, 50, 100.
  return [
      _outcomes("anli_a_r1", "anli_r1", [1, 0, 1, 0]),
      _outcomes("anli_b_r1", "anli_r1", [1, 1, 1, 1]),
      _outcomes("anli_a_r2", "anli_r2", [0, 0]),
      _outcomes("anli_a_r3", "anli_r3", [1, 1, 1]),
      _outcomes("cb_a", "cb", [1, 0, 0, 0]),
      _outcomes("cb_b", "cb", [1, 1, 0, 0]),
      _outcomes("cb_c", "cb", [1, 1, 1, 1]),
  ]


def test_aggregate_hand_computed_with_anli_rounds_as_three_datasets():
  # Hand computation: dataset means r1 75, r2 0, r3 100, cb 175/3; medians r1 75, r2 0, r3 100,
  # cb 50. Overall over 4 datasets (ANLI counts three times).
  out = aggregation.aggregate(_hand_example())
  assert out["num_datasets"] == 4
  assert out["datasets"]["anli_r1"]["mean"] == pytest.approx(75.0)
  assert out["datasets"]["cb"]["mean"] == pytest.approx(175 / 3)
  assert out["datasets"]["cb"]["median"] == pytest.approx(50.0)
  assert out["mean"] == pytest.approx((75 + 0 + 100 + 175 / 3) / 4)
  assert out["median"] == pytest.approx((75 + 0 + 100 + 50) / 4)
  assert out["prompts"]["cb_b"]["accuracy"] == pytest.approx(50.0)
  # Pooling ANLI as one dataset would give a different headline: the rounds really count apart.
  pooled = aggregation.aggregate_accuracies(
      {o.task: o.accuracy for o in _hand_example()},
      {o.task: ("anli" if o.dataset.startswith("anli") else o.dataset) for o in _hand_example()})
  assert pooled["num_datasets"] == 2 and pooled["mean"] != pytest.approx(out["mean"])


def test_aggregate_skips_prompts_without_scored_examples():
  out = aggregation.aggregate([_outcomes("a", "d", [1, 0]), _outcomes("b", "d", [])])
  assert out["datasets"]["d"] == {"mean": 50.0, "median": 50.0, "num_prompts": 1}
  assert np.isnan(out["prompts"]["b"]["accuracy"])


def test_bootstrap_is_reproducible_and_seed_dependent():
  entries = {"base": _hand_example()}
  a = aggregation.bootstrap(entries, num_samples=300, seed=3)
  b = aggregation.bootstrap(entries, num_samples=300, seed=3)
  c = aggregation.bootstrap(entries, num_samples=300, seed=4)
  assert a == b
  assert a["base"]["mean"] != c["base"]["mean"]
  lo, hi = a["base"]["mean"]
  assert lo <= aggregation.aggregate(_hand_example())["mean"] <= hi


def test_bootstrap_resamples_example_ids_shared_by_prompts():
  rng = np.random.default_rng(0)
  first = rng.random(40) < 0.5
  # Prompt q is the complement of p on the same example ids: under one shared resample, the
  # dataset mean is exactly 50 in every replicate; independent resamples would spread it.
  entries = {"e": [_outcomes("p", "d", first), _outcomes("q", "d", ~first)]}
  out = aggregation.bootstrap(entries, num_samples=200, seed=0)["e"]
  assert out["datasets"]["d"]["mean"] == [50.0, 50.0]
  assert out["prompts"]["p"][0] < out["prompts"]["p"][1]
  # Two entries with identical outcomes get identical intervals (paired resamples).
  twin = aggregation.bootstrap({"x": entries["e"], "y": entries["e"]}, num_samples=50, seed=1)
  assert twin["x"] == twin["y"]


def test_bootstrap_equals_a_direct_loop():
  # Independent re-implementation: per dataset (sorted), B x n draws from one generator, then
  # each replicate recomputes every prompt, dataset mean/median and the mean over datasets.
  outs = _hand_example()
  b, seed = 64, 7
  rng = np.random.default_rng(seed)
  datasets = sorted({o.dataset for o in outs})
  draws = {}
  for d in datasets:
    ids = np.unique(np.concatenate([o.example_ids for o in outs if o.dataset == d]))
    draws[d] = ids[rng.integers(0, ids.size, size=(b, ids.size))]
  means, medians = [], []
  for r in range(b):
    ds_mean, ds_median = [], []
    for d in datasets:
      accs = []
      for o in outs:
        if o.dataset == d:
          lookup = dict(zip(o.example_ids.tolist(), o.correct.tolist()))
          accs.append(100.0 * np.mean([lookup[i] for i in draws[d][r]]))
      ds_mean.append(np.mean(accs))
      ds_median.append(np.median(accs))
    means.append(np.mean(ds_mean))
    medians.append(np.mean(ds_median))
  got = aggregation.bootstrap({"e": outs}, num_samples=b, seed=seed)["e"]
  np.testing.assert_allclose(got["mean"], np.percentile(means, [2.5, 97.5]), rtol=1e-12)
  np.testing.assert_allclose(got["median"], np.percentile(medians, [2.5, 97.5]), rtol=1e-12)


def test_predict_ties_go_to_lowest_index_and_absent_choices_lose():
  scores = np.array([[-1.0, -0.5, -0.5], [-np.inf, -3.0, -np.inf], [-2.0, -2.0, -2.0]])
  np.testing.assert_array_equal(aggregation.predict(scores), [1, 1, 0])


def test_per_char_divides_by_choice_characters():
  # lm-eval acc_norm: log-likelihood / len(choice string).
  got = aggregation.per_char_scores(np.array([-6.0, -6.0, -1.0]), ["yes", "maybe", ""])
  np.testing.assert_allclose(got, [-2.0, -1.2, -1.0])
  assert aggregation.predict(got) == 2


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="scoring must be one of"):
    aggregation.check_scoring("acc_norm")
  with pytest.raises(ValueError, match="duplicate example ids"):
    _outcomes("t", "d", [1, 0], ids=[3, 3])
  with pytest.raises(KeyError, match="has no dataset"):
    aggregation.aggregate_accuracies({"t": 1.0}, {})
  with pytest.raises(ValueError, match="num_samples"):
    aggregation.bootstrap({"e": _hand_example()}, num_samples=0)


def test_accuracy_matrix():
  entries = {"a": [_outcomes("p1", "d", [1, 1]), _outcomes("p2", "d", [0, 1])],
             "b": [_outcomes("p1", "d", [0, 0])]}
  acc, experts, prompts = aggregation.accuracy_matrix(entries, ["p1", "p2"])
  assert experts == ["a", "b"] and prompts == ["p1", "p2"]
  np.testing.assert_array_equal(acc[0], [100.0, 50.0])
  assert acc[1, 0] == 0.0 and np.isnan(acc[1, 1])
