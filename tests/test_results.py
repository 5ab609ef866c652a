"""Result file schemas and writers: predictions, results.json/.csv/.md, matrix.npz, anchors."""

import csv
import json

import numpy as np
import pytest

from expert_t5x import results


def _results_obj():
  entry = {
      "id": "base", "expert_ids": [],
      "prompts": [{"task": "cb_a", "dataset": "cb", "prompt": "a", "accuracy": 50.0,
                   "num_examples": 4, "excluded": {"no_choices": 0, "gold_not_in_choices": 1},
                   "ci": [25.0, 75.0]}],
      "datasets": [{"dataset": "cb", "mean": 50.0, "median": 50.0, "num_prompts": 1,
                    "ci_mean": [25.0, 75.0], "ci_median": [25.0, 75.0]}],
      "overall": {"mean": 50.0, "median": 50.0, "num_datasets": 1, "ci_mean": [25.0, 75.0],
                  "ci_median": [25.0, 75.0]},
      "generation": [{"task": "copy", "dataset": "copy", "prompt": "c", "num_examples": 2,
                      "metrics": {"rougeL": 40.0, "bleu": float("nan")}}]}
  return {"schema_version": results.SCHEMA_VERSION, "kind": results.RESULTS_KIND,
          "protocol": {"scoring": "sum", "logit_vocab_limit": None,
                       "bootstrap": {"samples": 10, "seed": 0}},
          "model": {}, "experts": [], "tasks": [], "environment": {}, "exclusions": {},
          "entries": [entry]}


def test_prediction_record_has_the_schema_fields():
  r = results.prediction_record(task="t", dataset="d", prompt="p", example_id=np.int64(3),
                                expert_ids=["e"], choice_scores=[np.float32(-1.5), -2.0], pred=0,
                                gold=1, scoring="sum")
  assert set(results.PREDICTION_FIELDS) <= set(r)
  assert r["n_choices"] == 2 and r["excluded"] is None and isinstance(r["example_id"], int)
  results.validate_prediction(r)
  with pytest.raises(ValueError, match="missing fields"):
    results.validate_prediction({"task": "t"})
  with pytest.raises(ValueError, match="excluded must be"):
    results.prediction_record(task="t", dataset="d", prompt="p", example_id=0, expert_ids=[],
                              choice_scores=[], pred=-1, gold=-1, scoring="sum", excluded="why")


def test_jsonl_roundtrip_and_strict_json(tmp_path):
  path = str(tmp_path / "p.jsonl")
  rows = [{"a": 1, "b": float("-inf")}, {"a": np.int32(2), "b": [np.float64(0.5)]}]
  results.write_jsonl(path, rows)
  assert results.read_jsonl(path) == [{"a": 1, "b": None}, {"a": 2, "b": [0.5]}]
  with open(path, "a", encoding="utf-8") as f:
    f.write("{broken\n")
  with pytest.raises(ValueError, match="line 3 is not valid JSON"):
    results.read_jsonl(path)


def test_results_json_csv_markdown(tmp_path):
  obj = _results_obj()
  results.write_json(str(tmp_path / results.RESULTS_FILE), obj)
  back = results.read_results(str(tmp_path / results.RESULTS_FILE))
  assert back["entries"][0]["generation"][0]["metrics"]["bleu"] is None  # NaN -> null
  results.write_csv(str(tmp_path / results.CSV_FILE), obj)
  with open(tmp_path / results.CSV_FILE, encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == results.CSV_COLUMNS
  # 1 prompt + 2 dataset metrics + 2 overall metrics + 2 generation metrics.
  assert len(rows) == 7
  assert {r["level"] for r in rows} == {"prompt", "dataset", "overall"}
  table = results.markdown_table(obj)
  assert "| base | 50.00 | 50.00 | [25.00, 75.00] | 50.00 |" in table


def test_validate_results_rejects_other_schemas():
  obj = _results_obj()
  results.validate_results(obj)
  with pytest.raises(ValueError, match="missing fields"):
    results.validate_results({k: v for k, v in obj.items() if k != "protocol"})
  with pytest.raises(ValueError, match="v2 is not"):
    results.validate_results(dict(obj, schema_version=2))


def test_matrix_roundtrip_and_shape_check(tmp_path):
  path = str(tmp_path / results.MATRIX_FILE)
  acc = np.array([[50.0, np.nan], [0.0, 100.0]])
  results.write_matrix(path, acc, ["e1", "e2"], ["p1", "p2"])
  got, experts, prompts = results.read_matrix(path)
  np.testing.assert_array_equal(got, acc)
  assert experts == ["e1", "e2"] and prompts == ["p1", "p2"]
  with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
    results.write_matrix(path, acc, ["e1", "e2"], ["p1", "p2", "p3"])


def test_compare_expected_pass_and_fail(tmp_path):
  expected = {"name": "fabricated", "entry": "base", "tolerance": 1.0,
              "datasets": {"cb": 50.5, "rte": 60.0}, "overall": {"value": 49.5, "tolerance": 0.1}}
  path = tmp_path / "expected.json"
  path.write_text(json.dumps(expected))
  report = results.compare_expected(_results_obj(), results.read_expected(str(path)))
  by_name = {r["name"]: r for r in report["rows"]}
  assert by_name["cb"]["ok"] and not by_name["rte"]["ok"] and by_name["rte"]["got"] is None
  assert not by_name["overall"]["ok"] and not report["passed"]
  assert "FAIL" in report["markdown"]
  expected["datasets"] = {"cb": 50.0}
  expected["overall"] = 50.0
  assert results.compare_expected(_results_obj(), expected)["passed"]
  with pytest.raises(ValueError, match="lacks 'overall'"):
    path.write_text(json.dumps({"name": "x", "datasets": {}}))
    results.read_expected(str(path))


def test_environment_records_versions_and_revision():
  env = results.environment()
  assert env["packages"]["jax"] and env["platform"] and env["device_count"] >= 1
  assert env["git_revision"] is None or len(env["git_revision"]) == 40
