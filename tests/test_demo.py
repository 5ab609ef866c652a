"""`expert-t5x demo`: its corpus, configuration, progress, method composition and an end-to-end
run."""

import dataclasses
import io
import json
import os
import re

import numpy as np
import pytest

from expert_t5x import aggregation
from expert_t5x import demo
from expert_t5x import demo_claims
from seqio_tasks import demo_pipeline
from expert_t5x import report


def test_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as e:
    demo.demo_main(["--help"])
  assert e.value.code == 0
  assert "--quick" in capsys.readouterr().out


def test_bad_embedder_is_one_clear_error():
  with pytest.raises(ValueError, match="embedder must be minilm, t5 or bm25; got 'glove'"):
    demo.DemoConfig(embedder="glove")


def test_corpus_has_no_task_data():
  """No corpus word is a word of any demo task (fillers, keywords, templates, answer choices)."""
  from seqio_tasks import demo as demo_source  # pylint: disable=g-import-not-at-top
  words = set(demo_pipeline.corpus_words())
  assert len(words) > 50
  task_words = (set(demo_source.FILLER) | set(demo_source.POSITIVE) | set(demo_source.NEGATIVE)
                | set(demo_source.NEGATIONS))
  for task in demo_source.TASKS.values():
    task_words |= set(task.choices or ())
    for prompt in task.prompts:
      task_words |= set(re.findall(r"[a-z]+", prompt.template.lower()))
  assert not words & task_words
  for i in range(200):
    ex = demo_pipeline.corpus_example("train", i)
    assert set(re.sub(r"\[\d\]", " ", ex["inputs"] + " " + ex["targets"]).split()) <= words


def test_span_corruption_targets_fill_the_sentinels():
  """Replacing each sentinel of the input by its target span gives back the original words."""
  import random  # pylint: disable=g-import-not-at-top
  for seed in range(50):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(rng.randint(3, 12))]
    inputs, targets = demo_pipeline.span_corruption(list(words), rng)
    spans = dict(re.findall(r"\[(\d)\] ((?:w\d+ ?)+)", targets))
    rebuilt = re.sub(r"\[(\d)\]", lambda m: spans[m.group(1)].strip(), inputs)
    assert rebuilt.split() == words
    assert 1 <= len(spans) <= demo_pipeline.MAX_SENTINELS


def test_corpus_is_deterministic_per_split():
  a = [demo_pipeline.corpus_example("train", i) for i in range(5)]
  assert a == [demo_pipeline.corpus_example("train", i) for i in range(5)]
  assert a != [demo_pipeline.corpus_example("validation", i) for i in range(5)]


def test_dataset_tasks_group_the_training_prompts():
  groups = demo_pipeline.dataset_tasks()
  assert sorted(groups) == ["demo_flipped_length_all_prompts", "demo_length_all_prompts",
                            "demo_overlap_all_prompts", "demo_sentiment_all_prompts",
                            "demo_topic_all_prompts"]
  assert sum(len(v) for v in groups.values()) == len(demo_pipeline.expert_train_tasks()) == 10
  rows = list(demo_pipeline.iter_all_prompts(groups["demo_topic_all_prompts"], "validation"))
  assert len(rows) == 2 * 200 and {r["prompt"] for r in rows} == {"topic_is", "classify"}
  assert demo_pipeline.continual_tasks() == ["demo_animal_which_animal", "demo_color_which_color"]
  assert not set(demo_pipeline.continual_tasks()) & set(demo_pipeline.expert_train_tasks())


def test_conflicting_and_compositional_tasks_follow_their_rules():
  """flipped_length renders length's rows with the opposite label; review_topic's label names the
  polarity and the topic of its keywords (recomputed here from the rendered words)."""
  from seqio_tasks import demo as demo_source  # pylint: disable=g-import-not-at-top
  length = demo_source.generate("demo_length_short_or_long", "train", 300)
  flipped = demo_source.generate("demo_flipped_length_flipped_short_or_long", "train", 300)
  for a, b in zip(length, flipped):
    assert a["inputs"][len("Is this short or long: "):] == b["inputs"][
        len("Flipped: is this short or long: "):]
    assert {a["targets"], b["targets"]} == {"short", "long"}
  assert demo.conflicting_datasets() == ["demo_length", "demo_flipped_length"]
  for ex in demo_source.generate("demo_review_topic_two_labels", "train", 300):
    words = set(re.findall(r"[a-z]+", ex["inputs"].split("\n")[0]))
    tone = "positive" if words & set(demo_source.POSITIVE) else "negative"
    topic = next(t for t, lex in demo_source.TOPICS.items() if words & set(lex))
    assert ex["targets"] == f"{tone} {topic}" and len(ex["answer_choices"]) == 6
  for ex in demo_source.generate("demo_animal_which_animal", "train", 300):
    text = ex["inputs"].split('"')[1]  # Which animal is in "<text>": cat, dog or bird?
    found = set(re.findall(r"[a-z]+", text)) & set(demo_source.ANIMALS)
    assert found == {ex["targets"]}


