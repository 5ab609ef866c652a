"""Tests for the Expert format v1 (expert_t5x.expert_format)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from expert_t5x import expert_format as ef


def _subprocess_env(**extra):
  """Environment for a child interpreter that imports this checkout's package."""
  import expert_t5x
  root = os.path.dirname(os.path.dirname(os.path.abspath(expert_t5x.__file__)))
  path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, **extra)


def _adapter_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "encoder": {
          "layers_0": {
              "mlp_adapter": {
                  "wi": {"kernel": rng.normal(size=(8, 2)).astype(np.float32),
                         "bias": rng.normal(size=(2,)).astype(np.float32)},
                  "wo": {"kernel": rng.normal(size=(2, 8)).astype(np.float32),
                         "bias": np.zeros((8,), np.float32)},
              },
              "pre_mlp_layer_norm": {"scale": np.ones((8,), np.float32)},
          },
      },
      "decoder": {"decoder_norm": {"scale": rng.normal(size=(8,))
                                   .astype(np.float32)}},
  }


def _metadata():
  return ef.build_metadata(
      "adapter", {"kind": "adapter", "reduction_factor": 4},
      base_fingerprint="ab" * 32, base_config_name="tiny",
      vocab_fingerprint=None,
      provenance=[{"task": "t", "dataset": "d", "subset": None,
                   "prompt": "p", "role": "train"}],
      training={"seed": 0, "steps": np.int64(3), "lr": 1e-3},
      metrics={"loss": np.float32(0.5)})


def _key(i):
  return {"inputs": f"in {i}", "targets": "yes", "answer_choices": ["yes", "no"],
          "example_id": i, "task": "t", "dataset": "d", "subset": None,
          "prompt": "p"}


def test_flatten_unflatten_round_trip():
  tree = _adapter_tree()
  flat = ef.flatten_params(tree)
  assert "encoder/layers_0/mlp_adapter/wi/kernel" in flat
  assert list(flat) == sorted(flat)
  back = ef.unflatten_params(flat)
  assert ef.flatten_params(back).keys() == flat.keys()
  # Flattening a flat dict is the identity, so both digests agree.
  assert ef.tree_digest(tree) == ef.tree_digest(flat)


def test_unflatten_rejects_conflicting_paths():
  with pytest.raises(ValueError, match="both a tensor and a prefix"):
    ef.unflatten_params({"a": np.zeros(1), "a/b": np.zeros(1)})


def test_digest_matches_independent_hashlib_recipe():
  """Compares tree_digest with the recipe written in docs/expert_format.md."""
  flat = {"b": np.arange(6, dtype=np.float32).reshape(2, 3),
          "a/x": np.array([1.5], np.float32)}
  h = hashlib.sha256()
  for key in sorted(flat):
    arr = flat[key]
    h.update((json.dumps([key, "float32", list(arr.shape)]) + "\n").encode())
    h.update(arr.astype("<f4").tobytes())
  assert ef.tree_digest(flat) == h.hexdigest()
  # Sensitive to values, dtype and shape.
  assert ef.tree_digest({**flat, "b": flat["b"] + 1}) != h.hexdigest()
  assert ef.tree_digest({**flat, "b": flat["b"].reshape(3, 2)}) != h.hexdigest()
  assert ef.tree_digest({**flat, "b": flat["b"].astype(np.float64)}) != (
      h.hexdigest())


def test_save_load_exact_and_lazy(tmp_path):
  tree = _adapter_tree()
  path = tmp_path / "expert"
  content_hash = ef.save_expert(path, tree, _metadata(), keys=[_key(0), _key(1)])
  assert sorted(os.listdir(tmp_path)) == ["expert"]  # no temp dirs left over
  params, meta = ef.load_expert(path)
  want = ef.flatten_params(tree)
  got = ef.flatten_params(params)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want[k])
  assert meta["content_hash"] == content_hash == ef.tree_digest(tree)
  assert meta["schema_version"] == 1
  assert meta["training"]["steps"] == 3 and meta["metrics"]["loss"] == 0.5
  with ef.ExpertReader(path) as reader:
    assert reader.names() == sorted(want)
    assert reader.shape("encoder/layers_0/mlp_adapter/wi/kernel") == (8, 2)
    np.testing.assert_array_equal(reader.get("decoder/decoder_norm/scale"),
                                  want["decoder/decoder_norm/scale"])
    reader.verify()
    with pytest.raises(KeyError, match="has no tensor 'nope'"):
      reader.get("nope")
  assert ef.read_keys(path) == [_key(0), _key(1)]


