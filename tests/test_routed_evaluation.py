"""Evaluation with Retrieval of Experts on the synthetic demo tasks and a tiny random base.

A library of three random adapter experts whose retrieval keys come from three distinct demo
tasks (sentiment, topic, overlap); the eval prompts are those tasks' held-out prompts. Checked:
routing to each prompt's own task (BM25 and the base's T5 encoder), the guard modes, the routed
entry against the plain evaluator's expert x prompt matrix, the oracle against a numpy argmax of
that matrix, label-free top-k selection against entropies recomputed from plain predictions,
and the continual check (old experts' evaluations bitwise unchanged after adding experts)."""

import json
import os

import numpy as np
import pytest

from expert_t5x import base_models
from expert_t5x import eval as eval_entry
from expert_t5x import eval_experts
from expert_t5x import evaluation
from expert_t5x import expert_format
from expert_t5x import experts as experts_lib
from expert_t5x import library as library_lib
from expert_t5x import merging
from expert_t5x import results
from expert_t5x import routed_evaluation as roe
from expert_t5x import routing as routing_lib
from expert_t5x import shards

pytestmark = pytest.mark.tf  # The demo tasks are read through seqio.

DEMO_VOCAB = 512  # The demo's byte vocabulary (259 ids) fits in the tiny model's 512.
# (dataset task, training prompt of the expert's keys, held-out eval prompt)
TASKS = (("sentiment", "review", "tone"), ("topic", "topic_is", "category"),
         ("overlap", "follows", "supported"))
EVAL = [f"demo_{t}_{held}_score_eval" for t, _, held in TASKS]
OWN = {f"demo_{t}_{held}_score_eval": f"demo_{t}_{train}" for t, train, held in TASKS}
COMMON = dict(split="validation", max_examples=8, batch_size=8, bootstrap_samples=20,
              progress=False)
BASE_FLAGS = ["--model_config", "tiny", "--vocab_size", str(DEMO_VOCAB), "--random_init_seed", "0",
              "--max_examples", "8", "--batch_size", "8", "--bootstrap_samples", "20",
              "--no_progress"]


@pytest.fixture(scope="module")
def base():
  return base_models.load_base(model_config="tiny", random_init_seed=0,
                               config_overrides={"vocab_size": DEMO_VOCAB})


def _save_expert(root, base, task, prompt, seed):
  """A random adapter expert (non-zero up-projection, so experts differ) keyed by a demo task."""
  from seqio_tasks import demo  # pylint: disable=g-import-not-at-top
  name = f"demo_{task}_{prompt}"
  cfg = experts_lib.AdapterConfig(reduction_factor=4, zero_init_up=False, init_seed=seed)
  tree = experts_lib.init_expert(cfg, base.config, base.params)
  meta = expert_format.build_metadata(
      "adapter", experts_lib.config_to_json(cfg), base_fingerprint=base.fingerprint,
      base_config_name="tiny", provenance=[{"task": name, "dataset": f"demo_{task}", "subset": None,
                                            "prompt": prompt, "role": "train"}])
  keys = [dict(ex, task=name) for ex in demo.generate(name, "train", 8)]
  path = os.path.join(root, name)
  expert_format.save_expert(path, tree, meta, keys)
  return path


@pytest.fixture(scope="module")
def experts(base, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("experts"))
  paths = [_save_expert(root, base, t, train, i + 1) for i, (t, train, _) in enumerate(TASKS)]
  paths.append(_save_expert(root, base, "length", "size", 7))  # Added later (continual check).
  return paths


@pytest.fixture(scope="module")
def lib(experts, tmp_path_factory):
  lib = library_lib.Library.init(tmp_path_factory.mktemp("lib") / "lib")
  for path in experts[:3]:
    lib.add(path)
  return lib


@pytest.fixture(scope="module")
def matrix_run(base, lib, tmp_path_factory):
  """Independent of retrieval: every library expert on every eval prompt (the plain evaluator)."""
  out = tmp_path_factory.mktemp("matrix")
  ids = lib.ids()
  res = evaluation.evaluate(tasks=EVAL, output_dir=str(out), base=base,
                            expert_paths=[lib.expert_dir(i) for i in ids], expert_names=ids,
                            **COMMON)
  return out, res, results.read_jsonl(str(out / results.PREDICTIONS_FILE))


