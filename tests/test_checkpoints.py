"""Tests for checkpoint import/export (expert_t5x.checkpoint_importer).

Trees here are random numpy arrays built from the parameter names and shapes,
so these tests do not need the network to run. Parity with transformers'
PyTorch model is in test_parity_hf.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from expert_t5x import checkpoint_importer as ckpt
from expert_t5x import expert_format as ef
from expert_t5x import network

VOCAB = 64


@pytest.fixture(scope="module")
def config():
  return network.get_config("tiny", vocab_size=VOCAB)


def _subprocess_env(**extra):
  """Environment for a child interpreter that imports this checkout's package."""
  import expert_t5x
  root = os.path.dirname(os.path.dirname(os.path.abspath(expert_t5x.__file__)))
  path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, **extra)


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  flat = {name: rng.normal(size=shape).astype(np.float32)
          for name, shape in ckpt.expected_shapes(config).items()}
  return ef.unflatten_params(flat)


def assert_trees_equal(got, want):
  got, want = ef.flatten_params(got), ef.flatten_params(want)
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].dtype == np.float32, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def params(config):
  return random_params(config)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params, config):
  vocab = tmp_path_factory.mktemp("vocab") / "my.model"
  vocab.write_bytes(b"not really sentencepiece")
  out = tmp_path_factory.mktemp("hf") / "t5"
  ckpt.export_hf_t5(params, config, out, vocab_path=str(vocab))
  return out


def test_names_match_tree_built_by_network(config):
  """Compares our name/shape table with the tree flax builds for the network."""
  import jax
  import jax.numpy as jnp
  module = network.Transformer(config)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32),
                          jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32),
                          enable_dropout=False))["params"]
  got = {k: tuple(v.shape) for k, v in ef.flatten_params(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)).items()}
  assert got == ckpt.expected_shapes(config)


def test_export_writes_hf_layout(hf_dir, config):
  files = sorted(os.listdir(hf_dir))
  assert files == ["config.json", "model.safetensors", "spiece.model"]
  hf_config = json.loads((hf_dir / "config.json").read_text())
  assert hf_config["feed_forward_proj"] == "gated-gelu"
  assert hf_config["tie_word_embeddings"] is False
  assert (hf_config["d_model"], hf_config["num_heads"], hf_config["d_kv"],
          hf_config["d_ff"], hf_config["num_layers"]) == (
              config.emb_dim, config.num_heads, config.head_dim,
              config.mlp_dim, config.num_encoder_layers)
  from safetensors import safe_open
  with safe_open(str(hf_dir / "model.safetensors"), "np") as f:
    names = set(f.keys())
    # HF layout: [out, in] matrices, relative-position table in block 0 only.
    assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight").shape == (
        config.num_heads * config.head_dim, config.emb_dim)
    assert f.get_tensor("encoder.block.0.layer.0.SelfAttention."
                        "relative_attention_bias.weight").shape == (32, config.num_heads)
    assert f.get_tensor("lm_head.weight").shape == (VOCAB, config.emb_dim)
    assert f.metadata() == {"format": "pt"}
  assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in names


def test_export_import_round_trip_exact(hf_dir, params, config):
  got, got_config, info = ckpt.load_hf_t5(hf_dir)
  assert_trees_equal(got, params)
  assert got_config == config.replace(dropout_rate=config.dropout_rate)
  assert info["format"] == "hf_safetensors"
  assert info["vocab_path"] == str(hf_dir / "spiece.model")


def test_export_refuses_existing_dir(hf_dir, params, config):
  with pytest.raises(FileExistsError, match="overwrite=True"):
    ckpt.export_hf_t5(params, config, hf_dir)


