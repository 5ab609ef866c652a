"""BIG-bench task.json loading in the `elm` and `bigbench` formats, on generated files.

Expected strings follow the two format definitions written out by hand (ELM's make_benchmarks.py:
each prefix from the file with its default, an empty string used as it is, "\\n choice: ", JSON
order, no dedup; BIG-bench's json_task: "\\n  choice: ", the sorted keys permuted by a fresh
numpy RandomState(42) per example, dedup, first max score). Every real example is checked against
BIG-bench's and ELM's own code in test_tasks_bigbench_real.py.
"""

import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.tf

import seqio_tasks  # noqa: E402
from seqio_tasks import examples, settings  # noqa: E402
from seqio_tasks.sources import bigbench  # noqa: E402

EX1 = {"input": "2+2?", "target_scores": {"4": 1, "5": 0, "3": 0}}
EX2 = {"input": "Sky?", "target_scores": {"blue": 1, "green": 0}}
GRADED = {"input": "Best?", "target_scores": {"ok": 0.5, "good": 0.9, "great": 0.7}}
TWO_GOLD = {"input": "Which?", "target_scores": {"a": 0, "b": 1, "c": 1}}  # As hindu_knowledge's.


def _write(path, data):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "task.json"), "w") as f:
    json.dump(data, f)


@pytest.fixture()
def root(tmp_path, monkeypatch):
  _write(tmp_path / "winowhy", {"examples": [EX1, EX2, EX1]})
  _write(tmp_path / "logical_deduction", {"name": "logical_deduction"})  # Parent: no examples.
  _write(tmp_path / "logical_deduction" / "three_objects",
         {"task_prefix": "Solve.\n", "example_input_prefix": "\nInput: ", "examples": [EX2]})
  _write(tmp_path / "logical_deduction" / "five_objects",
         {"example_output_prefix": "\nAnswer: ", "choice_prefix": "\n- ", "examples": [EX1]})
  _write(tmp_path / "logical_deduction" / "seven_objects",  # Empty prefixes are used as they are.
         {"task_prefix": "T.", "example_input_prefix": "", "example_output_prefix": " ",
          "choice_prefix": "", "examples": [EX2]})
  monkeypatch.setenv("EXPERT_T5X_BIGBENCH_DIR", str(tmp_path))
  return tmp_path


def test_elm_format_json_order_no_dedup(root):
  got = examples.load_examples("bigbench_winowhy", "validation")
  assert [e["inputs"] for e in got] == [
      "\nQ: 2+2?\n choice: 4\n choice: 5\n choice: 3\nA: ",
      "\nQ: Sky?\n choice: blue\n choice: green\nA: ",
      "\nQ: 2+2?\n choice: 4\n choice: 5\n choice: 3\nA: "]
  assert [e["answer_choices"] for e in got] == [["4", "5", "3"], ["blue", "green"], ["4", "5", "3"]]
  assert [(e["label_index"], e["targets"], e["example_id"]) for e in got] == [
      (0, "4", 0), (0, "blue", 1), (0, "4", 2)]


def test_bigbench_format_dedup_seeded_permutation(root):
  got = examples.load_examples("bigbench_winowhy_bbfmt", "validation")
  assert len(got) == 2  # The repeated example is dropped.
  # default_format_fn builds RandomState(42) afresh for every example.
  first = np.random.RandomState(42).permutation(sorted(EX1["target_scores"]))
  second = np.random.RandomState(42).permutation(sorted(EX2["target_scores"]))
  assert got[0]["inputs"] == "\nQ: 2+2?" + "".join("\n  choice: " + c for c in first) + "\nA: "
  assert got[1]["inputs"] == "\nQ: Sky?" + "".join("\n  choice: " + c for c in second) + "\nA: "
  assert got[0]["answer_choices"] == ["4", "5", "3"]  # Scored in JSON order.