@pytest.mark.tf
def test_multitask_provenance_lists_every_task_of_its_mixture():
  """A multitask expert's provenance names each mixture task's dataset (the task registry's own
  metadata), so the library's zero_shot guard excludes it from evaluations on any of them."""
  from expert_t5x import library as library_lib  # pylint: disable=g-import-not-at-top
  from expert_t5x import train  # pylint: disable=g-import-not-at-top
  demo_pipeline.register()
  items = train._provenance(demo_pipeline.MULTITASK_MIXTURE)  # pylint: disable=protected-access
  assert sorted(i["task"] for i in items) == sorted(demo_pipeline.expert_train_tasks())
  assert {i["dataset"] for i in items
         } == {"demo_sentiment", "demo_topic", "demo_overlap", "demo_length", "demo_flipped_length"}
  entry = {"id": "multitask", "provenance": items}
  assert library_lib.overlaps(entry, "demo_overlap", None)
  assert not library_lib.overlaps(entry, "demo_membership", None)
  assert train._provenance("demo_sentiment_review")[0]["prompt"] == "review"  # pylint: disable=protected-access


def test_base_hash_follows_only_the_pretraining_settings():
  full = demo.FULL
  assert full.base_hash() == dataclasses.replace(full, expert_steps=1).base_hash()
  assert full.base_hash() != dataclasses.replace(full, pretrain_steps=1).base_hash()
  assert full.base_hash() != dataclasses.replace(full, emb_dim=256).base_hash()


def test_stage_progress_prints_bar_and_uses_the_measured_rate(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(demo.time, "perf_counter", lambda: clock[0])
  out = io.StringIO()
  progress = demo.StageProgress({"a": 10.0, "b": 30.0}, stream=out, seconds_per_unit=1.0)
  progress.begin("a")
  clock[0] += 20.0  # 10 units in 20 s: 2 s per unit
  progress.end()
  progress.begin("b")
  line = out.getvalue().splitlines()[-1]
  assert line.startswith("[demo 2/2] b") and " 25%" in line
  assert "elapsed 0:20" in line and "ETA 1:00" in line  # 30 units x 2 s
  assert progress.timings == {"a": 20.0}
  clock[0] += 0.5
  progress.end(skipped=True)  # e.g. the cached base: done, but no evidence of speed
  assert progress.rate == 2.0 and progress.eta() == 0.0


@pytest.mark.tf
def test_t5_encoder_embedder_takes_a_byte_vocabulary():
  """The --quick embedder: byte ids (+3 offset, EOS 1) into the base's encoder, unit vectors."""
  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from expert_t5x import embedders, models, network  # pylint: disable=g-import-not-at-top
  config = network.get_config("tiny", vocab_size=300)
  params = models.EncoderDecoderModel(network.Transformer(config)).get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}
  )["params"]
  emb = embedders.T5EncoderEmbedder(params, config, vocabulary=seqio.ByteVocabulary(),
                                    max_seq_length=6)
  assert emb.tokenize(["ab", "abcdefgh"]) == [[100, 101, 1], [100, 101, 102, 103, 104, 1]]
  vectors = emb.embed(["ab", "cd", "ab"])
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(vectors[0], vectors[2], rtol=1e-6)
  assert not np.allclose(vectors[0], vectors[1])
  with pytest.raises(ValueError, match="exactly one of vocab_path"):
    embedders.T5EncoderEmbedder(params, config)


def _outcomes(task, dataset, correct):
  return aggregation.PromptOutcomes(task, dataset, "p", np.arange(len(correct)), np.array(correct))


def test_compose_methods_takes_each_prompts_selected_entry():
  """A method's per-prompt accuracy is its selected entry's; its mean follows the paper's
  aggregation (mean over a dataset's prompts, then over datasets), computed here by hand."""
  prompts = [{"task": "a1", "group": "seen_task"}, {"task": "a2", "group": "seen_task"},
             {"task": "b1", "group": "seen_task"}, {"task": "c1", "group": "heldout_task"}]
  datasets = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}
  table = {"x": {"a1": [1, 1, 0, 0], "a2": [1, 1, 1, 1], "b1": [0, 0, 0, 1], "c1": [1, 0, 0, 0]},
           "y": {"a1": [1, 1, 1, 0], "a2": [0, 0, 0, 0], "b1": [1, 1, 1, 1], "c1": [1, 1, 0, 0]}}
  outcomes = {(e, t): _outcomes(t, datasets[t], c) for e, row in table.items()
              for t, c in row.items()}
  selections = {"pick": {"a1": ("y", ["y"]), "a2": ("x", ["x"]), "b1": ("y", ["y"]),
                         "c1": ("x", ["x"])}}
  cfg = dataclasses.replace(demo.FULL, bootstrap_samples=50)
  methods = demo.compose_methods(cfg, prompts, selections, outcomes)
  seen = next(m for m in methods if m["group"] == "seen_task")
  assert seen["prompts"]["a1"]["accuracy"] == 75.0 and seen["prompts"]["a2"]["accuracy"] == 100.0
  assert seen["mean"] == pytest.approx(((75.0 + 100.0) / 2 + 100.0) / 2)
  assert seen["ci"][0] <= seen["mean"] <= seen["ci"][1]
  held = next(m for m in methods if m["group"] == "heldout_task")
  assert held["mean"] == 25.0 and held["prompts"]["c1"]["entry"] == "x"


