"""Expert format v1: reads and writes one expert as a directory on disk.

An expert directory holds:

* `params.safetensors`: float32 tensors keyed by the `/`-joined tree path
  (`encoder/layers_3/mlp_adapter/wi/kernel`). Adapter tensors and layer-norm
  scales are absolute values, LoRA is stored as its `lora_a`/`lora_b` factors,
  a full expert as the delta from the base.
* `expert.json`: metadata (`schema_version`, `type`, `config`, `base`,
  `provenance`, `training`, `metrics`, `content_hash`).
* `keys.jsonl` (optional): retrieval keys, one JSON object per line.

`content_hash` is `tree_digest` of the stored tensors and `base.fingerprint`
is the same digest over the base parameter tree, so both are reproducible from
the tensors alone, in any process. Reading is lazy per tensor (`ExpertReader`)
so merges can stream large experts. The full specification is in
`docs/expert_format.md`. This module needs only numpy, safetensors and json.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from expert_t5x import file_io
# Re-exported: the tree helpers live in trees but belong to this format's API.
from expert_t5x.trees import (SEP, digest_items, flatten_params, tree_digest,  # noqa: F401
                              unflatten_params)

SCHEMA_VERSION = 1
PARAMS_FILE = "params.safetensors"
METADATA_FILE = "expert.json"
KEYS_FILE = "keys.jsonl"
EXPERT_TYPES = ("adapter", "lora", "full")
PROVENANCE_FIELDS = ("task", "dataset", "subset", "prompt", "role")
# The dataset of a provenance item whose source could not be identified (not None, which also means
# "does not apply"): the library's zero_shot guard refuses such experts unless allowed explicitly.
UNKNOWN_DATASET = "unknown"
BASE_FIELDS = ("fingerprint", "config_name", "vocab_fingerprint")
KEY_FIELDS = ("inputs", "targets", "answer_choices", "example_id", "task",
              "dataset", "subset", "prompt")
METADATA_FIELDS = ("schema_version", "type", "config", "base", "provenance",
                   "training", "metrics", "content_hash")


# ----------------------------------------------------------------------------
# Metadata.
# ----------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(f"Invalid expert metadata: {message}")


def _is_str_or_none(value: Any) -> bool:
  return value is None or isinstance(value, str)


def validate_metadata(metadata: Mapping[str, Any]) -> None:
  """Checks an `expert.json` object; raises ValueError naming the bad field.

  Required: `schema_version` (== 1), `type` (adapter|lora|full), `config`
  (object; its `kind`, when present, equals `type`), `base` {fingerprint,
  config_name, vocab_fingerprint}, `provenance` (list of {task, dataset,
  subset, prompt, role}), `training` (object), `metrics` (object) and
  `content_hash` (64 hex digits). Other top-level fields are allowed and kept.
  """
  _require(isinstance(metadata, Mapping),
           f"expected a JSON object, got {type(metadata).__name__}.")
  missing = [f for f in METADATA_FIELDS if f not in metadata]
  _require(not missing, f"missing field(s) {missing}; every expert.json needs "
           f"{list(METADATA_FIELDS)}.")
  _require(metadata["schema_version"] == SCHEMA_VERSION,
           f"schema_version is {metadata['schema_version']!r}, this reader "
           f"supports {SCHEMA_VERSION}.")
  _require(metadata["type"] in EXPERT_TYPES,
           f"type is {metadata['type']!r}, expected one of {EXPERT_TYPES}.")
  config = metadata["config"]
  _require(isinstance(config, Mapping),
           f"config must be a JSON object (the expert config's to_json()), got "
           f"{type(config).__name__}.")
  _require(config.get("kind", metadata["type"]) == metadata["type"],
           f"config.kind is {config.get('kind')!r} but type is "
           f"{metadata['type']!r}; they must agree.")
  base = metadata["base"]
  _require(isinstance(base, Mapping), "base must be an object with fields "
           f"{list(BASE_FIELDS)}.")
  missing = [f for f in BASE_FIELDS if f not in base]
  _require(not missing, f"base is missing {missing}; use None for unknown.")
  for field in BASE_FIELDS:
    _require(_is_str_or_none(base[field]),
             f"base.{field} must be a string or null, got {base[field]!r}.")
  provenance = metadata["provenance"]
  _require(isinstance(provenance, list),
           "provenance must be a list of {task, dataset, subset, prompt, role}.")
  for i, entry in enumerate(provenance):
    _require(isinstance(entry, Mapping), f"provenance[{i}] must be an object.")
    missing = [f for f in PROVENANCE_FIELDS if f not in entry]
    _require(not missing, f"provenance[{i}] is missing {missing}; use None "
             f"for a field that does not apply.")
  for field in ("training", "metrics"):
    _require(isinstance(metadata[field], Mapping),
             f"{field} must be a JSON object, got "
             f"{type(metadata[field]).__name__}.")
  content_hash = metadata["content_hash"]
  _require(isinstance(content_hash, str) and len(content_hash) == 64 and
           all(c in "0123456789abcdef" for c in content_hash),
           f"content_hash must be 64 lower-case hex digits, got "
           f"{content_hash!r}.")


def build_metadata(expert_type: str,
                   config: Mapping[str, Any] | str,
                   *,
                   base_fingerprint: str | None,
                   base_config_name: str | None,
                   vocab_fingerprint: str | None = None,
                   provenance: Iterable[Mapping[str, Any]] = (),
                   training: Mapping[str, Any] | None = None,
                   metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Convenience constructor for the metadata passed to `save_expert`."""
  return {
      "type": expert_type,
      "config": config,
      "base": {"fingerprint": base_fingerprint,
               "config_name": base_config_name,
               "vocab_fingerprint": vocab_fingerprint},
      "provenance": [dict(p) for p in provenance],
      "training": dict(training or {}),
      "metrics": dict(metrics or {}),
  }