def _write_hf_dir(path, tensors, hf_config, shards=1, kind="safetensors"):
  os.makedirs(path)
  (path / "config.json").write_text(json.dumps(hf_config))
  names = sorted(tensors)
  groups = [names[i::shards] for i in range(shards)]
  if kind == "safetensors":
    from safetensors.numpy import save_file
    single, index = "model.safetensors", "model.safetensors.index.json"
    write = lambda d, f: save_file(d, f, metadata={"format": "pt"})
  else:
    import torch
    single, index = "pytorch_model.bin", "pytorch_model.bin.index.json"
    write = lambda d, f: torch.save(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in d.items()}, f)
  if shards == 1:
    write(dict(tensors), str(path / single))
    return
  weight_map = {}
  for i, group in enumerate(groups):
    name = f"shard-{i:05d}{os.path.splitext(single)[1]}"
    write({k: tensors[k] for k in group}, str(path / name))
    weight_map.update({k: name for k in group})
  (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_safetensors_and_embedding_alias(tmp_path, params, config):
  tensors = ckpt.params_to_hf(params, config)
  # Some exporters keep the embedding only under encoder.embed_tokens.
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  _write_hf_dir(tmp_path / "hf", tensors, ckpt.hf_config_from_t5(config), shards=3)
  got, _, info = ckpt.load_hf_t5(tmp_path / "hf")
  assert_trees_equal(got, params)
  assert len(info["files"]) == 3 and info["vocab_path"] is None


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin(tmp_path, params, config, shards):
  pytest.importorskip("torch")
  import ml_dtypes
  tensors = ckpt.params_to_hf(params, config)
  _write_hf_dir(tmp_path / "hf", tensors, ckpt.hf_config_from_t5(config),
                shards=shards, kind="torch")
  got, _, info = ckpt.load_hf_t5(tmp_path / "hf")
  assert info["format"] == "hf_torch"
  # The files hold bfloat16; compare with an independent numpy rounding.
  want = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
          for k, v in ef.flatten_params(params).items()}
  assert_trees_equal(got, want)


def test_pytorch_bin_without_torch_names_parity_extra(tmp_path, params, config,
                                                       monkeypatch):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(
      json.dumps(ckpt.hf_config_from_t5(config)))
  (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(ImportError, match=r"expert_t5x\[parity\]"):
    ckpt.load_hf_t5(tmp_path / "hf")


def test_tied_unscaled_checkpoint_uses_embedding_as_output(tmp_path, params, config):
  """Newer transformers save T5 1.1 models without lm_head when it is tied."""
  tensors = ckpt.params_to_hf(params, config)
  del tensors["lm_head.weight"]
  hf_config = dict(ckpt.hf_config_from_t5(config), tie_word_embeddings=True,
                   scale_decoder_outputs=False)
  _write_hf_dir(tmp_path / "hf", tensors, hf_config)
  got, got_config, _ = ckpt.load_hf_t5(tmp_path / "hf")
  assert not got_config.logits_via_embedding
  np.testing.assert_array_equal(got["decoder"]["logits_dense"]["kernel"],
                                tensors["shared.weight"].T)


def test_tied_scaled_checkpoint_uses_logits_via_embedding(tmp_path, params, config):
  tensors = ckpt.params_to_hf(params, config)
  del tensors["lm_head.weight"]
  hf_config = dict(ckpt.hf_config_from_t5(config), tie_word_embeddings=True)
  del hf_config["scale_decoder_outputs"]  # old configs: tied means scaled
  _write_hf_dir(tmp_path / "hf", tensors, hf_config)
  got, got_config, _ = ckpt.load_hf_t5(tmp_path / "hf")
  assert got_config.logits_via_embedding
  assert "logits_dense" not in got["decoder"]
  # And it exports back to a tied, scaled HF config.
  out = ckpt.export_hf_t5(got, got_config, tmp_path / "back")
  back = json.loads(open(os.path.join(out, "config.json")).read())
  assert back["tie_word_embeddings"] is True


def test_wrong_shapes_give_one_clear_error(tmp_path, params, config):
  tensors = ckpt.params_to_hf(params, config)
  tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros(
      (config.emb_dim, 7), np.float32)
  del tensors["decoder.final_layer_norm.weight"]
  tensors["encoder.block.9.layer.0.layer_norm.weight"] = np.zeros(3, np.float32)
  _write_hf_dir(tmp_path / "hf", tensors, ckpt.hf_config_from_t5(config))
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    ckpt.load_hf_t5(tmp_path / "hf")
  message = str(e.value)
  assert "3 problem(s)" in message and "\n" not in message
  assert ("encoder.block.1.layer.1.DenseReluDense.wo.weight (ours "
          "encoder/layers_1/mlp/wo/kernel): expected shape (32, 64), found "
          "(32, 7)") in message
  assert "decoder.final_layer_norm.weight (ours decoder/decoder_norm/scale): " \
         "missing" in message
  assert "encoder.block.9.layer.0.layer_norm.weight: unexpected" in message


def test_check_params_lists_offending_names(params, config):
  flat = dict(ef.flatten_params(params))
  flat["token_embedder/embedding"] = np.zeros((VOCAB + 1, config.emb_dim))
  del flat["encoder/encoder_norm/scale"]
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match=r"token_embedder/embedding: expected shape \(64, 32\), "
                           r"found \(65, 32\).*encoder/encoder_norm/scale: missing"):
    ckpt.export_hf_t5(flat, config, "/nonexistent/never_written")