@pytest.mark.tf
@pytest.mark.slow
def test_end_to_end_tiny_demo(tmp_path, monkeypatch, capsys):
  """`expert-t5x demo --quick` on a much smaller config writes every report file and plot, one
  section and one verdict line per claim that agree with results.json, and numbers that agree
  with the evaluator's own files: results.json's per-prompt accuracies are recomputed from
  predictions.jsonl, and each method's per-prompt accuracy equals the matrix cell of the expert it
  selected."""
  cfg = dataclasses.replace(
      demo.QUICK, name="test", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=1,
      pretrain_steps=2, pretrain_batch_size=4, expert_steps=2,
      multitask_steps=3, expert_batch_size=2, num_keys=4, embedder="bm25", num_queries=4,
      eval_examples=4, train_eval_examples=3, bootstrap_samples=20)
  out = tmp_path / "demo"
  monkeypatch.setattr(demo, "QUICK", cfg)
  assert demo.demo_main(["--quick", "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
                         "--no_progress"]) == 0
  summary = json.loads((out / demo.SUMMARY_FILE).read_text())
  for name in list(report.PLOT_FILES) + [report.REPORT_FILE, demo.SUMMARY_FILE,
                                         demo.RETRIEVAL_FILE, demo.RESULTS_FILE]:
    assert (out / name).is_file(), name
  claims = json.loads((out / demo.RESULTS_FILE).read_text())["claims"]
  assert [c["id"] for c in claims] == list(demo_claims.CLAIM_IDS)
  text = (out / report.REPORT_FILE).read_text()
  printed = capsys.readouterr().out
  for c in claims:
    assert c["verdict"] in (demo_claims.HOLDS, demo_claims.FAILS)
    assert demo_claims.verdict_line(c) in text and f"### {c['title']}" in text
    assert f"{c['verdict']:>13}  {c['title']}" in printed
    assert c["ci"] is not None and c["ci"][0] <= c["ci"][1]
  # The continual stage re-routes the earlier prompts: every example is compared.
  unchanged = next(c for c in claims if c["id"] == "continual_unchanged")
  assert unchanged["details"]["examples"] == 3 * cfg.eval_examples
  # The multitask model retrained on every prompt is measured, not estimated.
  forgets = next(c for c in claims if c["id"] == "multitask_forgets")["details"]
  assert 0.0 <= forgets["retrained"] <= 100.0
  assert forgets["costs"]["multitask retrained on all prompts (s)"] > 0.0
  assert "multitask retrained" in text
  for eval_dir, n in (("eval", cfg.eval_examples), ("eval_train", cfg.train_eval_examples)):
    results = json.loads((out / eval_dir / "results.json").read_text())
    records = [json.loads(line) for line in (out / eval_dir / "predictions.jsonl").open()]
    for entry in results["entries"]:
      for p in entry["prompts"]:
        mine = [r for r in records if r["task"] == p["task"]
                and (r["expert_ids"] or ["base"])[0] == entry["id"] and r["excluded"] is None]
        assert len(mine) == p["num_examples"] == n
        assert p["accuracy"] == pytest.approx(100.0 * np.mean([r["pred"] == r["gold"]
                                                               for r in mine]))
  matrix = summary["matrix"]
  cell = {(r, c): matrix["accuracy"][i][j] for i, r in enumerate(matrix["rows"])
          for j, c in enumerate(matrix["columns"])}
  for m in summary["methods"]:
    for task, p in m["prompts"].items():
      if m["name"].startswith("merged"):
        # A merge is not a matrix row: compare with its evaluated result directly.
        merged = demo.routed_prompt_results(str(out), "merge")[task]
        assert p["accuracy"] == pytest.approx(merged["accuracy"])
        continue
      assert p["accuracy"] == pytest.approx(cell[(p["entry"], task)])
  oracle = [m for m in summary["methods"] if m["name"].startswith("oracle")]
  roe = [m for m in summary["methods"] if m["name"] == "RoE (prompt expert)"]
  for o, r in zip(oracle, roe):
    assert o["mean"] >= r["mean"]  # the oracle picks the best expert of each prompt
  # A rerun reuses the cached base and every trained expert.
  again = demo.run_demo(cfg, str(out), cache_dir=str(tmp_path / "cache"), show_progress=False)
  assert again["setup"]["config"]["base_cached"] and again["matrix"] == summary["matrix"]
  text = (out / report.REPORT_FILE).read_text()
  assert "not the paper's results" in text
  assert os.path.isdir(out / "library" / "experts")
