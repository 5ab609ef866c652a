"""Continual (CT0) tasks from local JSONL + a user templates file; generation metrics.

Metric values are checked on cases whose value is known without the libraries (identical texts:
100; disjoint texts: 0) and ROUGE-L against an LCS computed here.
"""

import json

import pytest

pytestmark = pytest.mark.tf

import seqio_tasks  # noqa: E402
from seqio_tasks import examples, metrics  # noqa: E402
from seqio_tasks.cli import task_status  # noqa: E402

TEMPLATES = """
dataset: haiku
templates:
  h1: !Template
    id: h1
    jinja: 'Write a haiku about {{inputs}} ||| {{targets}}'
    name: do_nothing
    reference: ''
"""


def test_continual_task_from_local_files(tmp_path, monkeypatch):
  monkeypatch.setenv("EXPERT_T5X_CONTINUAL_DIR", str(tmp_path))
  ok, line = task_status("haiku_do_nothing")
  assert not ok and str(tmp_path / "haiku" / "templates.yaml") in line
  (tmp_path / "haiku").mkdir()
  (tmp_path / "haiku" / "templates.yaml").write_text(TEMPLATES)
  rows = [{"inputs": "rain", "targets": "soft rain falls"}, {"inputs": "sun", "targets": "warm"}]
  (tmp_path / "haiku" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = examples.load_examples("haiku_do_nothing", "train")
  assert [(e["inputs"], e["targets"], e["answer_choices"]) for e in got] == [
      ("Write a haiku about rain", "soft rain falls", []), ("Write a haiku about sun", "warm", [])]
  with pytest.raises(FileNotFoundError, match=r"validation\.jsonl"):
    examples.load_examples("haiku_do_nothing", "validation")
  ok, line = task_status("haiku_do_nothing")
  assert not ok and "validation.jsonl" in line
  assert str(tmp_path / "haiku" / "templates.yaml") not in line
  assert len(seqio_tasks.suite("ct0_continual")) == 10


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def test_generation_metrics():
  same = ["the cat sat on the mat", "a b c d"]
  assert metrics.bleu(same, same)["bleu"] == pytest.approx(100.0)
  assert metrics.rouge(same, same)["rougeL"] == pytest.approx(100.0)
  assert metrics.rouge(["alpha beta"], ["gamma delta"])["rouge1"] == 0.0
  target, prediction = "one two three four five", "one three five six"
  lcs = _lcs(target.split(), prediction.split())
  p, r = lcs / 4, lcs / 5
  assert metrics.rouge([target], [prediction])["rougeL"] == pytest.approx(100 * 2 * p * r / (p + r))
  assert metrics.squad(["The Cat"], ["cat"]) == {"em": 100.0, "f1": 100.0}
  assert metrics.accuracy(["a", "b"], ["a", "c"]) == {"accuracy": 50.0}
