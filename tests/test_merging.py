"""Tests for merging: every formula against small arrays computed by hand (values written in the
tests)."""

import json
import os

import numpy as np
import pytest

from expert_t5x import expert_format
from expert_t5x import merging

BASE = "b" * 64

# Hand-computed TIES case (density 0.5 keeps the 2 largest magnitudes of each expert):
#   tau1 = [ 1.0, -2.0,  0.5,  3.0] -> trimmed [ 0, -2,  0, 3]
#   tau2 = [-1.5,  1.0,  0.2, -0.1] -> trimmed [-1.5, 1, 0, 0]
#   tau3 = [ 2.0,  0.3, -4.0,  0.4] -> trimmed [ 2,  0, -4, 0]
#   mass = [0.5, -1, -4, 3] -> sign [+, -, -, +]; agreeing entries: [2], [-2], [-4], [3]
#   count votes = [0, 0, -1, +1] -> sign [0, 0, -, +] -> [0, 0, -4, 3]
TAUS = [
    np.array([1.0, -2.0, 0.5, 3.0]),
    np.array([-1.5, 1.0, 0.2, -0.1]),
    np.array([2.0, 0.3, -4.0, 0.4])
]


def _merge(method, taus, **params):
  names = list(taus[0])
  merged, _ = merging.merge_task_vectors(method, names, len(taus), lambda i, n: taus[i][n],
                                         **params)
  return merged


def test_ties_trim_elect_disjoint_mean_by_hand():
  taus = [{"w": t} for t in TAUS]
  np.testing.assert_array_equal(_merge("ties", taus, density=0.5)["w"], [2.0, -2.0, -4.0, 3.0])
  np.testing.assert_array_equal(
      _merge("ties", taus, density=0.5, lam=0.5)["w"], [1.0, -1.0, -2.0, 1.5])
  np.testing.assert_array_equal(
      _merge("ties", taus, density=0.5, sign_method="count")["w"], [0, 0, -4.0, 3.0])
  # density 1 keeps everything; mass [1.5, -0.7, -3.3, 3.3]; agreeing means [1.5, -2, -4, 1.7].
  np.testing.assert_allclose(_merge("ties", taus, density=1.0)["w"], [1.5, -2.0, -4.0, 1.7])


def test_ties_global_versus_per_tensor_trim():
  # One expert, a=[1,2], b=[10,20], density 0.5: globally the 2 largest of 4 are both in b;
  # per tensor the largest of each tensor survives.
  taus = [{"a": np.array([1.0, 2.0]), "b": np.array([10.0, 20.0])}]
  merged = _merge("ties", taus, density=0.5)
  np.testing.assert_array_equal(merged["a"], [0, 0])
  np.testing.assert_array_equal(merged["b"], [10, 20])
  merged = _merge("ties", taus, density=0.5, per_tensor=True)
  np.testing.assert_array_equal(merged["a"], [0, 2])
  np.testing.assert_array_equal(merged["b"], [0, 20])


def test_dare_fixed_mask_and_expectation():
  # Fixed mask: drop entries 0 and 3 with p = 0.5 -> survivors doubled.
  tau = np.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_array_equal(
      merging.dare_rescale(tau, np.array([True, False, False, True]), 0.5), [0, 4, 6, 0])
  # E[τ̃] = τ: the mean over 40k entries of a rescaled constant vector is 1 within 5 standard
  # errors.
  mask = merging.dare_mask(3, 0, "x", (40000,), 0.75)
  assert abs(mask.mean() - 0.75) < 0.01
  assert abs(merging.dare_rescale(np.ones(40000), mask, 0.75).mean() - 1.0) < 5 * np.sqrt(3) / 200
  # Seeded: same (seed, expert, name) -> same mask; a different expert or name -> different mask.
  np.testing.assert_array_equal(mask, merging.dare_mask(3, 0, "x", (40000,), 0.75))
  assert (mask != merging.dare_mask(3, 1, "x", (40000,), 0.75)).any()
  assert (mask != merging.dare_mask(3, 0, "y", (40000,), 0.75)).any()
  # dare + linear = λ Σ rescaled; recomputed here from the masks.
  taus = [{"w": t} for t in TAUS]
  merged = _merge("dare", taus, drop=0.5, seed=7, lam=0.5)["w"]
  expected = 0.5 * sum(merging.dare_rescale(t, merging.dare_mask(7, i, "w", (4,), 0.5), 0.5)
                       for i, t in enumerate(TAUS))
  np.testing.assert_allclose(merged, expected)
  # drop 0 with TIES combine and density-free election equals TIES at density 1.
  np.testing.assert_allclose(
      _merge("dare", taus, drop=0.0, combine="ties")["w"], [1.5, -2.0, -4.0, 1.7])