def test_subtasks_pooled_in_sorted_order_with_custom_prefixes(root):
  pooled = examples.load_examples("bigbench_logical_deduction", "validation")
  assert [(e["subset"], e["example_id"]) for e in pooled] == [
      ("five_objects", 0), ("seven_objects", 1), ("three_objects", 2)]
  assert pooled[0]["inputs"] == "\nQ: 2+2?\n- 4\n- 5\n- 3\nAnswer: "  # The file's choice_prefix.
  assert pooled[1]["inputs"] == "T.Sky?bluegreen "
  assert pooled[2]["inputs"] == "Solve.\n\nInput: Sky?\n choice: blue\n choice: green\nA: "
  bb = examples.load_examples("bigbench_logical_deduction_five_objects_bbfmt", "validation")
  perm = np.random.RandomState(42).permutation(sorted(EX1["target_scores"]))
  assert bb[0]["inputs"] == "\nQ: 2+2?" + "".join("\n- " + c for c in perm) + "\nAnswer: "
  assert seqio_tasks.get_info("bigbench_logical_deduction_three_objects").subset == "three_objects"


def test_several_top_scored_choices_follow_the_named_rule(root, monkeypatch, caplog):
  """`first` keeps the first in JSON order (both formats), `skip` drops and counts, `error` raises;
  the rule reaches the loader from the environment, gin and Python, and eval metadata records it."""
  import gin  # pylint: disable=g-import-not-at-top
  from expert_t5x import eval_tasks  # pylint: disable=g-import-not-at-top
  _write(root / "strategyqa", {"examples": [GRADED, EX2]})
  _write(root / "hindu_knowledge", {"examples": [TWO_GOLD, EX1]})
  bb = examples.load_examples("bigbench_strategyqa_bbfmt", "validation")
  assert (bb[0]["label_index"], bb[0]["targets"]) == (1, "good")  # First maximal score.
  with caplog.at_level("WARNING"):
    elm = examples.load_examples("bigbench_hindu_knowledge", "validation")
  assert (elm[0]["label_index"], elm[0]["targets"]) == (1, "b")
  assert "1 with several top-scored choices, multiple_gold rule 'first'" in caplog.text
  meta = eval_tasks.SeqioTaskSource().meta("bigbench_hindu_knowledge")
  assert meta.data_options == {"format": "elm", "multiple_gold": "first"}
  monkeypatch.setenv("EXPERT_T5X_BIGBENCH_MULTIPLE_GOLD", "skip")
  stats = examples.ExampleStats()
  kept = list(bigbench.iter_examples("hindu_knowledge", fmt="bigbench", stats=stats))
  assert [e["inputs"].split("?")[0] for e in kept] == ["\nQ: 2+2"]
  assert stats.skipped == {"several top-scored choices, multiple_gold rule 'skip'": 1}
  assert eval_tasks.SeqioTaskSource().meta("bigbench_hindu_knowledge_bbfmt").data_options == {
      "format": "bigbench", "multiple_gold": "skip"}
  gin.parse_config("seqio_tasks.settings.BIGBENCH_MULTIPLE_GOLD = 'error'")
  try:
    with pytest.raises(ValueError,
                       match=r"example 0: 2 choices share the top score .*'first' or 'skip'"):
      examples.load_examples("bigbench_hindu_knowledge", "validation")
  finally:
    gin.clear_config()
  settings.set_option("BIGBENCH_MULTIPLE_GOLD", "first")
  try:
    assert len(examples.load_examples("bigbench_hindu_knowledge", "validation")) == 2
  finally:
    settings.set_option("BIGBENCH_MULTIPLE_GOLD", None)
  monkeypatch.setenv("EXPERT_T5X_BIGBENCH_MULTIPLE_GOLD", "last")
  with pytest.raises(ValueError, match=r"BIGBENCH_MULTIPLE_GOLD = 'last' .*not one of"):
    examples.load_examples("bigbench_hindu_knowledge", "validation")
  monkeypatch.delenv("EXPERT_T5X_BIGBENCH_MULTIPLE_GOLD")
  with pytest.raises(ValueError, match="no choice has score 1"):  # ELM raises on graded scores.
    examples.load_examples("bigbench_strategyqa", "validation")