def test_save_casts_to_float32_and_hashes_stored_values(tmp_path):
  tree = {"x": np.array([0.1, 0.2], np.float64)}
  content_hash = ef.save_expert(tmp_path / "e", tree, _metadata())
  assert content_hash == ef.tree_digest({"x": tree["x"].astype(np.float32)})
  with pytest.raises(ValueError, match="must be floating point"):
    ef.save_expert(tmp_path / "f", {"x": np.array([1, 2])}, _metadata())


def test_overwrite_and_exists(tmp_path):
  path = tmp_path / "expert"
  ef.save_expert(path, _adapter_tree(0), _metadata())
  with pytest.raises(FileExistsError, match="overwrite=True"):
    ef.save_expert(path, _adapter_tree(1), _metadata())
  h1 = ef.save_expert(path, _adapter_tree(1), _metadata(), overwrite=True)
  assert ef.read_metadata(path)["content_hash"] == h1
  assert ef.read_keys(path, missing_ok=True) == []
  with pytest.raises(FileNotFoundError, match="has no keys.jsonl"):
    ef.read_keys(path)
  assert sorted(os.listdir(tmp_path)) == ["expert"]


def test_failed_write_leaves_nothing(tmp_path):
  bad_keys = [{"inputs": "x"}]
  with pytest.raises(ValueError, match=r"keys\[0\] is missing"):
    ef.save_expert(tmp_path / "e", _adapter_tree(), _metadata(), keys=bad_keys)
  assert os.listdir(tmp_path) == []


def test_corruption_detected(tmp_path):
  path = tmp_path / "e"
  ef.save_expert(path, _adapter_tree(), _metadata())
  meta = json.loads((path / "expert.json").read_text())
  meta["content_hash"] = "0" * 64
  (path / "expert.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="is corrupt"):
    ef.load_expert(path)
  ef.load_expert(path, verify=False)
  with pytest.raises(FileNotFoundError, match="params.safetensors is missing"):
    ef.load_expert(tmp_path)


def test_reader_matches_safetensors_own_reader(tmp_path):
  """Our header-offset reader vs the safetensors library's reader on a file it wrote (F32, F64, F16,
  a scalar, an empty tensor), then damaged headers give one clear error naming the file."""
  from safetensors import safe_open
  from safetensors.numpy import save_file
  path = tmp_path / "e"
  ef.save_expert(path, _adapter_tree(), _metadata())
  rng = np.random.default_rng(0)
  tensors = {"a/kernel": rng.normal(size=(3, 5)).astype(np.float32),
             "b/scale": rng.normal(size=(7,)),  # float64
             "c/half": rng.normal(size=(2, 2, 2)).astype(np.float16),
             "d/scalar": np.array(2.5, np.float32), "e/empty": np.zeros((0, 4), np.float32)}
  save_file(tensors, str(path / ef.PARAMS_FILE), metadata={"note": "written by safetensors"})
  with ef.ExpertReader(path) as reader, safe_open(str(path / ef.PARAMS_FILE), "numpy") as want:
    assert reader.names() == sorted(want.keys())
    for name in want.keys():
      got = reader.get(name)
      assert got.dtype == np.float32 and reader.shape(name) == want.get_tensor(name).shape
      np.testing.assert_array_equal(got, want.get_tensor(name).astype(np.float32))
  params = (path / ef.PARAMS_FILE).read_bytes()
  header_len = int.from_bytes(params[:8], "little")
  for damaged, why in [(params[:5], "shorter than"),
                       (b"\xff" * 8 + params[8:], "exceeds the file size"),
                       (params[:8] + b"{" * header_len + params[8 + header_len:], "not JSON"),
                       (params[:8 + header_len], "do not fit")]:
    (path / ef.PARAMS_FILE).write_bytes(damaged)
    with pytest.raises(ValueError,
                       match=f"params.safetensors' is not a valid safetensors file.*{why}"):
      ef.ExpertReader(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("provenance"), "missing field"),
    (lambda m: m.update(type="moe"), "type is 'moe'"),
    (lambda m: m.update(config={"kind": "lora"}), "config.kind is 'lora'"),
    (lambda m: m["base"].pop("vocab_fingerprint"), "base is missing"),
    (lambda m: m["provenance"][0].pop("role"), r"provenance\[0\] is missing"),
    (lambda m: m.update(metrics=[1]), "metrics must be a JSON object"),
    (lambda m: m.update(schema_version=2), "schema_version is 2"),
    (lambda m: m.update(content_hash="xyz"), "content_hash must be"),
])
def test_validate_metadata_errors(mutate, message):
  meta = json.loads(json.dumps(_metadata(), default=lambda x: x.tolist()))
  meta.update(schema_version=1, content_hash="a" * 64)
  ef.validate_metadata(meta)
  mutate(meta)
  with pytest.raises(ValueError, match=message):
    ef.validate_metadata(meta)