def _json_default(value: Any) -> Any:
  # numpy / jax scalars and small arrays end up in metrics; store them plainly.
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, (set, frozenset, tuple)):
    return list(value)
  raise TypeError(f"expert.json: value {value!r} of type "
                  f"{type(value).__name__} is not JSON-serialisable.")


def _to_json(value: Any, **kwargs: Any) -> str:
  return json.dumps(value, default=_json_default, **kwargs)


def _normalise_metadata(metadata: Mapping[str, Any],
                        content_hash: str) -> dict[str, Any]:
  meta = dict(metadata)
  if isinstance(meta.get("config"), str):
    meta["config"] = json.loads(meta["config"])  # to_json() may give a string
  meta["schema_version"] = SCHEMA_VERSION
  meta["content_hash"] = content_hash
  # A JSON round trip turns tuples and numpy scalars into plain JSON values.
  meta = json.loads(_to_json(meta))
  validate_metadata(meta)
  return meta


def _validate_keys(keys: list[Mapping[str, Any]]) -> None:
  for i, key in enumerate(keys):
    if not isinstance(key, Mapping):
      raise ValueError(f"keys[{i}]: each retrieval key must be a JSON object, "
                       f"got {type(key).__name__}.")
    missing = [f for f in KEY_FIELDS if f not in key]
    if missing:
      raise ValueError(f"keys[{i}] is missing {missing}; each retrieval key "
                       f"needs {list(KEY_FIELDS)} (None where not applicable).")


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:  # fsynced by atomic_directory
    f.write(text)