def test_linear_methods_by_hand():
  # θ0 = [1, 1], θ1 = [2, 0], θ2 = [0, 3]; λ = 0.5: τ = [1,-1], [-1,2] -> θ0 + 0.5·[0, 1] = [1,
  # 1.5].
  trees = [{"w": np.array([2.0, 0.0])}, {"w": np.array([0.0, 3.0])}]
  ref = {"w": np.array([1.0, 1.0])}
  np.testing.assert_array_equal(
      merging.merge_pytrees("task_arithmetic", trees, ref, lam=0.5)["w"], [1.0, 1.5])
  np.testing.assert_array_equal(merging.merge_pytrees("uniform", trees)["w"], [1.0, 1.5])
  # weights [1, 3] are normalised to [0.25, 0.75]: [0.5, 2.25].
  np.testing.assert_array_equal(
      merging.merge_pytrees("weighted", trees, weights=[1, 3])["w"], [0.5, 2.25])
  with pytest.raises(merging.MergeError, match="one value per expert"):
    merging.merge_pytrees("weighted", trees, weights=[1])
  with pytest.raises(merging.MergeError, match="Unknown merge method"):
    merging.merge_pytrees("fisher", trees)
  with pytest.raises(merging.MergeError, match="density"):
    merging.merge_pytrees("ties", trees, density=0.0)


def test_merging_one_expert_returns_it():
  rng = np.random.default_rng(0)
  tree = {
      "enc": {"k": rng.normal(size=(3, 5)).astype(np.float32)},
      "s": rng.normal(size=(5,)).astype(np.float32)
  }
  ref = {"enc": {"k": rng.normal(size=(3, 5)).astype(np.float32)}, "s": np.ones(5, np.float32)}
  for method, params in [("uniform", {}), ("weighted", {"weights": [2.0]}), ("task_arithmetic", {}),
                         ("ties", {"density": 1.0}), ("dare", {"drop": 0.0})]:
    out = merging.merge_pytrees(method, [tree], ref, **params)
    assert expert_format.tree_digest(out) == expert_format.tree_digest(tree), method


def test_topk_threshold_in_place_equals_copy():
  """In-place partition (the global TIES buffer) vs np.sort's k-th largest magnitude."""
  mags = np.abs(np.random.default_rng(0).normal(size=1001))
  for density in (0.01, 0.2, 0.5, 1.0):
    keep = int(np.ceil(density * mags.size))
    want = 0.0 if keep >= mags.size else np.sort(mags)[mags.size - keep]
    buf = mags.copy()
    assert merging.topk_threshold(mags, density) == merging.topk_threshold(
        buf, density, overwrite=True) == want


def test_streaming_reads_each_tensor_at_most_three_times():
  reads = {}

  def tau(i, name):
    reads[(i, name)] = reads.get((i, name), 0) + 1
    return np.arange(6.0) * (i + 1) - 2

  for method, params in [("ties", {}), ("ties", {"per_tensor": True}),
                         ("dare", {"combine": "ties"}), ("uniform", {}), ("task_arithmetic", {})]:
    reads.clear()
    merging.merge_task_vectors(method, ["a", "b"], 5, tau, **params)
    assert max(reads.values()) <= 3, (method, params)


def _lora_expert(path, seed, rank=2, alpha=4.0):
  rng = np.random.default_rng(seed)
  params = {"encoder/layers_0/attention/query/lora_a": rng.normal(size=(6, rank)),
            "encoder/layers_0/attention/query/lora_b": rng.normal(size=(rank, 5)),
            "decoder/layers_0/mlp/wo/lora_a": rng.normal(size=(4, rank)),
            "decoder/layers_0/mlp/wo/lora_b": rng.normal(size=(rank, 3))}
  meta = expert_format.build_metadata("lora", {
      "kind": "lora", "rank": rank, "alpha": alpha, "dropout_rate": 0.0, "targets": ["x"],
      "init_seed": 0
  },
                                      base_fingerprint=BASE,
                                      base_config_name="tiny",
                                      provenance=[{
                                          "task": f"t{seed}", "dataset": f"d{seed}", "subset": None,
                                          "prompt": "p", "role": "train"
                                      }])
  expert_format.save_expert(path, params, meta)
  return str(path), {k: v.astype(np.float32) for k, v in params.items()}, alpha / rank