def test_config_given_as_json_string(tmp_path):
  meta = _metadata()
  meta["config"] = json.dumps({"kind": "adapter", "reduction_factor": 4})
  ef.save_expert(tmp_path / "e", _adapter_tree(), meta)
  assert ef.read_metadata(tmp_path / "e")["config"]["reduction_factor"] == 4


def test_hash_stable_across_processes(tmp_path):
  """Compares the digest computed here with one from a fresh interpreter."""
  path = tmp_path / "e"
  content_hash = ef.save_expert(path, _adapter_tree(3), _metadata())
  code = ("import sys; from expert_t5x import expert_format as ef; "
          "p, m = ef.load_expert(sys.argv[1]); "
          "print(ef.tree_digest(p), m['content_hash'])")
  env = _subprocess_env(PYTHONHASHSEED="12345")
  out = subprocess.run([sys.executable, "-c", code, str(path)], env=env,
                       check=True, capture_output=True, text=True).stdout.split()
  assert out == [content_hash, content_hash]


def test_model_code_free_imports():
  """expert_format must not pull in TensorFlow, seqio, jax or flax."""
  code = ("import sys; import expert_t5x.expert_format; "
          "print([m for m in ('tensorflow', 'seqio', 'jax', 'flax') "
          "if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env(),
                       capture_output=True, text=True).stdout.strip()
  assert out == "[]"


def test_params_file_bytes_are_deterministic_and_read_by_safetensors(tmp_path):
  # safetensors' own writer stored `__metadata__` in a per-process hash-map order; ours sorts it.
  # The file must still be what the safetensors library itself reads (not our reader).
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {"b": {"x": rng.normal(size=(3, 5)).astype(np.float32)},
            "a": rng.normal(size=(7,)).astype(np.float32)}
  meta = ef.build_metadata("adapter", {}, base_fingerprint="0" * 64,
                            base_config_name=None)
  ef.save_expert(tmp_path / "one", params, meta)
  ef.save_expert(tmp_path / "two", dict(reversed(list(params.items()))), meta)
  one = (tmp_path / "one" / ef.PARAMS_FILE).read_bytes()
  assert one == (tmp_path / "two" / ef.PARAMS_FILE).read_bytes()
  loaded = load_file(str(tmp_path / "one" / ef.PARAMS_FILE))
  np.testing.assert_array_equal(loaded["b/x"], params["b"]["x"])
  np.testing.assert_array_equal(loaded["a"], params["a"])