def _write_safetensors(path: str, flat: Mapping[str, np.ndarray],
                       metadata: Mapping[str, str]) -> None:
  """float32 tensors in the safetensors layout with a fixed byte order: tensors and metadata keys
  sorted, compact JSON padded with spaces to 8 bytes (as the format allows), so equal tensors give
  equal files. (safetensors' own writer stores `__metadata__` from a hash map, in a per-process
  order.)"""
  names = sorted(flat)
  header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
  offset = 0
  for name in names:
    size = flat[name].size * 4
    header[name] = {"dtype": "F32", "shape": list(flat[name].shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for name in names:
      f.write(np.ascontiguousarray(flat[name], dtype="<f4").tobytes())


def _float32_flat(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  flat = flatten_params(params)
  if not flat:
    raise ValueError("save_expert: params is empty; an expert needs at least "
                     "one tensor.")
  out = {}
  for name, array in flat.items():
    if not (np.issubdtype(array.dtype, np.floating) or
            array.dtype.name == "bfloat16"):
      raise ValueError(f"save_expert: tensor '{name}' has dtype {array.dtype}; "
                       f"expert tensors must be floating point (stored as "
                       f"float32).")
    out[name] = np.ascontiguousarray(array, dtype=np.float32)
  return out


def save_expert(directory: str | os.PathLike[str],
                params: Mapping[str, Any],
                metadata: Mapping[str, Any],
                keys: Iterable[Mapping[str, Any]] | None = None,
                *,
                overwrite: bool = False) -> str:
  """Writes an expert directory atomically and returns its content hash.

  Everything is first written to a temporary directory beside `directory`,
  fsynced and then renamed into place, so a crash leaves either no expert or
  a complete one (with `overwrite=True`, the old directory is renamed aside
  before the new one moves in and deleted afterwards).

  Args:
    directory: the expert directory to create.
    params: the expert's parameter tree (nested or `/`-flat); floating point
      leaves, stored as float32.
    metadata: `expert.json` fields except `schema_version` and `content_hash`,
      which are filled in here (see `build_metadata`).
    keys: optional retrieval keys written to `keys.jsonl`.
    overwrite: replace an existing directory instead of raising.

  Returns:
    The content hash (also stored as `metadata['content_hash']`).
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"save_expert: '{directory}' already exists; pass "
                          f"overwrite=True to replace it or choose a new "
                          f"directory.")
  flat = _float32_flat(params)
  content_hash = digest_items(flat.items())
  meta = _normalise_metadata(metadata, content_hash)
  key_list = None if keys is None else list(keys)
  if key_list is not None:
    _validate_keys(key_list)

  # A killed export of this directory leaves a folder that atomic_directory removes.
  with file_io.atomic_directory(directory, commit=functools.partial(_move_into_place,
                                                                    overwrite=overwrite)) as tmp:
    _write_safetensors(os.path.join(tmp, PARAMS_FILE), flat,
                       {"content_hash": content_hash, "format": "np"})
    _write_text(os.path.join(tmp, METADATA_FILE),
                _to_json(meta, indent=2, sort_keys=True) + "\n")
    if key_list is not None:
      _write_text(os.path.join(tmp, KEYS_FILE),
                  "".join(_to_json(k, sort_keys=True) + "\n" for k in key_list))
  return content_hash


def _move_into_place(tmp: str, directory: str, overwrite: bool) -> None:
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"save_expert: '{directory}' appeared while writing; "
                          f"pass overwrite=True to replace it.")
  file_io.swap_dir(tmp, directory)


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def _check_expert_dir(directory: str) -> None:
  for name in (PARAMS_FILE, METADATA_FILE):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"'{directory}' is not an expert directory: "
                              f"{name} is missing (write experts with "
                              f"expert_t5x.expert_format.save_expert).")


def read_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads and validates `expert.json` without touching the tensors."""
  directory = os.fspath(directory)
  _check_expert_dir(directory)
  path = os.path.join(directory, METADATA_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"'{path}' is not valid JSON ({e}); the expert directory "
                     f"is damaged, write it again.") from None
  try:
    validate_metadata(metadata)
  except ValueError as e:
    raise ValueError(f"'{path}': {e} The expert directory is damaged; write it "
                     f"again.") from None
  return metadata


class ExpertReader:
  """Lazy, per-tensor access to an expert directory.

  Usage:
    with ExpertReader(path) as reader:
      for name in reader.names():
        x = reader.get(name)  # only this tensor is read

  Attributes:
    directory: the expert directory.
    metadata: the validated `expert.json` object.
  """

  def __init__(self, directory: str | os.PathLike[str]):
    self.directory = os.fspath(directory)
    self.metadata = read_metadata(self.directory)
    path = os.path.join(self.directory, PARAMS_FILE)
    # Plain reads at header offsets rather than a memory map: a map keeps every
    # page read resident until it is closed, so a k-way merge would hold all k
    # experts in RSS.
    self._index, self._data_start = _read_safetensors_index(path)
    self._file = open(path, "rb")  # pylint: disable=consider-using-with
    self._names = sorted(self._index)

  def names(self) -> list[str]:
    """Sorted tensor paths."""
    return list(self._names)

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of one tensor without reading its data."""
    self._check_name(name)
    return tuple(self._index[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """Reads one tensor (float32)."""
    self._check_name(name)
    info = self._index[name]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    begin, end = info["data_offsets"]
    self._file.seek(self._data_start + begin)
    data = np.fromfile(self._file, dtype=dtype, count=(end - begin) // dtype.itemsize)
    return data.reshape(info["shape"]).astype(np.float32, copy=False)

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (path, tensor) in sorted order, one tensor in memory at a time."""
    for name in self._names:
      yield name, self.get(name)

  def params(self) -> dict[str, Any]:
    """All tensors as a nested tree of numpy arrays."""
    return unflatten_params(dict(self.items()))

  def verify(self) -> None:
    """Recomputes the content hash (streaming) and compares with expert.json."""
    actual = digest_items(self.items())
    if actual != self.metadata["content_hash"]:
      raise ValueError(f"Expert '{self.directory}' is corrupt: its tensors hash "
                       f"to {actual} but expert.json records "
                       f"{self.metadata['content_hash']}; write it again.")

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    self._file = None

  def __enter__(self) -> ExpertReader:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def _check_name(self, name: str) -> None:
    if self._file is None:
      raise ValueError(f"ExpertReader for '{self.directory}' is closed.")
    if name not in self._names:
      raise KeyError(f"Expert '{self.directory}' has no tensor '{name}'; it has "
                     f"{len(self._names)} tensors, e.g. {self._names[:3]}.")


_SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def _read_safetensors_index(path: str) -> tuple[dict[str, Any], int]:
  """({name: {dtype, shape, data_offsets}}, data start) from a safetensors header.

  The layout: an 8-byte little-endian header length, a JSON header, then the
  tensors' bytes at `data_offsets` relative to the end of the header.
  """
  def damaged(why: str) -> ValueError:
    return ValueError(f"'{path}' is not a valid safetensors file ({why}); "
                      f"write the expert again.")

  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise damaged("shorter than its 8-byte header length")
    header_len = int.from_bytes(prefix, "little")
    if header_len > size - 8:
      raise damaged(f"header length {header_len} exceeds the file size {size}")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise damaged(f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise damaged(f"header is a JSON {type(header).__name__}, not an object")
  header.pop("__metadata__", None)
  data_size = size - 8 - header_len
  for name, info in header.items():
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
      raise damaged(f"tensor '{name}' has no dtype/shape/data_offsets object")
    begin, end = info.get("data_offsets", (0, -1))
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
      raise damaged(f"tensor '{name}' has dtype {info.get('dtype')}; expected "
                    f"one of {sorted(_SAFETENSORS_DTYPES)}")
    itemsize = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).itemsize
    if not 0 <= begin <= end <= data_size or \
        end - begin != itemsize * int(np.prod(info["shape"], dtype=np.int64)):
      raise damaged(f"tensor '{name}' has offsets {info.get('data_offsets')} "
                    f"that do not fit its shape or the file")
  return header, 8 + header_len


def load_expert(directory: str | os.PathLike[str],
                *,
                verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a whole expert: (nested numpy params, metadata).

  Args:
    directory: an expert directory written by `save_expert`.
    verify: recompute the content hash and raise if it does not match.
  """
  with ExpertReader(directory) as reader:
    flat = dict(reader.items())
    metadata = reader.metadata
  if verify:
    actual = digest_items(flat.items())
    if actual != metadata["content_hash"]:
      raise ValueError(f"Expert '{os.fspath(directory)}' is corrupt: its "
                       f"tensors hash to {actual} but expert.json records "
                       f"{metadata['content_hash']}; write it again.")
  return unflatten_params(flat), metadata


def read_keys(directory: str | os.PathLike[str],
              *,
              missing_ok: bool = False) -> list[dict[str, Any]]:
  """Reads `keys.jsonl` (retrieval keys) of an expert directory.

  Args:
    directory: an expert directory.
    missing_ok: return [] instead of raising when the expert has no keys.
  """
  path = os.path.join(os.fspath(directory), KEYS_FILE)
  if not os.path.isfile(path):
    if missing_ok:
      return []
    raise FileNotFoundError(f"Expert '{os.fspath(directory)}' has no "
                            f"{KEYS_FILE}; retrieval keys are written by the "
                            f"trainer (pass keys= to save_expert).")
  return file_io.read_jsonl(path)


def is_expert_dir(directory: str | os.PathLike[str]) -> bool:
  """True if `directory` holds both files of an expert."""
  directory = os.fspath(directory)
  return all(os.path.isfile(os.path.join(directory, name))
             for name in (PARAMS_FILE, METADATA_FILE))