@pytest.fixture(scope="module")
def roe_cli_run(base, lib, tmp_path_factory):
  out = tmp_path_factory.mktemp("roe_cli")
  rc = eval_entry.cli_main(["--tasks", ",".join(EVAL), "--output_dir", str(out), "--library",
                            lib.root, "--roe", "--embedder", "bm25", "--guard", "seen",
                            "--num_queries", "6", *BASE_FLAGS])
  return rc, out


def test_cli_roe_routes_each_prompt_to_its_own_task_and_equals_the_matrix(roe_cli_run,
                                                                         matrix_run):
  rc, out = roe_cli_run
  assert rc == 0
  res = results.read_results(str(out / results.RESULTS_FILE))
  routing = res["routing"]
  assert routing["mode"] == "roe" and routing["guard_mode"] == "seen"
  assert routing["embedder"].startswith("bm25-") and routing["num_queries"] == 6
  assert {t: r["expert_ids"] for t, r in routing["tasks"].items()} == {t: [OWN[t]] for t in EVAL}
  for t, r in routing["tasks"].items():
    assert r["votes"] == {OWN[t]: 6} and r["confidence"] == 1.0 and len(r["query_indices"]) == 6
    assert r["guard"] == {"mode": "seen", "excluded": []}
  retrieved = json.load(open(out / roe.RETRIEVAL_FILE))
  assert [r["task"] for r in retrieved["results"]] == EVAL
  # The routed entry equals each prompt's own expert in the plain evaluator's matrix
  # (a stacked pass over all experts and prompts, no routing involved).
  [entry] = res["entries"]
  assert entry["id"] == "roe" and entry["expert_ids"] == sorted(OWN.values())
  _, matrix_res, matrix_preds = matrix_run
  acc, expert_ids, prompt_ids = results.read_matrix(str(matrix_run[0] / results.MATRIX_FILE))
  for p in entry["prompts"]:
    assert p["expert_ids"] == [OWN[p["task"]]]
    assert p["accuracy"] == acc[expert_ids.index(OWN[p["task"]]), prompt_ids.index(p["task"])]
  preds = results.read_jsonl(str(out / results.PREDICTIONS_FILE))
  assert len(preds) == 3 * 8 and all(r["entry"] == "roe" for r in preds)
  plain = {(r["expert_ids"][0], r["task"], r["example_id"]): r["choice_scores"]
           for r in matrix_preds}
  for r in preds:
    assert r["expert_ids"] == [OWN[r["task"]]]
    np.testing.assert_allclose(r["choice_scores"], plain[(OWN[r["task"]], r["task"],
                                                          r["example_id"])], rtol=1e-5)
  # One shard directory per routed expert: each expert scored once, on its own prompt only.
  assert len(os.listdir(out / shards.SHARDS_DIR)) == 3


def test_oracle_is_the_best_expert_per_prompt(matrix_run, lib, tmp_path, capsys):
  out, res, _ = matrix_run
  acc, expert_ids, prompt_ids = results.read_matrix(str(out / results.MATRIX_FILE))
  oracle = res["oracle"]
  # Independent: numpy's max per column, then the mean over datasets (one prompt per dataset).
  want = [float(acc[:, j].max()) for j in range(len(prompt_ids))]
  assert [p["accuracy"] for p in oracle["prompts"]] == want
  assert [p["expert"] for p in oracle["prompts"]] == [expert_ids[int(np.argmax(acc[:, j]))]
                                                        for j in range(len(prompt_ids))]
  assert oracle["mean"] == pytest.approx(np.mean(want)) and oracle["num_experts"] == 3
  # Candidates: experts by accuracy, ties in expert order (numpy's stable argsort of -acc).
  for j, p in enumerate(oracle["prompts"]):
    order = np.argsort(-acc[:, j], kind="stable")
    assert [c["expert"] for c in p["candidates"]] == [expert_ids[i] for i in order]
  assert eval_entry.cli_main(["--oracle", str(out), "--output", str(tmp_path / "o.json")]) == 0
  assert json.load(open(tmp_path / "o.json"))["mean"] == pytest.approx(oracle["mean"])
  assert "Oracle over 3 experts" in capsys.readouterr().out
  # The oracle top-k merge: `merge --retrieval` reads the oracle file's candidates.
  prompt = oracle["prompts"][0]
  assert merging.merge_main([
      "--library", lib.root, "--retrieval",
      str(tmp_path / "o.json"), "--task", prompt["task"], "--top-k", "2", "--output",
      str(tmp_path / "om")
  ]) == 0
  recipe = expert_format.read_metadata(tmp_path / "om")["merge"]
  assert [i["name"] for i in recipe["inputs"]] == [c["expert"] for c in prompt["candidates"][:2]]
  assert eval_entry.cli_main(["--oracle", str(tmp_path)]) == 2
  assert "matrix.npz' not found" in capsys.readouterr().err