def test_tasks_cli_multiple_gold_flag(root, capsys):
  from seqio_tasks import cli  # pylint: disable=g-import-not-at-top
  _write(root / "hindu_knowledge", {"examples": [TWO_GOLD, EX1]})
  assert cli.tasks_main(["show", "bigbench_hindu_knowledge", "-n", "5",
                         "--bigbench_multiple_gold", "skip"]) == 0
  assert capsys.readouterr().out.count("--- bigbench_hindu_knowledge") == 1
  assert cli.tasks_main(["show", "bigbench_hindu_knowledge", "--bigbench_multiple_gold",
                         "error"]) == 2
  assert "share the top score" in capsys.readouterr().err
  assert settings.get_option("BIGBENCH_MULTIPLE_GOLD") == "first"  # The flag does not leak.


def test_missing_file_names_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv("EXPERT_T5X_BIGBENCH_DIR", str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="expert-t5x data fetch bigbench"):
    examples.load_examples("bigbench_hindu_knowledge", "validation")


def test_13_tasks_registered_in_both_formats():
  bench = seqio_tasks.suite("bigbench_13")
  assert len(bench) == 13 and all(seqio_tasks.get_info(t).format == "elm" for t in bench)
  assert all(seqio_tasks.get_info(t + "_bbfmt").format == "bigbench" for t in bench)


def _keyed_expert(path, dataset, rows, seed):
  """A tiny adapter expert whose retrieval keys are `rows` (provenance: `dataset`)."""
  from expert_t5x import expert_format  # pylint: disable=g-import-not-at-top
  meta = expert_format.build_metadata("adapter", {"kind": "adapter", "init_seed": 0},
                                      base_fingerprint="bb-test",
                                      base_config_name="tiny",
                                      provenance=[{
                                          "task": dataset, "dataset": dataset, "subset": None,
                                          "prompt": "p", "role": "train"
                                      }])
  keys = [
      dict(r, targets=None, example_id=i, task=dataset, dataset=dataset, subset=None, prompt="p")
      for i, r in enumerate(rows)
  ]
  expert_format.save_expert(path, {"encoder/x/kernel": np.full((2, 2), seed, np.float32)}, meta,
                            keys)
  return str(path)


def test_roe_on_bigbench_examples(root, tmp_path):
  """Retrieval for a BIG-bench eval task from its own loaded examples (labels stripped): under
  `seen` the expert keyed by the very same examples wins (identical texts, BM25), under `zero_shot`
  the guard excludes it by the task's dataset; `choice` formats (no promptsource template) fail with
  one
  line naming the prompt."""
  from expert_t5x import library as library_lib  # pylint: disable=g-import-not-at-top
  from expert_t5x import retrieval  # pylint: disable=g-import-not-at-top
  queries = retrieval.unlabeled(examples.load_examples("bigbench_winowhy", "validation"))
  assert queries[0]["dataset"] == "bigbench_winowhy" and "targets" not in queries[0]
  lib = library_lib.Library.init(tmp_path / "lib")
  own = lib.add(_keyed_expert(tmp_path / "own", "bigbench_winowhy", queries, 1))["id"]
  other = lib.add(
      _keyed_expert(tmp_path / "other", "arithmetic", [{
          "inputs": f"\nQ: {a}+{a}?\n choice: {2 * a}\n choice: {a}\nA: ",
          "answer_choices": [str(2 * a), str(a)]
      } for a in range(1, 5)], 2))["id"]
  retriever = retrieval.Retriever(lib, retrieval.make_embedder("bm25"))
  seen = retriever.retrieve(queries, guard="seen", num_queries=3)
  assert seen["winner"] == own and seen["votes_per_query"] == 1
  assert seen["dataset"] == "bigbench_winowhy" and seen["guard"]["mode"] == "seen"
  zero = retriever.retrieve(queries, guard="zero_shot", num_queries=3)
  assert zero["winner"] == other
  assert [x["id"] for x in zero["guard"]["excluded"]] == [own]
  with pytest.raises(retrieval.RetrievalError, match="prompt 'elm'.*Use a label format"):
    retrieval.format_text(queries[0], "choice_instance")