def test_non_gated_config_rejected(tmp_path, params, config):
  hf_config = dict(ckpt.hf_config_from_t5(config), feed_forward_proj="relu")
  _write_hf_dir(tmp_path / "hf", ckpt.params_to_hf(params, config), hf_config)
  with pytest.raises(ValueError, match="feed_forward_proj='relu' is not supported"):
    ckpt.load_hf_t5(tmp_path / "hf")


def _t5x_state(params):
  """A T5X train-state dict: target + optimizer state that must not be read."""
  flat = ef.flatten_params(params)
  param_states = {k.replace("/", "."): {"v": np.full((2,), 7.0, np.float32)}
                  for k in list(flat)[:3]}
  return {"target": params,
          "state": {"step": np.int32(3), "param_states": param_states}}


def test_t5x_orbax_checkpoint(tmp_path, params, config):
  import orbax.checkpoint as ocp
  model_dir = tmp_path / "model"
  manager = ocp.CheckpointManager(
      str(model_dir), options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"),
      item_names=("state",))
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(_t5x_state(params))))
  manager.wait_until_finished()
  manager.close()
  assert os.path.isdir(model_dir / "checkpoint_3" / "state")
  for path in (model_dir, model_dir / "checkpoint_3", model_dir / "checkpoint_3" / "state"):
    assert_trees_equal(ckpt.load_t5x_checkpoint(path, config=config), params)
  got, got_config, info = ckpt.load_params(model_dir)
  assert got_config is None and info["format"] == "t5x_orbax" and info["step"] == 3
  assert ckpt.infer_t5_config(got, dropout_rate=config.dropout_rate) == config