def _example_order(matrix_preds, task):
  first = matrix_preds[0]["expert_ids"]
  return [r["example_id"] for r in matrix_preds if r["task"] == task and r["expert_ids"] == first]


def _routed_accuracy(matrix_preds, task, expert_of):
  """Percent correct of `task` when example i is scored by expert_of[i], read from the plain
  evaluator's predictions of every expert on every example."""
  plain = {(r["expert_ids"][0], r["example_id"]): r for r in matrix_preds if r["task"] == task}
  hits = [plain[(e, i)]["pred"] == plain[(e, i)]["gold"] for i, e in expert_of.items()]
  return 100.0 * float(np.mean(hits))


def test_per_example_routing_scores_each_example_under_its_own_expert(base, lib, matrix_run,
                                                                     tmp_path):
  """A hand-made per-example Routing vs the plain evaluator's predictions of every expert on every
  example: accuracies, each record's expert and scores, one shard per used expert, resume."""
  _, _, matrix_preds = matrix_run
  ids = lib.ids()
  order = {t: _example_order(matrix_preds, t) for t in EVAL}
  routes = {EVAL[0]: {e: ids[i % 3] for i, e in enumerate(order[EVAL[0]])},  # all three experts
            EVAL[1]: OWN[EVAL[1]],  # a whole-task route beside per-example ones
            EVAL[2]: {e: ids[0] if i < 2 else ids[2] for i, e in enumerate(order[EVAL[2]])}}
  routing = routing_lib.Routing(name="instance", routes=routes)
  kwargs = dict(tasks=EVAL, base=base, expert_paths=[lib.expert_dir(i) for i in ids],
                expert_names=ids, routing=routing, **COMMON)
  res = evaluation.evaluate(output_dir=str(tmp_path), **kwargs)
  [entry] = res["entries"]
  acc = {p["task"]: p["accuracy"] for p in entry["prompts"]}
  assert acc[EVAL[0]] == pytest.approx(_routed_accuracy(matrix_preds, EVAL[0], routes[EVAL[0]]))
  assert acc[EVAL[1]] == pytest.approx(_routed_accuracy(
      matrix_preds, EVAL[1], {i: OWN[EVAL[1]] for i in order[EVAL[1]]}))
  assert acc[EVAL[2]] == pytest.approx(_routed_accuracy(matrix_preds, EVAL[2], routes[EVAL[2]]))
  assert all(p["num_examples"] == 8 for p in entry["prompts"])
  tasks = res["routing"]["tasks"]
  assert tasks[EVAL[0]]["evaluated_as"] == {"per_example": {ids[0]: 3, ids[1]: 3, ids[2]: 2}}
  assert tasks[EVAL[0]]["expert_ids"] == ids and tasks[EVAL[1]]["evaluated_as"] == OWN[EVAL[1]]
  plain = {(r["expert_ids"][0], r["task"], r["example_id"]): r["choice_scores"]
           for r in matrix_preds}
  preds = results.read_jsonl(str(tmp_path / results.PREDICTIONS_FILE))
  assert len(preds) == 3 * 8
  for r in preds:
    route = routes[r["task"]]
    expert = route if isinstance(route, str) else route[r["example_id"]]
    if r["task"] != EVAL[1]:
      assert r["expert_ids"] == [expert]  # each example records its own expert
    np.testing.assert_allclose(r["choice_scores"], plain[(expert, r["task"], r["example_id"])],
                               rtol=1e-5)
  assert len(os.listdir(tmp_path / shards.SHARDS_DIR)) == 3  # one pass per used expert
  again = evaluation.evaluate(output_dir=str(tmp_path), **kwargs)  # resumed: every shard done
  assert again["entries"][0]["prompts"] == entry["prompts"]
  # Another per-example routing in the same directory writes its own shards (no clash with the old).
  routes[EVAL[0]] = {e: ids[(i + 1) % 3] for i, e in enumerate(order[EVAL[0]])}
  moved = evaluation.evaluate(output_dir=str(tmp_path), **kwargs)
  assert moved["entries"][0]["prompts"][0]["accuracy"] == pytest.approx(
      _routed_accuracy(matrix_preds, EVAL[0], routes[EVAL[0]]))
  routes[EVAL[2]]["not-an-example"] = ids[0]
  with pytest.raises(ValueError, match=f"that task '{EVAL[2]}' does not have here"):
    evaluation.evaluate(output_dir=str(tmp_path / "extra"), **kwargs)
  routes[EVAL[2]].pop("not-an-example")
  routes[EVAL[2]].pop(order[EVAL[2]][-1])
  with pytest.raises(ValueError, match=f"routes task '{EVAL[2]}' per example but not its examples"):
    evaluation.evaluate(output_dir=str(tmp_path / "partial"), **kwargs)


