"""Tests for expert_t5x.trees: the one flattening of parameter trees."""

from __future__ import annotations

import numpy as np
from flax import traverse_util
from flax.core import freeze

from expert_t5x import trees


def test_flatten_matches_flax_and_round_trips():
  tree = {"encoder": freeze({"layers_0": {"kernel": np.ones((2, 3)), "axes": ("embed", "mlp")},
                             "empty": {}}),
          "shared": np.zeros(4)}
  flat = trees.flatten(tree)
  assert flat == traverse_util.flatten_dict(dict(tree), sep="/")  # same keys, order and leaves
  assert list(flat) == ["encoder/layers_0/kernel", "encoder/layers_0/axes", "shared"]
  assert trees.unflatten(flat) == traverse_util.unflatten_dict(flat, sep="/")


def test_flatten_params_is_sorted_numpy_and_digest_ignores_nesting():
  tree = {"b": {"x": [1.0, 2.0]}, "a": np.float32(3)}
  flat = trees.flatten_params(tree)
  assert list(flat) == ["a", "b/x"] and all(isinstance(v, np.ndarray) for v in flat.values())
  assert trees.tree_digest(tree) == trees.tree_digest(flat)
  assert trees.unflatten_params(flat)["b"]["x"].tolist() == [1.0, 2.0]
