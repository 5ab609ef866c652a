"""rank_classification (train / eval / fewshot_eval), its metric, and a seqio.Evaluator run.

The tf.data preprocessor is compared with its pure-Python twin and with hand-written expected
rows; the metric with a direct numpy argmax over per-example score lists; the Evaluator run with
an oracle and an anti-oracle scorer whose accuracies are known (100 / 0).
"""


import numpy as np
import pytest

pytestmark = pytest.mark.tf

tf = pytest.importorskip("tensorflow")
import seqio  # noqa: E402

import seqio_tasks  # noqa: E402,F401
from seqio_tasks import examples, metrics, preprocessors  # noqa: E402

CANONICAL = [
    examples.make_example(inputs="q0", targets="b", answer_choices=["a", "b"], example_id=10,
                          dataset="d", subset="", prompt="p"),
    examples.make_example(inputs="q1", targets="z", answer_choices=["x", "y", "z"], example_id=11,
                          dataset="d", subset="", prompt="p"),
    examples.make_example(inputs="q2", targets="nope", answer_choices=["a", "b"], example_id=12,
                          dataset="d", subset="", prompt="p"),
]


def _ds():
  return tf.data.Dataset.from_generator(lambda: iter(CANONICAL),
                                        output_signature=examples.tf_output_signature())


def _py(row):
  out = {}
  for k, v in row.items():
    v = np.asarray(v)
    out[k] = (v.astype(str).tolist() if v.dtype.kind in "SO" else v.tolist())
  return out


def test_label_index_defaults_to_target_position():
  assert [e["label_index"] for e in CANONICAL] == [1, 2, -1]


@pytest.mark.parametrize("mode", ["eval", "train", "fewshot_eval"])
def test_tf_modes_match_python_twin(mode):
  got = [_py(r) for r in
         preprocessors.rank_classification_canonical(_ds(), mode=mode).as_numpy_iterator()]
  want = preprocessors.rank_classification_rows(CANONICAL, mode=mode)
  for row in got:
    row["inputs"] = [
        s.decode() if isinstance(s, bytes) else s for s in np.atleast_1d(row["inputs"])
    ]
  for row in want:
    row["inputs"] = list(np.atleast_1d(row["inputs"]))
  assert [{k: r[k] for k in ("idx", "inputs", "targets", "is_correct")} for r in got] == [
      {k: r[k] for k in ("idx", "inputs", "targets", "is_correct")} for r in want]


def test_eval_rows_written_out():
  rows = preprocessors.rank_classification_rows(CANONICAL, mode="eval")
  assert [(r["idx"], r["targets"], r["is_correct"]) for r in rows] == [
      ([10, 0], "a", False), ([10, 1], "b", True), ([11, 0], "x", False), ([11, 1], "y", False),
      ([11, 2], "z", True), ([12, 0], "a", False), ([12, 1], "b", False)]
  train = preprocessors.rank_classification_rows(CANONICAL, mode="train")
  assert [r["targets"] for r in train] == ["b", "z"]  # Example 12 has no correct candidate.
  with pytest.raises(ValueError, match="mode 'bogus'"):
    preprocessors.rank_classification_rows(CANONICAL, mode="bogus")


def test_generic_preprocessor_with_passthrough_and_positions():
  ds = tf.data.Dataset.from_tensor_slices({"q": ["a", "b"], "label": [1, 0], "k": [7, 8]})
  out = list(preprocessors.rank_classification(
      ds, inputs_fn=lambda ex: tf.fill([2], ex["q"]), targets_fn=lambda ex: tf.constant(["n", "y"]),
      is_correct_fn=lambda ex: tf.equal(tf.range(2), ex["label"]), mode="eval",
      passthrough_feature_keys=["k"]).as_numpy_iterator())
  assert [tuple(r["idx"]) for r in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert [int(r["k"]) for r in out] == [7, 7, 8, 8]
  assert "weight" not in out[0]


def _targets(groups):
  """(idx, is_correct, weight, length) tuples for score groups [(gold, [scores])]."""
  out, scores = [], []
  for i, (gold, group) in enumerate(groups):
    for j, s in enumerate(group):
      out.append(((i, j), j == gold, 1.0, 2 + j))
      scores.append(s)
  return out, scores


def test_metric_matches_direct_argmax_with_ties_to_lowest_index():
  rng = np.random.default_rng(0)
  groups = [(int(rng.integers(0, 3)), list(rng.integers(0, 3, size=3).astype(float)))
            for _ in range(50)]
  targets, scores = _targets(groups)
  expected = 100 * np.mean([int(np.argmax(s)) == g for g, s in groups])
  order = rng.permutation(len(targets))  # The metric sorts by idx itself.
  got = metrics.rank_classification([targets[i] for i in order], [scores[i] for i in order])
  assert got["accuracy"] == pytest.approx(expected)
  assert metrics.choice_accuracy([g for g, _ in groups], [s for _, s in groups]) == pytest.approx(
      expected)


def test_metric_options_and_errors():
  targets, scores = _targets([(1, [-1.0, -3.0]), (0, [-4.0, -1.0])])
  assert metrics.rank_classification(targets, scores)["accuracy"] == 0.0
  # Length normalisation: lengths 2 and 3 -> -0.5 vs -1.0 and -2.0 vs -0.33.
  assert metrics.rank_classification(targets, scores, normalize_by_target_length=True)[
      "accuracy"] == 0.0
  f1 = metrics.rank_classification(targets, scores, num_classes=2)
  assert f1["f1"] == 0.0  # Predicted [0, 1], gold [1, 0]: no true positive for class 1.
  with pytest.raises(ValueError, match="duplicate idx"):
    metrics.rank_classification(targets + targets[:1], scores + scores[:1])


def test_postprocessor_contract():
  example = {"idx": np.array([3, 1]), "is_correct": True, "weight": 0.5,
             "targets": np.array([5, 6, 1])}
  assert metrics.rank_classification_postprocessor(-2.5, example, is_target=False) == -2.5
  assert metrics.rank_classification_postprocessor(0.0, example, is_target=True) == (
      (3, 1), True, 0.5, 3)


@pytest.mark.parametrize("oracle,expected", [(True, 100.0), (False, 0.0)])
def test_seqio_evaluator_end_to_end(oracle, expected):
  name = "demo_parity_count_a_score_eval"
  evaluator = seqio.Evaluator(mixture_or_task_name=name,
                              feature_converter=seqio.EncDecFeatureConverter(pack=False),
                              eval_split="validation", num_examples=12, use_memory_cache=False)
  cached = evaluator.cached_task_datasets[name]
  correct = [bool(ex["is_correct"]) for ex in cached.as_numpy_iterator()]

  def score_fn(ds, model_feature_shapes=None):
    del model_feature_shapes
    return [(i, (1.0 if correct[i] == oracle else 0.0)) for i, _ in ds.as_numpy_iterator()]

  results, _ = evaluator.evaluate(compute_metrics=True, score_fn=score_fn)
  assert results.result()[name]["accuracy"] == pytest.approx(expected)