def test_cli_instance_level_roe_routes_every_example_by_its_nearest_key(base, lib, matrix_run,
                                                                       tmp_path):
  out = tmp_path / "instance"
  assert eval_entry.cli_main(["--tasks", ",".join(EVAL), "--output_dir", str(out), "--library",
                              lib.root, "--roe", "--roe_level", "instance", "--embedder", "bm25",
                              "--guard", "seen", *BASE_FLAGS]) == 0
  res = results.read_results(str(out / results.RESULTS_FILE))
  assert res["routing"]["level"] == "instance"
  retrieved = {r["task"]: r for r in json.load(open(out / roe.RETRIEVAL_FILE))["results"]}
  _, _, matrix_preds = matrix_run
  acc = {p["task"]: p["accuracy"] for p in res["entries"][0]["prompts"]}
  for t in EVAL:
    r = retrieved[t]
    assert sorted(r["query_indices"]) == list(range(8))  # every example is a query
    order = _example_order(matrix_preds, t)
    expert_of = {order[i]: e for i, e in zip(r["query_indices"], r["instance_level"])}
    counts = {e: list(expert_of.values()).count(e) for e in sorted(set(expert_of.values()))}
    assert res["routing"]["tasks"][t]["evaluated_as"] == {"per_example": counts}
    assert acc[t] == pytest.approx(_routed_accuracy(matrix_preds, t, expert_of))


def test_dataset_level_roe_uses_the_dataset_expert_or_records_why_not(base, experts, tmp_path):
  from seqio_tasks import demo  # pylint: disable=g-import-not-at-top
  lib = library_lib.Library.init(tmp_path / "lib")
  for path in experts[:3]:
    lib.add(path)
  # A dataset expert of demo_sentiment: trained on two of its prompts (its keys from one of them).
  cfg = experts_lib.AdapterConfig(reduction_factor=4, zero_init_up=False, init_seed=9)
  meta = expert_format.build_metadata(
      "adapter", experts_lib.config_to_json(cfg), base_fingerprint=base.fingerprint,
      base_config_name="tiny",
      provenance=[{"task": f"demo_sentiment_{p}", "dataset": "demo_sentiment", "subset": None,
                   "prompt": p, "role": "train"} for p in ("review", "tone")])
  keys = [dict(ex, task="demo_sentiment_review") for ex in demo.generate("demo_sentiment_review",
                                                                         "train", 8)]
  expert_format.save_expert(tmp_path / "sentiment_de", experts_lib.init_expert(
      cfg, base.config, base.params), meta, keys)
  de_id = lib.add(str(tmp_path / "sentiment_de"), name="sentiment_de")["id"]
  config = roe.RoEConfig(level="dataset", embedder="bm25", guard="seen", num_queries=6)
  res = roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(tmp_path / "de"), base=base,
                     config=config, **COMMON)
  tasks = res["routing"]["tasks"]
  assert tasks[EVAL[0]]["expert_ids"] == [de_id] and de_id != tasks[EVAL[0]]["winner"]
  assert "dataset_level_fallback" not in tasks[EVAL[0]]
  assert res["routing"]["dataset_rule"] == "winner"  # the paper's rule, recorded
  assert tasks[EVAL[0]]["dataset_level"]["rule"] == "winner"
  assert roe.RoEConfig(level="dataset", dataset_rule="pooled").to_json()["dataset_rule"] == "pooled"
  with pytest.raises(ValueError, match="dataset_rule must be one of"):
    roe.RoEConfig(level="dataset", dataset_rule="votes")
  for t in EVAL[1:]:  # no dataset expert for topic or overlap: the task-level winner, recorded
    assert tasks[t]["expert_ids"] == [tasks[t]["winner"]]
    assert "no dataset expert for" in tasks[t]["dataset_level_fallback"]
  with pytest.raises(ValueError, match="level 'dataset' routes to single experts"):
    roe.RoEConfig(mode="merge", level="dataset")
  with pytest.raises(ValueError, match="level 'instance' has no vote to abstain"):
    roe.RoEConfig(level="instance", abstain_threshold=0.5)