def _write_legacy(step_dir, params, gcs_placeholder=False):
  """Writes T5X's legacy layout: msgpack with tensorstore specs + zarr arrays."""
  import tensorstore as ts
  from flax import serialization
  os.makedirs(step_dir)
  flat = ef.flatten_params(params)
  stored = {}
  for i, (name, value) in enumerate(flat.items()):
    if i % 2:  # small arrays stay inline in the msgpack, as T5X does
      stored[name] = value
      continue
    rel = "target." + name.replace("/", ".")
    kvstore = ({"bucket": "t5x-dummy-bucket", "driver": "gcs", "path": rel}
               if gcs_placeholder else {"driver": "file", "path": rel})
    spec = {"driver": "zarr", "dtype": "float32", "kvstore": kvstore,
            "metadata": {"shape": list(value.shape), "chunks": list(value.shape),
                         "compressor": {"id": "gzip"}}}
    arr = ts.open({**spec, "kvstore": {"driver": "file",
                                       "path": os.path.join(step_dir, rel)}},
                  create=True, dtype=ts.float32, shape=value.shape).result()
    arr.write(value).result()
    stored[name] = spec
  state = {"version": 3, "optimizer": {
      "target": ef.unflatten_params(stored),
      "state": {"step": np.int32(1), "param_states": {}}}}
  with open(os.path.join(step_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(state))


@pytest.mark.parametrize("gcs_placeholder", [False, True])
def test_t5x_legacy_checkpoint(tmp_path, params, config, gcs_placeholder):
  _write_legacy(str(tmp_path / "model" / "checkpoint_1"), params, gcs_placeholder)
  assert_trees_equal(ckpt.load_t5x_checkpoint(tmp_path / "model", config=config), params)
  _, _, info = ckpt.load_params(tmp_path / "model" / "checkpoint_1")
  assert info["format"] == "t5x_legacy"


def test_t5x_missing_checkpoint_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a T5X checkpoint"):
    ckpt.load_t5x_checkpoint(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.load_params(tmp_path / "nope")


def test_base_fingerprint_cached_and_invalidated(tmp_path, params, config, monkeypatch):
  out = ckpt.export_hf_t5(params, config, tmp_path / "hf")
  want = ef.tree_digest(params)  # the same digest experts record
  assert ckpt.base_fingerprint(params) == want
  assert ckpt.base_fingerprint(out) == want
  assert os.path.isfile(os.path.join(out, ckpt.FINGERPRINT_FILE))
  calls = []
  real_load = ckpt.load_params
  monkeypatch.setattr(ckpt, "load_params", lambda *a, **k: calls.append(a) or real_load(*a, **k))
  assert ckpt.base_fingerprint(out) == want and not calls  # from the cache
  other = random_params(config, seed=1)
  ckpt.export_hf_t5(other, config, out, overwrite=True)
  assert ckpt.base_fingerprint(out) == ef.tree_digest(other) and calls


def test_export_folds_expert(tmp_path, params, config):
  """Compares the exported weights with experts.fold_expert applied directly."""
  from expert_t5x import experts
  lora = experts.LoraConfig(rank=2, targets=("attention_qv",))
  expert = experts.init_expert(lora, config, params)
  rng = np.random.default_rng(5)
  expert = {k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in ef.flatten_params(expert).items()}
  want = experts.fold_expert(params, ef.unflatten_params(expert), lora)
  out = ckpt.export_hf_t5(params, config, tmp_path / "a", expert=expert,
                          expert_config=lora)
  assert_trees_equal(ckpt.load_hf_t5(out)[0], want)
  # From an Expert-format directory: the config comes from expert.json.
  meta = ef.build_metadata("lora", experts.config_to_json(lora),
                           base_fingerprint=ef.tree_digest(params),
                           base_config_name="tiny")
  ef.save_expert(tmp_path / "expert", expert, meta)
  out = ckpt.export_hf_t5(params, config, tmp_path / "b", expert=str(tmp_path / "expert"))
  assert_trees_equal(ckpt.load_hf_t5(out)[0], want)


def test_import_does_not_load_tf_seqio_or_torch():
  code = ("import sys; import expert_t5x.checkpoint_importer; "
          "print([m for m in ('tensorflow', 'seqio', 'torch') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env(),
                       capture_output=True, text=True).stdout.strip()
  assert out == "[]"


def test_scaled_checkpoint_with_separate_lm_head_rejected(tmp_path, params, config):
  """T5 1.0-style output scaling plus an untied lm_head has no T5X equivalent."""
  tensors = ckpt.params_to_hf(params, config)
  hf_config = dict(ckpt.hf_config_from_t5(config), tie_word_embeddings=True,
                   scale_decoder_outputs=True)
  _write_hf_dir(tmp_path / "hf", tensors, hf_config)
  with pytest.raises(ckpt.CheckpointMismatchError, match="separate lm_head.weight"):
    ckpt.load_hf_t5(tmp_path / "hf")


def test_missing_shard_and_missing_weights(tmp_path, params, config):
  tensors = ckpt.params_to_hf(params, config)
  _write_hf_dir(tmp_path / "hf", tensors, ckpt.hf_config_from_t5(config), shards=2)
  os.remove(tmp_path / "hf" / "shard-00001.safetensors")
  with pytest.raises(FileNotFoundError, match=r"lists shard\(s\) \['shard-00001"):
    ckpt.load_hf_t5(tmp_path / "hf")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(
      json.dumps(ckpt.hf_config_from_t5(config)))
  with pytest.raises(FileNotFoundError, match="has no weights"):
    ckpt.load_hf_t5(tmp_path / "empty")


def test_untied_checkpoint_without_lm_head_is_an_error(tmp_path, params, config):
  tensors = ckpt.params_to_hf(params, config)
  del tensors["lm_head.weight"]
  _write_hf_dir(tmp_path / "hf", tensors, ckpt.hf_config_from_t5(config))
  with pytest.raises(ckpt.CheckpointMismatchError, match="lm_head.weight .*missing"):
    ckpt.load_hf_t5(tmp_path / "hf")
