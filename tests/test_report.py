"""The demo report: Markdown and PNG plots drawn from a synthetic summary (no training involved)."""

import copy
import os
import re

import numpy as np
import pytest

from expert_t5x import demo_claims
from expert_t5x import report


def _summary() -> dict:
  """A small summary in the demo's schema with known numbers."""
  experts = [
      {"id": "base", "kind": "base", "dataset": None, "own_prompts": [], "own_accuracy": None,
       "chance": None},
      {"id": "demo_a_p1", "kind": "prompt", "dataset": "demo_a",
       "own_prompts": ["demo_a_p1_score_eval"], "own_accuracy": 90.0, "chance": 0.5},
      {"id": "demo_b_p1", "kind": "prompt", "dataset": "demo_b",
       "own_prompts": ["demo_b_p1_score_eval"], "own_accuracy": 70.0, "chance": 1 / 3},
  ]
  columns = ["demo_a_p1_score_eval", "demo_b_p1_score_eval", "demo_a_p2_score_eval",
             "demo_c_p1_score_eval"]
  eval_prompts = [
      {"task": "demo_a_p2_score_eval", "dataset": "demo_a", "prompt": "p2", "group": "seen_task",
       "guard": "seen", "chance": 0.5, "num_examples": 10},
      {"task": "demo_c_p1_score_eval", "dataset": "demo_c", "prompt": "p1",
       "group": "heldout_task", "guard": "zero_shot", "chance": 0.5, "num_examples": 10},
  ]
  methods = []
  for group, task in (("seen_task", "demo_a_p2_score_eval"),
                      ("heldout_task", "demo_c_p1_score_eval")):
    for name, mean in (("base", 50.0), ("RoE (prompt expert)",
                                        80.0 if group == "seen_task" else 55.0)):
      methods.append({"name": name, "group": group, "mean": mean, "ci": [mean - 10, mean + 5],
                      "num_prompts": 1,
                      "prompts": {task: {"accuracy": mean, "experts": ["demo_a_p1"]}}})
  return {
      "setup": {"sentences": ["Sentence one.", "Sentence two."], "config": {"emb_dim": 128},
                "machine": "test machine"},
      "experts": experts,
      "eval_prompts": eval_prompts,
      "matrix": {"rows": ["base", "demo_a_p1", "demo_b_p1"], "columns": columns,
                 "accuracy": [[50, 33, 50, 50], [90, 30, 80, 55], [40, 70, 45, 52]]},
      "retrieval": {
          "demo_a_p2_score_eval": {"guard": "seen", "winner": "demo_a_p1", "same_task": True,
                                   "votes": {"demo_a_p1": 7, "demo_b_p1": 1}, "total_votes": 8,
                                   "confidence": 7 / 8},
          "demo_c_p1_score_eval": {"guard": "zero_shot", "winner": "demo_b_p1", "same_task": None,
                                   "votes": {"demo_a_p1": 3, "demo_b_p1": 5}, "total_votes": 8,
                                   "confidence": 5 / 8},
      },
      "methods": methods,
      "checks": {"experts_beat_chance": {"passed": 2, "total": 2, "mean_margin": 38.3},
                 "routing": {"same_task": 1, "total": 1, "vote_share": 87.5,
                             "chance_share": 50.0}},
      "claims": [
          demo_claims.make_claim("retrieval_unseen_prompts", "Retrieval", "RoE minus base",
                                 "lower bound above 0", 30.0, [12.5, 41.0], True,
                                 details={"vs_multitask": {"difference": -2.0, "ci": [-9, 4]},
                                          "routing": {"same_task": 1, "total": 1}}),
          demo_claims.make_claim("merging_composition", "Merging", "merged minus RoE",
                                 "lower bound above 0", 1.0, [-3.0, 5.0], False,
                                 details={"vs_base": {"difference": 5.0, "ci": [1.0, 9.0]},
                                          "merged": 55.0, "roe": 54.0, "base": 50.0}),
      ],
      "timings": {"setup": 1.0, "evaluation": 2.5},
  }


def _png_size(path: str) -> tuple[int, int]:
  """(width, height) from the PNG header, independent of matplotlib."""
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_report_writes_markdown_and_every_plot(tmp_path):
  summary = _summary()
  paths = report.write_report(summary, str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == sorted(
      list(report.PLOT_FILES) + [report.REPORT_FILE])
  for name in report.PLOT_FILES:
    width, height = _png_size(str(tmp_path / name))
    assert width > 200 and height > 200
  text = (tmp_path / report.REPORT_FILE).read_text()
  for name in report.PLOT_FILES:
    assert f"]({name})" in text  # every plot is embedded
  assert "Sentence one. Sentence two." in text
  assert "not the paper's results" in text


def test_report_numbers_match_the_summary(tmp_path):
  """Every method's mean and interval in the Markdown equals the summary's, rounded to 0.1."""
  summary = _summary()
  report.write_report(summary, str(tmp_path))
  text = (tmp_path / report.REPORT_FILE).read_text()
  for m in summary["methods"]:
    row = f"| {m['name']} | {m['mean']:.1f} | [{m['ci'][0]:.1f}, {m['ci'][1]:.1f}] |"
    assert row in text
  # Retrieval table: the winner's votes out of the total, per eval prompt.
  assert "| a_p2 | seen | a_p1 | 7/8 | yes |" in text
  assert "| c_p1 | zero_shot | b_p1 | 5/8 | n/a (held-out task) |" in text
  # Chance of each group is the mean over its prompts, in percent.
  assert re.search(r"held-out tasks\*\* \(1 prompts, guard `zero_shot`; chance 50\.0%\)", text)
  assert "| total | 3.5 |" in text
  # One verdict line and one section per claim, with the summary's numbers.
  assert "- **holds** (retrieval_unseen_prompts): RoE minus base: 30.0 points [12.5, 41.0]" in text
  assert ("- **does not hold** (merging_composition): merged minus RoE: 1.0 points [-3.0, 5.0]"
          in text)
  assert "### Retrieval" in text and "### Merging" in text
  assert "merged minus base 5.0 points [1.0, 9.0]" in text


def test_heatmap_reads_the_matrix_values(tmp_path, monkeypatch):
  """The heatmap draws exactly the summary's matrix (checked on the array handed to imshow)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import axes  # pylint: disable=g-import-not-at-top
  seen = {}
  original = axes.Axes.imshow

  def spy(self, data, *args, **kwargs):
    seen["data"] = np.asarray(data)
    return original(self, data, *args, **kwargs)

  monkeypatch.setattr(axes.Axes, "imshow", spy)
  summary = _summary()
  report.plot_heatmap(summary, str(tmp_path / "h.png"))
  np.testing.assert_array_equal(seen["data"], np.asarray(summary["matrix"]["accuracy"], float))


def test_bad_summaries_get_one_clear_error(tmp_path):
  summary = _summary()
  del summary["retrieval"]
  with pytest.raises(ValueError, match=r"missing \['retrieval'\]"):
    report.write_report(summary, str(tmp_path))
  summary = _summary()
  summary["matrix"]["accuracy"] = copy.deepcopy(summary["matrix"]["accuracy"][:2])
  with pytest.raises(ValueError, match="matrix is 2 x 4 but names 3 rows x 4 columns"):
    report.write_report(summary, str(tmp_path))


def test_short_names():
  assert report.short_name("demo_sentiment_tone_score_eval") == "sentiment_tone"
  assert report.short_name("multitask") == "multitask"