def test_abstaining_prompts_use_the_fallback(base, lib, tmp_path):
  """Prompts whose winner has less than the threshold's vote share use the fallback: the base
  (accuracy equal to a plain base-only evaluation) or a merge of their top-k candidates; the
  others use their winner. Under zero_shot with BM25 the fixture's shares are 5/6, 5/6 and 4/6."""
  plain = evaluation.evaluate(tasks=EVAL, output_dir=str(tmp_path / "plain"), base=base, **COMMON)
  base_acc = {p["task"]: p["accuracy"] for p in plain["entries"][0]["prompts"]}
  for fallback in ("base", "merge"):
    config = roe.RoEConfig(embedder="bm25",
                           guard="zero_shot",
                           num_queries=6,
                           abstain_threshold=0.75,
                           fallback=fallback,
                           merge_top_k=2)
    out = tmp_path / fallback
    res = roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(out), base=base, config=config,
                       **COMMON)
    retrieved = {r["task"]: r for r in json.load(open(out / roe.RETRIEVAL_FILE))["results"]}
    acc = {p["task"]: p["accuracy"] for p in res["entries"][0]["prompts"]}
    tasks = res["routing"]["tasks"]
    assert {r["abstained"] for r in tasks.values()} == {True, False}  # the fixture has both cases
    for t, r in tasks.items():
      assert r["abstained"] == (r["confidence"] < 0.75)
      if not r["abstained"]:
        assert r["evaluated_as"] == r["winner"] and r["expert_ids"] == [r["winner"]]
      elif fallback == "base":
        assert r["evaluated_as"] == eval_experts.BASE_ID and r["expert_ids"] == []
        assert acc[t] == base_acc[t]
      else:
        top2 = [c["expert"] for c in retrieved[t]["candidates"][:2]]
        assert r["expert_ids"] == r["merge"]["inputs"] == top2
        assert r["evaluated_as"] == r["merge"]["id"] and (out / roe.MERGED_DIR /
                                                          r["merge"]["id"]).is_dir()
  with pytest.raises(ValueError, match="abstain_threshold is a vote share"):
    roe.RoEConfig(abstain_threshold=1.5)


def test_t5_embedder_routes_and_zero_shot_guard_excludes_own_dataset(base, lib, tmp_path):
  # Under the `label` format a query's text equals its own task's key texts (same choices), so
  # the base's T5 encoder must route there under `seen`; `zero_shot` must exclude that expert.
  config = roe.RoEConfig(embedder="t5", text_format="label", guard="seen", num_queries=4)
  res = roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(tmp_path / "seen"), base=base,
                     config=config, **COMMON)
  assert {t: r["expert_ids"] for t, r in res["routing"]["tasks"].items()} == \
      {t: [OWN[t]] for t in EVAL}
  assert res["routing"]["embedder"].startswith("t5enc-")
  config = roe.RoEConfig(embedder="t5", text_format="label", guard="zero_shot", num_queries=4)
  res = roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(tmp_path / "zs"), base=base,
                     config=config, **COMMON)
  for t, r in res["routing"]["tasks"].items():
    assert r["guard"] == {"mode": "zero_shot", "excluded": [OWN[t]]}
    assert r["expert_ids"] != [OWN[t]]


