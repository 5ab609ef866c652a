"""Parameter trees <-> `/`-keyed flat dictionaries, and their content digest.

One module for every flattening in the project: `flatten`/`unflatten` keep leaves as they are (jax
arrays stay on device); `flatten_params`/`unflatten_params` are the numpy, sorted, strict variant
of the expert format; `tree_digest` is the process- and platform-independent digest of a tree
(expert content hashes, base fingerprints, embedder identities). Needs only numpy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """`{'a': {'b': x}}` -> `{'a/b': x}`, leaves unchanged, in tree order; empty branches vanish."""
  flat: dict[str, Any] = {}
  for key, child in tree.items():
    if isinstance(child, Mapping):
      flat.update({f"{key}{SEP}{k}": v for k, v in flatten(child).items()})
    else:
      flat[key] = child
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`: `{'a/b': x}` -> `{'a': {'b': x}}` (plain dicts)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _is_branch(node: Any) -> bool:
  # FrozenDict and plain dicts are both Mappings; arrays never are.
  return isinstance(node, Mapping)


def flatten_params(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flattens a nested parameter tree into `{'a/b/c': np.ndarray}`.

  Keys that already contain `/` are kept as they are, so flattening a flat
  dictionary is the identity. Leaves are converted with `np.asarray` (jax
  arrays are copied to host); their dtype is not changed.

  Args:
    tree: nested mappings whose leaves are array-likes.

  Returns:
    A dictionary from `/`-joined path to numpy array, in sorted key order.
  """
  if not _is_branch(tree):
    raise TypeError(f"flatten_params: expected a nested mapping of arrays, got "
                    f"{type(tree).__name__}; pass a params dict such as "
                    f"variables['params'].")
  flat: dict[str, np.ndarray] = {}

  def visit(prefix: str, node: Any) -> None:
    for key, child in node.items():
      if not isinstance(key, str) or not key:
        raise TypeError(f"flatten_params: tree keys must be non-empty strings, "
                        f"got {key!r} under '{prefix or '<root>'}'.")
      path = f"{prefix}{SEP}{key}" if prefix else key
      if _is_branch(child):
        visit(path, child)
      else:
        if path in flat:
          raise ValueError(f"flatten_params: path '{path}' occurs twice; a key "
                           f"containing '/' collides with a nested key.")
        flat[path] = np.asarray(child)

  visit("", tree)
  return dict(sorted(flat.items()))


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten_params`: `{'a/b': x}` -> `{'a': {'b': x}}`."""
  tree: dict[str, Any] = {}
  for path in sorted(flat):
    parts = path.split(SEP)
    if not all(parts):
      raise ValueError(f"unflatten_params: invalid path '{path}' (empty "
                       f"component); paths look like 'encoder/layers_0/...'.")
    node = tree
    for depth, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ValueError(f"unflatten_params: '{SEP.join(parts[:depth + 1])}' is "
                         f"both a tensor and a prefix of '{path}'.")
      node = child
    if parts[-1] in node:
      raise ValueError(f"unflatten_params: '{path}' is both a tensor and a "
                       f"prefix of another path.")
    node[parts[-1]] = flat[path]
  return tree


def _update_digest(hasher: Any, key: str, array: np.ndarray) -> None:
  """Adds one tensor: a JSON header [key, dtype, shape] + little-endian bytes."""
  array = np.asarray(array)
  header = json.dumps([key, array.dtype.name, list(array.shape)])
  hasher.update(header.encode("utf-8") + b"\n")
  if array.dtype.byteorder == ">":  # hash the same bytes on any platform
    array = array.astype(array.dtype.newbyteorder("<"))
  hasher.update(np.ascontiguousarray(array).tobytes())


def digest_items(items: Iterable[tuple[str, np.ndarray]]) -> str:
  """sha256 hex digest over (key, array) pairs; the caller sorts by key."""
  hasher = hashlib.sha256()
  previous = None
  for key, array in items:
    if previous is not None and key <= previous:
      raise ValueError(f"digest_items: keys must be strictly increasing, got "
                       f"'{key}' after '{previous}'.")
    _update_digest(hasher, key, array)
    previous = key
  return hasher.hexdigest()


def tree_digest(tree_or_flat: Mapping[str, Any]) -> str:
  """Content digest of a parameter tree (nested or flat): sha256 hex string.

  The digest covers, for each tensor in sorted path order, the path, the dtype
  name, the shape and the little-endian bytes. It is independent of process,
  platform and nesting, so `tree_digest(tree) == tree_digest(flatten(tree))`.
  It is sensitive to dtype: hash float32 trees to compare with stored experts.
  """
  return digest_items(flatten_params(tree_or_flat).items())