def test_concatenated_rank_lora_equals_merged_delta_w(tmp_path):
  inputs = [_lora_expert(tmp_path / f"l{i}", i, rank=2 + i, alpha=4.0 + i) for i in range(3)]
  out = tmp_path / "merged"
  recipe = merging.merge_expert_dirs([d for d, _, _ in inputs],
                                     str(out),
                                     "weighted",
                                     weights=[1, 2, 1])
  merged, meta = expert_format.load_expert(out)
  flat = expert_format.flatten_params(merged)
  assert meta["type"] == "lora" and meta["config"]["rank"] == 9 and meta["config"]["alpha"] == 9.0
  assert recipe["lora"]["output"] == "concatenated_rank"
  for m in ("encoder/layers_0/attention/query", "decoder/layers_0/mlp/wo"):
    want = sum(w * s * p[f"{m}/lora_a"].astype(np.float64) @ p[f"{m}/lora_b"]
               for w, (_, p, s) in zip([0.25, 0.5, 0.25], inputs))
    got = meta["config"]["alpha"] / meta["config"]["rank"] * flat[f"{m}/lora_a"] @ flat[
        f"{m}/lora_b"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_inputs_of_one_rank_and_alpha_keep_their_scale(tmp_path):
  """Merging one LoRA expert (alpha != rank) returns it bitwise; k inputs of one (rank, alpha) give
  rank k·r, alpha k·α, and ΔW = Σ cᵢ (α/r) AᵢBᵢ recomputed here in float64."""
  d0, p0, _ = _lora_expert(tmp_path / "a", 0, rank=2, alpha=16.0)
  merging.merge_expert_dirs([d0], str(tmp_path / "one"), "uniform")
  assert expert_format.read_metadata(tmp_path / "one")["content_hash"] == \
      expert_format.read_metadata(d0)["content_hash"]
  d1, p1, s = _lora_expert(tmp_path / "b", 1, rank=2, alpha=16.0)
  merging.merge_expert_dirs([d0, d1], str(tmp_path / "two"), "task_arithmetic", lam=0.5)
  merged, meta = expert_format.load_expert(tmp_path / "two")
  assert (meta["config"]["rank"], meta["config"]["alpha"]) == (4, 32.0)
  flat = expert_format.flatten_params(merged)
  m = "encoder/layers_0/attention/query"
  want = sum(0.5 * s * p[f"{m}/lora_a"].astype(np.float64) @ p[f"{m}/lora_b"] for p in (p0, p1))
  got = 32.0 / 4 * flat[f"{m}/lora_a"].astype(np.float64) @ flat[f"{m}/lora_b"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_experts_of_other_tensor_shapes_are_refused(tmp_path):
  """Adapters of reduction factors 2 and 4 share tensor names, not shapes (numpy would broadcast
  (4, 1) into (4, 2)); LoRA factors of other ranks stay mergeable (the concatenation test above)."""
  d0 = _adapter_expert(tmp_path / "a", 0)[0]
  params = {"encoder/layers_0/mlp_adapter/wi/kernel": np.ones((4, 1)),
            "encoder/layers_0/mlp_adapter/wi/bias": np.ones((1,)),
            "encoder/layers_0/pre_mlp_layer_norm/scale": np.ones((4,))}
  meta = expert_format.build_metadata(
      "adapter", {"kind": "adapter", "reduction_factor": 4, "init_seed": 0}, base_fingerprint=BASE,
      base_config_name="tiny",
      provenance=[{"task": "t9", "dataset": "d9", "subset": None, "prompt": "p", "role": "train"}])
  expert_format.save_expert(tmp_path / "b", params, meta)
  with pytest.raises(merging.MergeError,
                     match=r"has 'encoder/layers_0/mlp_adapter/wi/bias' of shape \(1,\)"):
    merging.merge_expert_dirs([d0, str(tmp_path / "b")], str(tmp_path / "m"), "uniform")


def test_ties_on_lora_gives_full_delta_and_svd_records_error(tmp_path):
  inputs = [_lora_expert(tmp_path / f"l{i}", i) for i in range(2)]
  dirs = [d for d, _, _ in inputs]
  recipe = merging.merge_expert_dirs(dirs, str(tmp_path / "full"), "ties", density=1.0)
  merged, meta = expert_format.load_expert(tmp_path / "full")
  assert meta["type"] == "full" and recipe["output_type"] == "full"
  flat = expert_format.flatten_params(merged)
  # Independent check: TIES at density 1 on the two ΔW matrices via merge_pytrees.
  m = "encoder/layers_0/attention/query"
  deltas = [{"w": s * p[f"{m}/lora_a"].astype(np.float64) @ p[f"{m}/lora_b"]} for _, p, s in inputs]
  np.testing.assert_allclose(flat[f"{m}/kernel"],
                             merging.merge_pytrees("ties", deltas, density=1.0)["w"],
                             rtol=1e-6,
                             atol=1e-6)
  # The rank-4 merged ΔW (two rank-2 deltas) is reproduced exactly at rank 4, not at rank 1.
  recipe = merging.merge_expert_dirs(dirs, str(tmp_path / "svd4"), "task_arithmetic", svd_rank=4)
  assert recipe["lora"]["output"] == "concatenated_rank"  # linear methods stay exact
  recipe = merging.merge_expert_dirs(dirs, str(tmp_path / "svd1"), "dare", drop=0.0, svd_rank=1)
  assert recipe["lora"]["max_relative_error"] > 0.01
  recipe = merging.merge_expert_dirs(dirs, str(tmp_path / "svd4b"), "dare", drop=0.0, svd_rank=4)
  assert recipe["lora"]["max_relative_error"] < 1e-6


def _adapter_expert(path, seed, init_seed=0):
  rng = np.random.default_rng(seed)
  params = {"encoder/layers_0/mlp_adapter/wi/kernel": rng.normal(size=(4, 2)),
            "encoder/layers_0/mlp_adapter/wi/bias": rng.normal(size=(2,)),
            "encoder/layers_0/pre_mlp_layer_norm/scale": 1.0 + 0.1 * rng.normal(size=(4,))}
  meta = expert_format.build_metadata(
      "adapter", {"kind": "adapter", "reduction_factor": 2, "init_seed": init_seed},
      base_fingerprint=BASE,
      base_config_name="tiny",
      provenance=[{
          "task": f"t{seed}", "dataset": f"d{seed}", "subset": None, "prompt": "p", "role": "train"
      }])
  expert_format.save_expert(path, params, meta)
  return str(path), {k: v.astype(np.float32) for k, v in params.items()}


def test_adapter_task_arithmetic_uses_init_and_base_references(tmp_path):
  inputs = [_adapter_expert(tmp_path / f"a{i}", i) for i in range(2)]
  dirs = [d for d, _ in inputs]
  base = {"encoder/layers_0/pre_mlp_layer_norm/scale": np.full(4, 0.5, np.float32)}
  init = {"encoder/layers_0/mlp_adapter/wi/kernel": np.full((4, 2), 0.25, np.float32),
          "encoder/layers_0/mlp_adapter/wi/bias": np.zeros(2, np.float32)}
  with pytest.raises(merging.MergeError, match="--base"):
    merging.merge_expert_dirs(dirs, str(tmp_path / "x"), "task_arithmetic", init_params=init)
  recipe = merging.merge_expert_dirs(dirs, str(tmp_path / "ta"), "task_arithmetic", lam=0.5,
                                     base_params=base, init_params=init)
  assert recipe["reference"] == {"adapter": "init", "layer_norm": "base"}
  out = expert_format.flatten_params(expert_format.load_expert(tmp_path / "ta")[0])
  p0, p1 = inputs[0][1], inputs[1][1]
  k = "encoder/layers_0/mlp_adapter/wi/kernel"
  np.testing.assert_allclose(out[k], 0.25 + 0.5 * ((p0[k] - 0.25) + (p1[k] - 0.25)), rtol=1e-6)
  s = "encoder/layers_0/pre_mlp_layer_norm/scale"
  np.testing.assert_allclose(out[s], 0.5 + 0.5 * ((p0[s] - 0.5) + (p1[s] - 0.5)), rtol=1e-6)
  # Different init seeds: the adapter reference is zero (θ itself), recorded in the recipe.
  other = _adapter_expert(tmp_path / "a9", 9, init_seed=5)[0]
  recipe = merging.merge_expert_dirs([dirs[0], other], str(tmp_path / "ta0"), "task_arithmetic",
                                     base_params=base)
  assert recipe["reference"]["adapter"] == "zero"
  # Uniform averaging needs no references and merging one expert reproduces its content hash.
  recipe = merging.merge_expert_dirs(dirs[:1], str(tmp_path / "one"), "uniform")
  assert recipe["output_hash"] == expert_format.read_metadata(dirs[0])["content_hash"]


def test_mixed_types_and_bases_are_refused(tmp_path):
  a, _ = _adapter_expert(tmp_path / "a", 0)
  lora, _, _ = _lora_expert(tmp_path / "l", 1)
  with pytest.raises(merging.MergeError, match="merge one type"):
    merging.merge_expert_dirs([a, lora], str(tmp_path / "x"), "uniform")


def test_cli_recipe_rerun_is_bitwise_identical(tmp_path, capsys):
  dirs = [_lora_expert(tmp_path / f"l{i}", i)[0] for i in range(3)]
  out1, out2 = str(tmp_path / "m1"), str(tmp_path / "m2")
  args = [
      "--method", "dare", "--drop", "0.3", "--seed", "11", "--combine", "ties", "--svd-rank", "2"
  ]
  assert merging.merge_main(args + ["--experts", *dirs, "--output", out1,
                                    "--recipe-out", str(tmp_path / "r.json")]) == 0
  assert merging.merge_main(["--recipe", str(tmp_path / "r.json"), "--experts", *dirs[::-1],
                             "--output", out2]) == 0
  h1 = expert_format.read_metadata(out1)["content_hash"]
  assert h1 == expert_format.read_metadata(out2)["content_hash"]
  # Bitwise: every tensor's bytes are equal (the safetensors header's metadata order may differ).
  t1, t2 = (expert_format.flatten_params(expert_format.load_expert(o)[0]) for o in (out1, out2))
  assert list(t1) == list(t2) and all(t1[n].tobytes() == t2[n].tobytes() for n in t1)
  recipe = json.load(open(tmp_path / "r.json"))
  assert recipe["output_hash"] == h1 and len(recipe["inputs"]) == 3
  assert merging.merge_main(["--recipe", str(tmp_path / "r.json"), "--experts", dirs[0],
                             "--output", str(tmp_path / "m3")]) == 1
  assert "were not found" in capsys.readouterr().err
  # A rerun that does not reproduce the recipe's output hash fails with one line.
  json.dump(dict(recipe, output_hash="0" * 64), open(tmp_path / "bad.json", "w"))
  assert merging.merge_main(["--recipe", str(tmp_path / "bad.json"), "--experts", *dirs,
                             "--output", str(tmp_path / "m4")]) == 1
  assert "was not reproduced" in capsys.readouterr().err
  json.dump(dict(recipe, output_hash="0" * 64, format=1), open(tmp_path / "old.json", "w"))
  assert merging.merge_main(["--recipe", str(tmp_path / "old.json"), "--experts", *dirs,
                             "--output", str(tmp_path / "m5")]) == 1
  assert "of an earlier format" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "m4") and not any(".rerun-" in n
                                                         for n in os.listdir(tmp_path))
  # A reproduced rerun replaces an existing output only with --overwrite.
  assert merging.merge_main(
      ["--recipe", str(tmp_path / "r.json"), "--experts", *dirs, "--output", out1]) == 1
  assert "exists; pass --overwrite" in capsys.readouterr().err
  assert merging.merge_main(
      ["--recipe",
       str(tmp_path / "r.json"), "--experts", *dirs, "--output", out1, "--overwrite"]) == 0
  assert expert_format.read_metadata(out1)["content_hash"] == h1
  with pytest.raises(SystemExit) as e:
    merging.merge_main(["--help"])
  assert e.value.code == 0


def test_label_free_selection_by_entropy():
  # Entropy of softmax([0, 0]) = ln 2, of a confident row ≈ 0; an absent (-inf) choice contributes
  # nothing.
  assert merging.mean_choice_entropy(np.array([[0.0, 0.0]])) == pytest.approx(np.log(2))
  assert merging.mean_choice_entropy(np.array([[0.0, 0.0, -np.inf]])) == pytest.approx(np.log(2))
  scores = {1: np.array([[0.0, 0.0]]), 3: np.array([[10.0, 0.0]])}
  best, table = merging.select_label_free([1, 3], lambda k: scores[k])
  assert best == 3 and table[0]["entropy"] > table[1]["entropy"]