def test_merge_with_label_free_top_k(base, lib, matrix_run, tmp_path):
  config = roe.RoEConfig(mode="merge", embedder="bm25", guard="seen", num_queries=6,
                         merge_top_k=(1, 2))
  out = tmp_path / "merge"
  res = roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(out), base=base, config=config,
                     **COMMON)
  retrieved = {r["task"]: r for r in json.load(open(out / roe.RETRIEVAL_FILE))["results"]}
  plain = {(r["expert_ids"][0], r["task"], r["example_id"]): r["choice_scores"]
           for r in matrix_run[2]}
  examples_of = {}
  for t, r in res["routing"]["tasks"].items():
    table = r["label_free"]["table"]
    assert [row["top_k"] for row in table] == [1, 2]
    best = min(table, key=lambda row: row["entropy"])
    assert r["label_free"]["selected"]["top_k"] == best["top_k"] == r["merge"]["top_k"]
    ranked = [c["expert"] for c in retrieved[t]["candidates"]]
    assert r["expert_ids"] == r["merge"]["inputs"] == ranked[:best["top_k"]]
    # A merge of one expert is that expert, so the top-1 entropy must equal the entropy of the
    # plain evaluation's choice scores of the same query examples under that expert.
    if t not in examples_of:
      examples_of[t] = [p["example_id"] for p in matrix_run[2] if p["task"] == t][:8]
    ids = [examples_of[t][i] for i in r["query_indices"]]
    scores = np.array([plain[(ranked[0], t, i)] for i in ids])
    assert table[0]["entropy"] == pytest.approx(merging.mean_choice_entropy(scores), rel=1e-5)
    recipe = expert_format.read_metadata(out / roe.MERGED_DIR / r["merge"]["id"])["merge"]
    assert recipe["method"] == "uniform"
    assert [i["name"] for i in recipe["inputs"]] == r["merge"]["inputs"]
  assert res["entries"][0]["id"] == "merge" and res["routing"]["merge"]["top_k"] == [1, 2]


def test_cli_merge_passes_every_merge_option(lib, tmp_path):
  """`eval --merge` flags reach the merge: the merged experts' recipes hold them."""
  out = tmp_path / "ties"
  assert eval_entry.cli_main([
      "--tasks", EVAL[0], "--output_dir",
      str(out), "--library", lib.root, "--merge", "--embedder", "bm25", "--guard", "seen",
      "--num_queries", "4", "--merge_method", "ties", "--merge_top_k", "2", "--merge_density",
      "0.5", "--merge_per_tensor", "--merge_sign_method", "count", *BASE_FLAGS
  ]) == 0
  [r] = results.read_results(str(out / results.RESULTS_FILE))["routing"]["tasks"].values()
  recipe = expert_format.read_metadata(out / roe.MERGED_DIR / r["merge"]["id"])["merge"]
  assert recipe["method"] == "ties" and len(recipe["inputs"]) == 2
  assert recipe["params"] == {"density": 0.5, "per_tensor": True, "sign_method": "count"}


def test_task_arithmetic_merge_with_label_free_lambda(base, lib, tmp_path):
  # λ chosen per prompt; the chosen merge equals the formula on the inputs' arrays: adapter
  # tensors θ₀ + λ Σ θᵢ with θ₀ = 0 (the inputs' init seeds differ), layer norms base + λ Σ (sᵢ −
  # base).
  config = roe.RoEConfig(mode="merge", embedder="bm25", guard="seen", num_queries=4,
                         merge_method="task_arithmetic", merge_top_k=2, merge_lam=(0.25, 1.0))
  out = tmp_path / "ta"
  res = roe.evaluate(library=lib.root, tasks=EVAL[:1], output_dir=str(out), base=base,
                     config=config, **COMMON)
  [r] = res["routing"]["tasks"].values()
  table = r["label_free"]["table"]
  assert [row["lam"] for row in table] == [0.25, 1.0]
  lam = min(table, key=lambda row: row["entropy"])["lam"]
  assert r["merge"]["lam"] == lam and r["merge"]["method"] == "task_arithmetic"
  merged = expert_format.flatten_params(
      expert_format.load_expert(out / roe.MERGED_DIR / r["merge"]["id"])[0])
  inputs = [expert_format.flatten_params(expert_format.load_expert(lib.expert_dir(i))[0])
            for i in r["merge"]["inputs"]]
  flat_base = expert_format.flatten_params(base.params)
  kernel = "encoder/layers_0/mlp_adapter/wi/kernel"
  kernel = kernel if kernel in merged else sorted(n for n in merged if n.endswith("/kernel"))[0]
  np.testing.assert_allclose(merged[kernel], lam * (inputs[0][kernel] + inputs[1][kernel]),
                             rtol=1e-6)
  scale = sorted(n for n in merged if n.endswith("/scale"))[0]
  np.testing.assert_allclose(
      merged[scale], flat_base[scale] + lam * (inputs[0][scale] + inputs[1][scale]
                                               - 2 * flat_base[scale]), rtol=1e-6, atol=1e-7)


