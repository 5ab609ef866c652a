"""Tests for the merge-method configs: validation, the one table, round trips, unchanged recipes."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from expert_t5x import expert_format
from expert_t5x import merge_cli
from expert_t5x import merging
from expert_t5x import validation

BASE = "b" * 64
# The hand-computed TIES case of test_merging.py, one task vector per expert (full experts store
# it).
TAUS = [
    np.array([1.0, -2.0, 0.5, 3.0]),
    np.array([-1.5, 1.0, 0.2, -0.1]),
    np.array([2.0, 0.3, -4.0, 0.4])
]


def test_one_table_names_every_method_and_feeds_the_cli():
  assert merging.METHODS == ("uniform", "weighted", "task_arithmetic", "ties", "dare")
  assert all(cls.name == name for name, cls in merging.METHOD_CONFIGS.items())
  assert merging.LINEAR_METHODS == ("uniform", "weighted", "task_arithmetic")
  method_flag = next(a for a in merge_cli._parser()._actions if a.dest == "method")
  assert tuple(method_flag.choices) == merging.METHODS


def test_unknown_method_is_one_line_listing_the_choices():
  with pytest.raises(merging.MergeError) as e:
    merging.method_config("fisher", {})
  assert "\n" not in str(e.value) and "'fisher'" in str(e.value)
  assert all(repr(name) in str(e.value) for name in merging.METHODS)


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: merging.TIES(density=0.0), merging.MergeError, ["density", "0.0", "(0, 1]"]),
        (lambda: merging.TIES(density=1.5), merging.MergeError, ["density", "1.5", "(0, 1]"]),
        (lambda: merging.TIES(density=math.nan), validation.UsageError,
         ["--density", "nan", "finite"]),
        (lambda: merging.TIES(sign_method="vote"), merging.MergeError,
         ["sign_method", "'vote'", "'mass'"]),
        (lambda: merging.DARE(drop=1.0), merging.MergeError, ["drop", "1.0", "[0, 1)"]),
        (lambda: merging.DARE(drop=-0.1), merging.MergeError, ["drop", "-0.1", "[0, 1)"]),
        (lambda: merging.DARE(seed=-1), merging.MergeError, ["seed", "-1", ">= 0"]),
        (lambda: merging.DARE(combine="mean"), merging.MergeError,
         ["combine", "'mean'", "'linear'"]),
        (lambda: merging.TaskArithmetic(lam=math.inf), validation.UsageError,
         ["--lam", "inf", "finite"]),
        (lambda: merging.WeightedMerge(weights=(1.0, math.nan)), validation.UsageError,
         ["--weights", "nan", "finite"]),
        (lambda: merging.WeightedMerge(weights=(-1.0, 1.0)), merging.MergeError,
         ["Weights", "-1.0", "sum to a positive"]),
        (lambda: merging.WeightedMerge(), merging.MergeError,
         ["--weights", "None", "one value per expert"]),
        # Parameters a method does not use are still checked (recipes record them).
        (lambda: merging.method_config("uniform", {"lam": math.nan}), validation.UsageError,
         ["--lam", "nan"]),
    ])
def test_bad_values_fail_on_construction_with_one_line(make, error, words):
  with pytest.raises(error) as e:
    make()
  assert "\n" not in str(e.value)
  assert all(w in str(e.value) for w in words), str(e.value)


def test_negative_lambda_and_weights_are_task_negation():
  # θ1 = [1, 0], θ2 = [0, 1]: weights [2, -1] (sum 1) give [2, -1]; λ = -1 negates Σ τ = [1, 1].
  trees = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 1.0])}]
  weighted = merging.WeightedMerge(weights=(2.0, -1.0))
  np.testing.assert_array_equal(merging.merge_pytrees(weighted, trees)["w"], [2.0, -1.0])
  negated = merging.TaskArithmetic(lam=-1.0)
  np.testing.assert_array_equal(
      merging.merge_pytrees(negated, trees, {"w": np.zeros(2)})["w"], [-1.0, -1.0])


def test_wrong_number_of_weights_is_refused_at_merge_time():
  with pytest.raises(merging.MergeError, match=r"one value per expert \(3\); got \[1.0, 2.0\]"):
    merging.WeightedMerge(weights=(1.0, 2.0)).resolve(3)


CONFIGS = [merging.UniformMerge(), merging.WeightedMerge(weights=(1.0, 2.0, 1.0)),
           merging.TaskArithmetic(lam=-0.5),
           merging.TIES(lam=0.8, density=0.5, per_tensor=True, sign_method="count"),
           merging.DARE(lam=0.5, sign_method="count", drop=0.3, seed=11, combine="ties")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_recipe_config_round_trip(config, tmp_path):
  assert merging.method_config(config.name, config.to_params()) == config
  assert json.loads(json.dumps(config.to_params())) == config.to_params()  # plain JSON
  dirs = _full_experts(tmp_path)
  recipe = merging.merge_expert_dirs(dirs, str(tmp_path / "by_config"), config)
  assert recipe["method"] == config.name and recipe["params"] == config.to_params()
  assert merging.method_config(recipe["method"], recipe["params"]) == config
  # The config and its name + params dict are one merge, bitwise.
  again = merging.merge_expert_dirs(dirs, str(tmp_path / "by_name"), config.name,
                                    **config.to_params())
  assert again["output_hash"] == recipe["output_hash"]
  with pytest.raises(merging.MergeError, match="inside the"):
    merging.merge_expert_dirs(dirs, str(tmp_path / "both"), config, lam=1.0)


def _full_experts(tmp_path):
  dirs = []
  for i, tau in enumerate(TAUS):
    meta = expert_format.build_metadata("full", {"kind": "full"},
                                        base_fingerprint=BASE,
                                        base_config_name="tiny",
                                        provenance=[{
                                            "task": f"t{i}", "dataset": f"d{i}", "subset": None,
                                            "prompt": "p", "role": "train"
                                        }])
    expert_format.save_expert(tmp_path / f"e{i}", {"encoder/w": tau}, meta)
    dirs.append(str(tmp_path / f"e{i}"))
  return dirs


# (method, params) -> merged tensor by hand, resolved params, output hash and sha256 of the recipe
# JSON (`--recipe-out` bytes). The hashes were pinned from the code before methods were configs.
UNCHANGED = [
    ("uniform", {}, [0.5, -0.7 / 3, -1.1,
                     1.1], {}, "33a4b3afa633c392b561bfd515537dd2851e24613c771b510a86bb701ce16bac",
     "9024084cdcc4a9863856909e3025664a4b280a464b5be7ac549557e64729bf10"),
    # 0.25 τ1 + 0.5 τ2 + 0.25 τ3.
    ("weighted", {"weights": [1.0, 2.0, 1.0]}, [0.0, 0.075, -0.775,
                                                0.8], {"weights": [0.25, 0.5, 0.25]},
     "1bea932af34028791f5d3b4ecf17aa3b6fb535a36b9df63c8706a7fb44a0cf9c",
     "f6abb97a9b1adbe06a617e91fce1e712f6d4ad2e6db3484dbfb41478b6b67b1f"),
    # 0.5 Σ τ = 0.5 [1.5, -0.7, -3.3, 3.3].
    ("task_arithmetic", {"lam": 0.5}, [0.75, -0.35, -1.65, 1.65], {"lam": 0.5},
     "b3fc19c4f869ab14a37bbf4cd3a3eeee11df082665e1992b72947471cdee08b2",
     "1c8eea170ff0bed03f7d7a0425bfca41b23078c0b11218403787e272681323ca"),
    # test_merging.py's TIES case.
    ("ties", {"density": 0.5}, [2.0, -2.0, -4.0, 3.0],
     {"density": 0.5, "lam": 1.0, "per_tensor": False,
      "sign_method": "mass"}, "3feb1a131a1c2ca6bf553fa7df89d0eb1e0f839ec589db6a61ad5b5b0b1fab38",
     "18e6824df29450b2cb29519edbc197ce74a95d026feae91135691ce2f6e6cab5"),
    # Seed 7's masks keep τ1[1], τ1[3], τ2[1] and τ3[0], doubled: [2·2, 2·(-2+1), 0, 2·3].
    ("dare", {"drop": 0.5, "seed": 7}, [4.0, -2.0, 0.0, 6.0],
     {"combine": "linear", "drop": 0.5, "lam": 1.0, "seed": 7,
      "sign_method": "mass"}, "aa93a4e04da21959ef912d934040d552b00af7e60a9565b32c50c9cff3062520",
     "c95369ad932a589ad24962c219c9599f2931287450aab71a6d7e0fe2a7daeb0a"),
    # Nothing dropped + TIES combine = TIES at density 1 (test_merging.py).
    ("dare", {"drop": 0.0, "combine": "ties"}, [1.5, -2.0, -4.0, 1.7],
     {"combine": "ties", "drop": 0.0, "lam": 1.0, "seed": 0,
      "sign_method": "mass"}, "6b918535ce6d272a62eaca4ad07253e70124e9f02087fd6831d6bf3151e97a1d",
     "d75b111390188f889674d5a1f6ffd1bb150457acb1ce22d84e5e5696cec6ce19"),
]


@pytest.mark.parametrize("method,params,want,resolved,output_hash,recipe_sha", UNCHANGED,
                         ids=[f"{m}-{sorted(p)}" for m, p, *_ in UNCHANGED])
def test_recipes_and_merged_params_are_unchanged(tmp_path, method, params, want, resolved,
                                                 output_hash, recipe_sha):
  out = tmp_path / "merged"
  recipe = merging.merge_expert_dirs(_full_experts(tmp_path),
                                     str(out),
                                     method,
                                     input_names=["a", "b", "c"],
                                     **params)
  merged = expert_format.flatten_params(expert_format.load_expert(out)[0])["encoder/w"]
  np.testing.assert_allclose(merged, want, rtol=1e-6, atol=1e-7)
  assert (recipe["params"], recipe["resolved_params"]) == (params, resolved)
  assert recipe["reference"] == {"full": "stored delta"} and recipe["output_type"] == "full"
  assert recipe["output_hash"] == output_hash
  merging.write_recipe(str(tmp_path / "r.json"), recipe)
  assert hashlib.sha256((tmp_path / "r.json").read_bytes()).hexdigest() == recipe_sha
  assert merging.read_recipe(str(tmp_path / "r.json")) == recipe
