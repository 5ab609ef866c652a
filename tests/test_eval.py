"""The evaluator on generated tasks and a tiny random T5: scores against per-pair scoring, stacked
experts against one-at-a-time runs, resume after an interruption, exclusions, scoring options,
decoding, folded full experts and the bad-input errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from expert_t5x import aggregation
from expert_t5x import base_models
from expert_t5x import eval_tasks
from expert_t5x import evaluation
from expert_t5x import expert_format
from expert_t5x import experts as experts_lib
from expert_t5x import models
from expert_t5x import network
from expert_t5x import results
from expert_t5x import scoring as scoring_lib
from expert_t5x import shards

import eval_fakes

TASKS = ("nli_p1", "nli_p2", "qa_q1")


@pytest.fixture(scope="module")
def base():
  return base_models.load_base(model_config="tiny", random_init_seed=0,
                               config_overrides={"vocab_size": eval_fakes.VOCAB_SIZE})


@pytest.fixture(scope="module")
def source():
  return eval_fakes.make_source()


@pytest.fixture(scope="module")
def expert_dirs(base, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("experts"))
  return eval_fakes.save_adapter_experts(root, base.params, base.config, [1, 2, 3],
                                         fingerprint=base.fingerprint)


def _run(output_dir, base, source, **kwargs):
  kwargs.setdefault("tasks", "fake_suite")
  kwargs.setdefault("bootstrap_samples", 50)
  return evaluation.evaluate(output_dir=str(output_dir), base=base, batch_size=8, progress=False,
                             task_source=source, **kwargs)


@pytest.fixture(scope="module")
def base_run(base, source, tmp_path_factory):
  out = tmp_path_factory.mktemp("base_run")
  res = _run(out, base, source)
  return out, res, results.read_jsonl(str(out / results.PREDICTIONS_FILE))


def _pair_scores(base, source, task):
  """Independent path: each (input, choice) pair scored alone by `score_batch`, fixed padding."""
  model = models.EncoderDecoderModel(network.Transformer(base.config))
  score = jax.jit(lambda batch: model.score_batch(base.params, batch))
  vocab = source.vocabulary(task)
  out = []
  for ex in source.examples(task, "validation", None):
    inputs = vocab.encode(ex["inputs"]) + [1]
    row = []
    for choice in ex["answer_choices"]:
      target = vocab.encode(choice) + [1]
      enc = np.zeros((1, 64), np.int32)
      enc[0, :len(inputs)] = inputs
      tgt = np.zeros((1, 16), np.int32)
      tgt[0, :len(target)] = target
      batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_target_tokens": jnp.asarray(tgt),
               "decoder_input_tokens": models.shift_right(jnp.asarray(tgt))}
      row.append(float(score(batch)[0]))
    out.append(row)
  return out


def test_scores_and_accuracy_equal_pairwise_scoring(base, source, base_run):
  _, res, preds = base_run
  by_task = {t: [p for p in preds if p["task"] == t] for t in TASKS}
  entry = res["entries"][0]
  assert entry["id"] == "base" and len(preds) == 3 * 8
  for t in TASKS:
    want = _pair_scores(base, source, t)
    examples = source.examples(t, "validation", None)
    # Mixed choice counts in one batch: every example keeps all its choices.
    assert len({len(ex["answer_choices"]) for ex in examples}) > 1
    hits = []
    for ex, rec, row in zip(examples, by_task[t], want):
      assert rec["example_id"] == ex["example_id"] and rec["n_choices"] == len(row)
      np.testing.assert_allclose(rec["choice_scores"], row, rtol=1e-5)
      top2 = np.sort(row)[-2:]
      if top2[1] - top2[0] > 1e-4:
        assert rec["pred"] == int(np.argmax(row))
      hits.append(int(np.argmax(row)) == ex["label_index"])
    prompt = next(p for p in entry["prompts"] if p["task"] == t)
    assert prompt["accuracy"] == pytest.approx(100.0 * np.mean(hits))
  # Dataset = mean of its prompts; overall = mean of datasets (recomputed from predictions).
  acc = {t: 100.0 * np.mean([p["pred"] == p["gold"] for p in by_task[t]]) for t in TASKS}
  nli = (acc["nli_p1"] + acc["nli_p2"]) / 2
  assert entry["overall"]["mean"] == pytest.approx((nli + acc["qa_q1"]) / 2)
  assert entry["overall"]["median"] == pytest.approx((nli + acc["qa_q1"]) / 2)
  lo, hi = entry["overall"]["ci_mean"]
  assert lo <= entry["overall"]["mean"] <= hi


def test_stacked_experts_equal_one_at_a_time(base, source, expert_dirs, base_run, tmp_path):
  stacked = _run(tmp_path / "stacked", base, source, expert_paths=expert_dirs, include_base=True,
                 experts_per_pass=3)
  _run(tmp_path / "single", base, source, expert_paths=expert_dirs, experts_per_pass=1)
  assert [e["id"] for e in stacked["entries"]] == ["base", "expert_1", "expert_2", "expert_3"]
  a = results.read_jsonl(str(tmp_path / "stacked" / results.PREDICTIONS_FILE))
  b = results.read_jsonl(str(tmp_path / "single" / results.PREDICTIONS_FILE))
  key = lambda r: (tuple(r["expert_ids"]), r["task"], r["example_id"])  # noqa: E731
  b_by = {key(r): r for r in b}
  base_by = {(r["task"], r["example_id"]): r for r in base_run[2]}
  moved = 0.0
  for r in a:
    if not r["expert_ids"]:  # The base inside a multi-expert run equals the base alone.
      np.testing.assert_allclose(r["choice_scores"],
                                 base_by[(r["task"], r["example_id"])]["choice_scores"], rtol=1e-5)
      continue
    np.testing.assert_allclose(r["choice_scores"], b_by[key(r)]["choice_scores"], rtol=1e-5)
    moved = max(moved, np.max(np.abs(np.subtract(
        r["choice_scores"], base_by[(r["task"], r["example_id"])]["choice_scores"]))))
  assert moved > 1e-2  # The experts really change the scores (so the comparison has teeth).
  acc, expert_ids, prompt_ids = results.read_matrix(str(tmp_path / "stacked" / results.MATRIX_FILE))
  assert acc.shape == (3, 3) and expert_ids == ["expert_1", "expert_2", "expert_3"]
  for i, e in enumerate(stacked["entries"][1:]):
    for p in e["prompts"]:
      assert acc[i, prompt_ids.index(p["task"])] == pytest.approx(p["accuracy"])


def test_resume_after_interruption_gives_identical_files(base, source, expert_dirs, tmp_path,
                                                         monkeypatch):
  kwargs = dict(expert_paths=expert_dirs[:2], include_base=True, experts_per_pass=2)
  _run(tmp_path / "whole", base, source, **kwargs)
  # Simulated crash: the process dies after writing 4 of the 6 (chunk, task) shards.
  real_write = shards.write_shard
  written = []

  def crashing_write(*args):
    if len(written) == 4:
      raise KeyboardInterrupt("simulated kill")
    written.append(args[0])
    real_write(*args)

  monkeypatch.setattr(shards, "write_shard", crashing_write)
  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path / "resumed", base, source, **kwargs)
  assert not os.path.exists(tmp_path / "resumed" / results.RESULTS_FILE)
  monkeypatch.setattr(shards, "write_shard", real_write)
  computed = []
  real_run_shard = shards.run_shard
  monkeypatch.setattr(shards, "run_shard",
                      lambda *a, **k: computed.append(a[1].name) or real_run_shard(*a, **k))
  _run(tmp_path / "resumed", base, source, **kwargs)
  assert len(computed) == 2  # Only the missing shards were scored again.
  for name in (results.PREDICTIONS_FILE, results.RESULTS_FILE, results.CSV_FILE,
               results.MARKDOWN_FILE):
    assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
  m1, m2 = (results.read_matrix(str(tmp_path / d / results.MATRIX_FILE))
            for d in ("whole", "resumed"))
  np.testing.assert_array_equal(m1[0], m2[0])
  # A shard from other settings is refused rather than silently mixed in.
  with pytest.raises(ValueError, match="written with different"):
    _run(tmp_path / "resumed", base, source, options=scoring_lib.ScoringOptions(scoring="mean"),
         **kwargs)


def _source_with_bad_examples():
  examples = eval_fakes.make_examples(5, 6, "nli", "p1")
  examples[1] = dict(examples[1], answer_choices=[], label_index=-1)
  examples[2] = dict(examples[2], targets="none of them", label_index=-1)
  meta = eval_tasks.TaskMeta("bad", "nli", "p1", True)
  return eval_tasks.InMemoryTaskSource({"bad": (meta, examples)}, eval_fakes.CharVocabulary())


def test_exclusions_are_counted_and_reported(base, tmp_path):
  source = _source_with_bad_examples()
  res = _run(tmp_path / "x", base, source, tasks="bad")
  preds = results.read_jsonl(str(tmp_path / "x" / results.PREDICTIONS_FILE))
  assert len(preds) == 6  # Nothing is dropped from the predictions.
  assert [p["excluded"] for p in preds[:3]] == [None, "no_choices", "gold_not_in_choices"]
  assert res["exclusions"] == {"no_choices": 1, "gold_not_in_choices": 1}
  prompt = res["entries"][0]["prompts"][0]
  assert prompt["num_examples"] == 4
  kept = [p for p in preds if p["excluded"] is None]
  assert prompt["accuracy"] == pytest.approx(100 * np.mean([p["pred"] == p["gold"] for p in kept]))
  wrong = _run(tmp_path / "w", base, source, tasks="bad",
               options=scoring_lib.ScoringOptions(gold_not_in_choices="count_wrong"))
  prompt = wrong["entries"][0]["prompts"][0]
  assert prompt["num_examples"] == 5
  assert prompt["accuracy"] == pytest.approx(100 * sum(p["pred"] == p["gold"] for p in kept) / 5)
  assert wrong["protocol"]["gold_not_in_choices"] == "count_wrong"


def test_scoring_options_mean_and_per_char(base, source, base_run, tmp_path):
  sums = {(p["task"], p["example_id"]): p["choice_scores"] for p in base_run[2]}
  for scoring in ("mean", "per_char"):
    res = _run(tmp_path / scoring, base, source, tasks="nli_p1", bootstrap_samples=0,
               options=scoring_lib.ScoringOptions(scoring=scoring))
    assert res["protocol"]["scoring"] == scoring
    preds = results.read_jsonl(str(tmp_path / scoring / results.PREDICTIONS_FILE))
    for p, ex in zip(preds, source.examples("nli_p1", "validation", None)):
      assert p["scoring"] == scoring
      # Character vocabulary: a choice has len(choice) tokens + EOS.
      lengths = [len(c) + (1 if scoring == "mean" else 0) for c in ex["answer_choices"]]
      np.testing.assert_allclose(p["choice_scores"],
                                 np.divide(sums[("nli_p1", p["example_id"])], lengths), rtol=1e-5)
      assert p["pred"] == int(aggregation.predict(np.asarray(p["choice_scores"])))


def test_generation_equals_stepwise_greedy_decoding(base, tmp_path):
  source = eval_fakes.make_source(n=4, generation=True)
  res = _run(tmp_path / "g", base, source, tasks="copy_c", generation_max_length=6,
             bootstrap_samples=0)
  preds = results.read_jsonl(str(tmp_path / "g" / results.PREDICTIONS_FILE))
  metrics = res["entries"][0]["generation"][0]["metrics"]
  assert set(metrics) == {"exact_match", "rougeL", "bleu"} and res["entries"][0]["prompts"] == []
  # Independent greedy decoding: the full (uncached) model re-run on the growing prefix.
  model = models.EncoderDecoderModel(network.Transformer(base.config))
  # Targets all non-zero: every position is real; the causal mask hides the future ones.
  logits_fn = jax.jit(lambda enc, dec: model._compute_logits(
      base.params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                    "decoder_target_tokens": jnp.ones_like(dec)}))
  vocab = source.vocabulary("copy_c")
  for p, ex in zip(preds, source.examples("copy_c", "validation", None)):
    enc = np.zeros((1, 32), np.int32)
    ids = vocab.encode(ex["inputs"]) + [1]
    enc[0, :len(ids)] = ids
    out = []
    for step in range(6):
      dec = np.zeros((1, 6), np.int32)
      dec[0, 1:step + 1] = out
      token = int(np.argmax(np.asarray(logits_fn(jnp.asarray(enc), jnp.asarray(dec)))[0, step]))
      out.append(token)
      if token == 1:
        break
    want = scoring_lib.decode_text(vocab, np.asarray(out))
    assert p["pred"] == want and p["gold"] == ex["targets"] and p["scoring"] == "generate"


def test_full_expert_is_folded_into_the_base(base, source, tmp_path):
  # A full expert (a delta on one kernel) scores like a base whose weights include the delta.
  delta = experts_lib.init_expert(experts_lib.FullConfig(), base.config, base.params)
  kernel = delta["decoder"]["layers_0"]["mlp"]["wo"]["kernel"]
  delta["decoder"]["layers_0"]["mlp"]["wo"]["kernel"] = (
      np.random.default_rng(0).standard_normal(kernel.shape).astype(np.float32) * 0.5)
  path = str(tmp_path / "full")
  expert_format.save_expert(path, delta, expert_format.build_metadata(
      "full", experts_lib.config_to_json(experts_lib.FullConfig()),
      base_fingerprint=base.fingerprint, base_config_name="tiny"))
  folded = experts_lib.fold_expert(base.params, delta, experts_lib.FullConfig())
  moved = base_models.BaseModel(folded, base.config, "folded", None)
  _run(tmp_path / "e", base, source, tasks="qa_q1", expert_paths=[path], bootstrap_samples=0)
  _run(tmp_path / "b", moved, source, tasks="qa_q1", bootstrap_samples=0)
  a = results.read_jsonl(str(tmp_path / "e" / results.PREDICTIONS_FILE))
  b = results.read_jsonl(str(tmp_path / "b" / results.PREDICTIONS_FILE))
  for x, y in zip(a, b):
    assert x["expert_ids"] == ["full"] and y["expert_ids"] == []
    np.testing.assert_allclose(x["choice_scores"], y["choice_scores"], rtol=1e-5)


def test_bad_inputs_fail_with_one_clear_line(base, source, expert_dirs, tmp_path):
  other = base_models.BaseModel(base.params, base.config, "other", "f" * 64)
  with pytest.raises(ValueError, match="was trained on base .* allow_base_mismatch"):
    _run(tmp_path / "a", other, source, expert_paths=expert_dirs[:1])
  with pytest.raises(ValueError, match="Vocabulary mismatch: task 'nli_p1' uses a vocabulary of "
                     "100 ids but the model has vocab_size 64"):
    _run(tmp_path / "b", base, eval_fakes.make_source(vocab_size=100))
  with pytest.raises(ValueError, match="logit_vocab_limit 32 is below"):
    _run(tmp_path / "c", base, source, options=scoring_lib.ScoringOptions(logit_vocab_limit=32))
  with pytest.raises(KeyError, match="unknown task 'nope'"):
    _run(tmp_path / "d", base, source, tasks="nli_p1,nope")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _run(tmp_path / "e", base, source, expert_paths=[str(tmp_path / "missing")])
  with pytest.raises(ValueError, match="used twice"):
    _run(tmp_path / "f", base, source, expert_paths=expert_dirs[:2], expert_names=["x", "x"])
  with pytest.raises(ValueError, match="Nothing to evaluate"):
    _run(tmp_path / "g", base, source, include_base=False)
  with pytest.raises(ValueError, match="scoring must be one of"):
    scoring_lib.ScoringOptions(scoring="acc_norm")
  with pytest.raises(ValueError, match="No base model"):
    base_models.load_base(model_config="tiny")


@pytest.mark.multidevice
def test_sharded_4x2_mesh_equals_single_device_pair_scores():
  # Runs tests/eval_multidevice_check.py in its own process with 8 fake CPU devices: the evaluator
  # (data-parallel batches, model-parallel parameters, stacked experts) against per-pair
  # `score_batch` on one device.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = os.path.join(os.path.dirname(__file__), "eval_multidevice_check.py")
  proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "OK" in proc.stdout


def test_merged_expert_is_evaluated_like_any_expert(base, source, expert_dirs, tmp_path):
  # A uniform merge written by expert_t5x.merging: evaluated as an expert, its recipe recorded, and
  # its scores equal those of the parameter average stacked in memory (independent of the files).
  from expert_t5x import merging  # pylint: disable=g-import-not-at-top
  merged = str(tmp_path / "merged")
  merging.merge_expert_dirs(expert_dirs[:2], merged, "uniform")
  res = _run(tmp_path / "m", base, source, tasks="qa_q1", expert_paths=[merged],
             bootstrap_samples=0)
  assert res["experts"][0]["id"] == "merged" and res["experts"][0]["merge"]["method"] == "uniform"
  trees = [expert_format.load_expert(p)[0] for p in expert_dirs[:2]]
  average = jax.tree.map(lambda a, b: (a + b) / 2, *trees)
  model = models.EncoderDecoderModel(network.Transformer(base.config),
                                     expert_config=experts_lib.AdapterConfig(reduction_factor=4))
  score = jax.jit(lambda x, c: model.score_choices(base.params, x, c, expert=average))
  vocab = source.vocabulary("qa_q1")
  preds = results.read_jsonl(str(tmp_path / "m" / results.PREDICTIONS_FILE))
  for rec, ex in zip(preds, source.examples("qa_q1", "validation", None)):
    inputs = np.zeros((1, 64), np.int32)
    ids = vocab.encode(ex["inputs"]) + [1]
    inputs[0, :len(ids)] = ids
    choices = np.zeros((1, 4, 8), np.int32)  # Fixed padding: one compilation.
    for j, c in enumerate(ex["answer_choices"]):
      ids = vocab.encode(c) + [1]
      choices[0, j, :len(ids)] = ids
    want = np.asarray(score(jnp.asarray(inputs), jnp.asarray(choices)))[0]
    np.testing.assert_allclose(rec["choice_scores"], want[:len(ex["answer_choices"])], rtol=1e-5)