def test_continual_addition_keeps_old_experts_bitwise_and_reports_routing(base, experts,
                                                                          tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib")
  for path in experts[:2]:  # sentiment and topic only; overlap and length come later.
    lib.add(path)
  old = lib.ids()

  def own_eval(out):
    evaluation.evaluate(tasks=EVAL, output_dir=str(out), base=base,
                        expert_paths=[lib.expert_dir(i) for i in old], expert_names=old, **COMMON)
    return (out / results.PREDICTIONS_FILE).read_bytes()

  config = roe.RoEConfig(embedder="bm25", guard="seen", num_queries=6)
  before = own_eval(tmp_path / "own_before")
  first = roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(tmp_path / "roe1"),
                       base=base, config=config, **COMMON)
  for path in experts[2:]:
    lib.add(path)
  for i in old:
    lib.verify(i)  # Old experts' files are untouched.
  assert own_eval(tmp_path / "own_after") == before  # Bitwise-identical predictions.
  second = roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(tmp_path / "roe2"),
                        base=base, config=config,
                        previous_results=str(tmp_path / "roe1" / results.RESULTS_FILE), **COMMON)
  changes = second["routing"]["changes"]
  assert changes["num_compared"] == 3 and second["routing"]["library"]["num_experts"] == 4
  # Reported, not asserted: every listed change matches the two runs' own routing records.
  moved = {c["task"]: (c["before"], c["after"]) for c in changes["changed"]}
  for t in EVAL:
    pair = (first["routing"]["tasks"][t]["expert_ids"], second["routing"]["tasks"][t]["expert_ids"])
    assert (t in moved) == (pair[0] != pair[1]) and moved.get(t, pair) == pair


def test_bad_settings_fail_with_one_clear_line(base, lib, tmp_path, capsys):
  with pytest.raises(ValueError, match="merge_lam .* applies to task_arithmetic"):
    roe.RoEConfig(mode="merge", merge_lam=(0.5, 1.0))
  with pytest.raises(ValueError, match="guard must be one of"):
    roe.RoEConfig(guard="sometimes")
  flags = ["--tasks", EVAL[0], "--output_dir", str(tmp_path / "x"), *BASE_FLAGS]
  assert eval_entry.cli_main(flags + ["--roe"]) == 2
  assert "need an expert library" in capsys.readouterr().err
  assert eval_entry.cli_main(flags + ["--library", lib.root]) == 2
  assert "only used with roe" in capsys.readouterr().err
  other = base_models.load_base(model_config="tiny", random_init_seed=1,
                                config_overrides={"vocab_size": DEMO_VOCAB})
  with pytest.raises(ValueError, match="holds experts of base"):
    roe.evaluate(library=lib.root, tasks=EVAL, output_dir=str(tmp_path / "y"), base=other,
                 config=roe.RoEConfig(embedder="bm25"), **COMMON)


def test_gin_entry_point_runs_roe(lib, roe_cli_run, tmp_path):
  # The gin function as `python -m expert_t5x.eval --gin_file=runs/eval_roe.gin` binds it; its
  # routing must equal the CLI run's (same library, embedder, guard and queries).
  import gin  # pylint: disable=g-import-not-at-top
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  gin_evaluate = gin_utils.configurable(eval_entry.evaluate)
  bindings = ["CHECKPOINT_PATH = None", f"EVAL_OUTPUT_DIR = '{tmp_path / 'gin'}'",
              f"MIXTURE_OR_TASK_NAME = '{','.join(EVAL)}'", "MODEL_CONFIG = 'tiny'",
              "RANDOM_INIT_SEED = 0", f"CONFIG_OVERRIDES = {{'vocab_size': {DEMO_VOCAB}}}",
              "MAX_EXAMPLES = 8", "BATCH_SIZE = 8", "BOOTSTRAP_SAMPLES = 20", "PROGRESS = False",
              f"LIBRARY_PATH = '{lib.root}'", "EMBEDDER = 'bm25'", "GUARD = 'seen'",
              "NUM_QUERIES = 6"]
  try:
    gin_utils.parse_gin_flags([], ["runs/eval_roe.gin"], bindings)
    res = gin_evaluate()
  finally:
    gin.clear_config()
  cli = results.read_results(str(roe_cli_run[1] / results.RESULTS_FILE))
  assert res["routing"]["tasks"] == cli["routing"]["tasks"]
