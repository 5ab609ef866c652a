"""Imports and exports T5 checkpoints: Hugging Face directories and T5X checkpoints.

(Over 600 lines on purpose: every conversion between our tree and a base checkpoint format, as
T5X's `checkpoint_importer.py`, so a format's reader and writer sit side by side.)

Everything is converted into our parameter tree, which is T5X's tree exactly
(`token_embedder/embedding`, `encoder/layers_0/attention/query/kernel`, ...,
plain float32 numpy arrays). Supported inputs:

* Hugging Face T5 directories (`config.json` + `model.safetensors`, sharded
  safetensors with `model.safetensors.index.json`, or PyTorch
  `pytorch_model.bin`, single or sharded). The gated-GELU (T5 1.1 /
  LM-adapted) architecture only. `spiece.model` is found and reported.
* T5X checkpoints: orbax (`checkpoint_<step>/state`, only `target` is read)
  and the legacy msgpack + tensorstore layout (`checkpoint_<step>/checkpoint`).

`export_hf_t5` writes a directory that transformers'
`T5ForConditionalGeneration.from_pretrained` loads. `base_fingerprint` gives
the digest that experts record as `base.fingerprint`. This module does not
import TensorFlow or seqio; torch, orbax and tensorstore are imported only
when a checkpoint needs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from expert_t5x import expert_format
from expert_t5x import file_io
from expert_t5x import trees

FINGERPRINT_FILE = "expert_t5x_fingerprint.json"
HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH = "pytorch_model.bin"
HF_TORCH_INDEX = "pytorch_model.bin.index.json"
VOCAB_FILE = "spiece.model"
LEGACY_MSGPACK = "checkpoint"
ORBAX_ITEM = "state"

# (our name, HF name) inside one block; "{s}" is the HF stack prefix.
_ENCODER_BLOCK = (
    ("pre_attention_layer_norm/scale", "layer.0.layer_norm.weight"),
    ("attention/query/kernel", "layer.0.SelfAttention.q.weight"),
    ("attention/key/kernel", "layer.0.SelfAttention.k.weight"),
    ("attention/value/kernel", "layer.0.SelfAttention.v.weight"),
    ("attention/out/kernel", "layer.0.SelfAttention.o.weight"),
    ("pre_mlp_layer_norm/scale", "layer.1.layer_norm.weight"),
    ("mlp/wi_0/kernel", "layer.1.DenseReluDense.wi_0.weight"),
    ("mlp/wi_1/kernel", "layer.1.DenseReluDense.wi_1.weight"),
    ("mlp/wo/kernel", "layer.1.DenseReluDense.wo.weight"),
)
_DECODER_BLOCK = (
    ("pre_self_attention_layer_norm/scale", "layer.0.layer_norm.weight"),
    ("self_attention/query/kernel", "layer.0.SelfAttention.q.weight"),
    ("self_attention/key/kernel", "layer.0.SelfAttention.k.weight"),
    ("self_attention/value/kernel", "layer.0.SelfAttention.v.weight"),
    ("self_attention/out/kernel", "layer.0.SelfAttention.o.weight"),
    ("pre_cross_attention_layer_norm/scale", "layer.1.layer_norm.weight"),
    ("encoder_decoder_attention/query/kernel", "layer.1.EncDecAttention.q.weight"),
    ("encoder_decoder_attention/key/kernel", "layer.1.EncDecAttention.k.weight"),
    ("encoder_decoder_attention/value/kernel", "layer.1.EncDecAttention.v.weight"),
    ("encoder_decoder_attention/out/kernel", "layer.1.EncDecAttention.o.weight"),
    ("pre_mlp_layer_norm/scale", "layer.2.layer_norm.weight"),
    ("mlp/wi_0/kernel", "layer.2.DenseReluDense.wi_0.weight"),
    ("mlp/wi_1/kernel", "layer.2.DenseReluDense.wi_1.weight"),
    ("mlp/wo/kernel", "layer.2.DenseReluDense.wo.weight"),
)
# HF aliases of the shared embedding; an HF checkpoint may hold any of them.
_EMBEDDING_ALIASES = ("shared.weight", "encoder.embed_tokens.weight",
                      "decoder.embed_tokens.weight")


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensor names or shapes differ from what the config needs."""


# ----------------------------------------------------------------------------
# Parameter names and shapes.
# ----------------------------------------------------------------------------


def _hf_layout(name: str, value: np.ndarray) -> np.ndarray:
  """Converts between our layout and HF's (an involution).

  HF matrices are the transpose of ours (`[out, in]` vs `[in, out]`,
  `[buckets, heads]` vs `[heads, buckets]`), except the embedding, which is
  `[vocab, embed]` in both.
  """
  if value.ndim == 1 or name in ("token_embedder/embedding", "shared.weight"):
    return value
  return value.T


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of our tensor `name` of shape `shape`."""
  if len(shape) == 1 or name == "token_embedder/embedding":
    return tuple(shape)
  return tuple(shape)[::-1]


def hf_name_map(num_encoder_layers: int, num_decoder_layers: int,
                logits_via_embedding: bool = False) -> dict[str, str]:
  """Our `/`-path -> HF tensor name (see `_hf_layout` for the layouts)."""
  names = {"token_embedder/embedding": "shared.weight"}
  for stack, n, block in (("encoder", num_encoder_layers, _ENCODER_BLOCK),
                          ("decoder", num_decoder_layers, _DECODER_BLOCK)):
    # HF keeps the shared relative-position table in block 0 only.
    names[f"{stack}/relpos_bias/rel_embedding"] = (
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    for i in range(n):
      for ours, theirs in block:
        names[f"{stack}/layers_{i}/{ours}"] = f"{stack}.block.{i}.{theirs}"
  names["encoder/encoder_norm/scale"] = "encoder.final_layer_norm.weight"
  names["decoder/decoder_norm/scale"] = "decoder.final_layer_norm.weight"
  if not logits_via_embedding:
    names["decoder/logits_dense/kernel"] = "lm_head.weight"
  return names


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  """Our `/`-path -> shape for a `T5Config` (gated MLP, untied or tied logits)."""
  e, h, d, f, v = (config.emb_dim, config.num_heads, config.head_dim,
                   config.mlp_dim, config.vocab_size)
  buckets = getattr(config, "relative_attention_num_buckets", 32)
  by_suffix = {
      "scale": (e,), "query/kernel": (e, h * d), "key/kernel": (e, h * d),
      "value/kernel": (e, h * d), "out/kernel": (h * d, e),
      "wi_0/kernel": (e, f), "wi_1/kernel": (e, f), "wo/kernel": (f, e),
  }
  shapes = {}
  for path in hf_name_map(config.num_encoder_layers, config.num_decoder_layers,
                          config.logits_via_embedding):
    if path == "token_embedder/embedding":
      shapes[path] = (v, e)
    elif path.endswith("rel_embedding"):
      shapes[path] = (h, buckets)
    elif path.endswith("logits_dense/kernel"):
      shapes[path] = (e, v)
    else:
      suffix = "scale" if path.endswith("/scale") else "/".join(
          path.split("/")[-2:])
      shapes[path] = by_suffix[suffix]
  return shapes


def check_params(params: Mapping[str, Any], config: Any, *,
                 source: str = "params") -> None:
  """Raises one CheckpointMismatchError listing every missing, unexpected or
  wrong-shaped tensor of `params` (nested or flat) for `config`."""
  flat = trees.flatten_params(params)
  want = expected_shapes(config)
  problems = []
  for name, shape in want.items():
    if name not in flat:
      problems.append(f"{name}: missing (expected shape {shape})")
    elif tuple(flat[name].shape) != shape:
      problems.append(f"{name}: expected shape {shape}, found "
                      f"{tuple(flat[name].shape)}")
  problems += [f"{name}: unexpected (found shape {tuple(flat[name].shape)})"
               for name in flat if name not in want]
  if problems:
    raise CheckpointMismatchError(
        f"{source} does not match the T5 config ({len(problems)} problem(s)); "
        f"check that the checkpoint and the config are the same model size: "
        + "; ".join(problems))


# ----------------------------------------------------------------------------
# Hugging Face config <-> T5Config.
# ----------------------------------------------------------------------------


def _scales_decoder_outputs(hf_config: Mapping[str, Any]) -> bool:
  # Newer transformers store `scale_decoder_outputs`; older ones encode the
  # same thing as `tie_word_embeddings` (T5 1.0: tied and scaled).
  if "scale_decoder_outputs" in hf_config:
    return bool(hf_config["scale_decoder_outputs"])
  if hf_config.get("model_type") == "mt5":
    # mT5 never scales (its lm_head is separate); transformers 5 writes tie_word_embeddings=true
    # into every mT5 config it saves, while the released ones say false.
    return False
  return bool(hf_config.get("tie_word_embeddings", True))


def t5_config_from_hf(hf_config: Mapping[str, Any],
                      *, logits_via_embedding: bool | None = None,
                      **overrides: Any) -> Any:
  """Builds our `T5Config` from an HF T5 `config.json` dictionary.

  Args:
    hf_config: the parsed config.json.
    logits_via_embedding: whether the output layer reuses the embedding; by
      default derived from the config (T5 1.1 checkpoints say no).
    **overrides: other T5Config fields (e.g. dtype, dropout_rate).
  """
  from expert_t5x import network  # pylint: disable=g-import-not-at-top
  proj = hf_config.get("feed_forward_proj", "relu")
  if proj != "gated-gelu":
    raise ValueError(
        f"HF config feed_forward_proj={proj!r} is not supported: expert_t5x "
        f"implements the T5 1.1 / LM-adapted network ('gated-gelu'); use a "
        f"T5 1.1, LM-adapted or T0 checkpoint.")
  if logits_via_embedding is None:
    logits_via_embedding = _scales_decoder_outputs(hf_config)
  num_layers = int(hf_config["num_layers"])
  fields = dict(
      vocab_size=int(hf_config["vocab_size"]),
      emb_dim=int(hf_config["d_model"]),
      num_heads=int(hf_config["num_heads"]),
      num_encoder_layers=num_layers,
      num_decoder_layers=int(hf_config.get("num_decoder_layers") or num_layers),
      head_dim=int(hf_config["d_kv"]),
      mlp_dim=int(hf_config["d_ff"]),
      mlp_activations=("gelu", "linear"),
      dropout_rate=float(hf_config.get("dropout_rate", 0.1)),
      logits_via_embedding=bool(logits_via_embedding),
      layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-6)),
      relative_attention_num_buckets=int(
          hf_config.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(
          hf_config.get("relative_attention_max_distance", 128)),
  )
  fields.update(overrides)
  return network.T5Config(**fields)


def hf_config_from_t5(config: Any) -> dict[str, Any]:
  """The HF `config.json` dictionary for our `T5Config`."""
  if tuple(config.mlp_activations) != ("gelu", "linear"):
    raise ValueError(f"export_hf_t5: mlp_activations={config.mlp_activations} "
                     f"cannot be exported; HF 'gated-gelu' needs "
                     f"('gelu', 'linear').")
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": int(config.vocab_size),
      "d_model": int(config.emb_dim),
      "d_kv": int(config.head_dim),
      "d_ff": int(config.mlp_dim),
      "num_layers": int(config.num_encoder_layers),
      "num_decoder_layers": int(config.num_decoder_layers),
      "num_heads": int(config.num_heads),
      "relative_attention_num_buckets": int(
          getattr(config, "relative_attention_num_buckets", 32)),
      "relative_attention_max_distance": int(
          getattr(config, "relative_attention_max_distance", 128)),
      "dropout_rate": float(config.dropout_rate),
      "layer_norm_epsilon": float(getattr(config, "layer_norm_epsilon", 1e-6)),
      "initializer_factor": 1.0,
      "feed_forward_proj": "gated-gelu",
      "is_encoder_decoder": True,
      # T5 1.1: separate output layer and no d_model**-0.5 output scaling.
      "tie_word_embeddings": bool(config.logits_via_embedding),
      "scale_decoder_outputs": bool(config.logits_via_embedding),
      "use_cache": True,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
  }


# ----------------------------------------------------------------------------
# Hugging Face import.
# ----------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _hf_weight_files(path: str) -> tuple[str, list[str]]:
  """(kind, files) of an HF directory; kind is 'safetensors' or 'torch'."""
  for kind, single, index in (("safetensors", HF_SAFETENSORS,
                               HF_SAFETENSORS_INDEX),
                              ("torch", HF_TORCH, HF_TORCH_INDEX)):
    if os.path.isfile(os.path.join(path, index)):
      weight_map = _read_json(os.path.join(path, index))["weight_map"]
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
      if missing:
        raise FileNotFoundError(f"HF checkpoint '{path}': {index} lists shard(s) "
                                f"{missing} that are not in the directory; "
                                f"copy all shards.")
      return kind, [os.path.join(path, f) for f in files]
    if os.path.isfile(os.path.join(path, single)):
      return kind, [os.path.join(path, single)]
  raise FileNotFoundError(
      f"HF checkpoint '{path}' has no weights: expected {HF_SAFETENSORS}, "
      f"{HF_SAFETENSORS_INDEX}, {HF_TORCH} or {HF_TORCH_INDEX}.")


def _to_float32(array: Any) -> np.ndarray:
  return np.asarray(array, dtype=np.float32)


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        yield name, _to_float32(f.get_tensor(name))


def _import_torch(what: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{what} is a PyTorch checkpoint and reading it needs torch; install "
        f"the parity extra (pip install 'expert_t5x[parity]') or convert it "
        f"to safetensors.") from e
  return torch


def _iter_torch(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  torch = _import_torch(files[0])
  for file in files:
    # weights_only=True: never execute pickled code from a downloaded file.
    state = torch.load(file, map_location="cpu", weights_only=True)
    for name, tensor in state.items():
      yield name, tensor.detach().to(torch.float32).numpy()


def _hf_tensors(path: str) -> tuple[dict[str, np.ndarray], str, list[str]]:
  kind, files = _hf_weight_files(path)
  reader = _iter_safetensors if kind == "safetensors" else _iter_torch
  return dict(reader(files)), kind, files


def _embedding_from_hf(tensors: Mapping[str, np.ndarray], path: str
                       ) -> np.ndarray:
  for alias in _EMBEDDING_ALIASES:
    if alias in tensors:
      return tensors[alias]
  raise CheckpointMismatchError(
      f"HF checkpoint '{path}' has no token embedding: expected one of "
      f"{list(_EMBEDDING_ALIASES)}.")


def hf_to_params(tensors: Mapping[str, np.ndarray], config: Any,
                 *, tied: bool = False, source: str = "HF checkpoint"
                 ) -> dict[str, Any]:
  """Maps an HF T5 state dict (numpy) to our nested tree, checking shapes.

  Args:
    tensors: HF tensor name -> array.
    config: our T5Config for the checkpoint.
    tied: the HF config ties lm_head to the embedding, so a missing
      lm_head.weight means "same as the embedding".
    source: how to name the checkpoint in errors.
  """
  tensors = dict(tensors)
  if (tied and not config.logits_via_embedding and
      "lm_head.weight" not in tensors):
    # Tied but unscaled (newer transformers save T5 1.1 models this way when
    # lm_head equals the embedding): the output layer is the embedding.
    tensors["lm_head.weight"] = _embedding_from_hf(tensors, source)
  if "shared.weight" not in tensors:
    tensors["shared.weight"] = _embedding_from_hf(tensors, source)
  if (config.logits_via_embedding and "lm_head.weight" in tensors and
      not np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])):
    raise CheckpointMismatchError(
        f"{source} scales decoder outputs (tied T5 1.0 style) but has a "
        f"separate lm_head.weight; this combination has no T5X equivalent. "
        f"Use a T5 1.1 / LM-adapted checkpoint (tie_word_embeddings=false).")
  names = hf_name_map(config.num_encoder_layers, config.num_decoder_layers,
                      config.logits_via_embedding)
  flat, problems = {}, []
  shapes = expected_shapes(config)
  for ours, theirs in names.items():
    want = _hf_shape(ours, shapes[ours])
    if theirs not in tensors:
      problems.append(f"{theirs} (ours {ours}): missing, expected shape {want}")
      continue
    if tuple(tensors[theirs].shape) != want:
      problems.append(f"{theirs} (ours {ours}): expected shape {want}, found "
                      f"{tuple(tensors[theirs].shape)}")
      continue
    flat[ours] = np.ascontiguousarray(_hf_layout(ours, tensors[theirs]),
                                      dtype=np.float32)
  known = set(names.values()) | set(_EMBEDDING_ALIASES) | {"lm_head.weight"}
  ignored = re.compile(r".*EncDecAttention\.relative_attention_bias\.weight$")
  problems += [f"{n}: unexpected tensor of shape {tuple(tensors[n].shape)}"
               for n in sorted(tensors) if n not in known and
               not ignored.match(n)]
  if problems:
    raise CheckpointMismatchError(
        f"{source} does not match its config.json ({len(problems)} "
        f"problem(s)); the weights and config.json must describe the same "
        f"gated-gelu T5: " + "; ".join(problems))
  return trees.unflatten_params(flat)


def find_vocab(path: str) -> str | None:
  """The SentencePiece model inside a checkpoint directory, if any."""
  candidate = os.path.join(path, VOCAB_FILE)
  return candidate if os.path.isfile(candidate) else None


def load_hf_t5(path: str | os.PathLike[str], **config_overrides: Any
               ) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """Loads an HF T5 checkpoint directory into our tree.

  Args:
    path: directory with config.json and safetensors or PyTorch weights.
    **config_overrides: T5Config fields to override (e.g. dropout_rate).

  Returns:
    (params, T5Config, info) where info has `format`, `path`, `files`,
    `vocab_path` (spiece.model or None) and `hf_config`.
  """
  path = os.fspath(path)
  config_path = os.path.join(path, HF_CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"'{path}' is not an HF T5 checkpoint directory: "
                            f"{HF_CONFIG} is missing.")
  hf_config = _read_json(config_path)
  config = t5_config_from_hf(hf_config, **config_overrides)
  tensors, kind, files = _hf_tensors(path)
  params = hf_to_params(
      tensors, config, tied=bool(hf_config.get("tie_word_embeddings", True)),
      source=f"HF checkpoint '{path}'")
  info = {"format": f"hf_{kind}", "path": path, "files": files,
          "vocab_path": find_vocab(path), "hf_config": hf_config}
  return params, config, info


# ----------------------------------------------------------------------------
# Hugging Face export.
# ----------------------------------------------------------------------------


def params_to_hf(params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
  """Our tree -> HF T5 state dict (numpy float32, HF `[out, in]` layout)."""
  check_params(params, config)
  flat = trees.flatten_params(params)
  names = hf_name_map(config.num_encoder_layers, config.num_decoder_layers,
                      config.logits_via_embedding)
  out = {}
  for ours, theirs in names.items():
    value = np.asarray(flat[ours], dtype=np.float32)
    out[theirs] = np.ascontiguousarray(_hf_layout(ours, value))
  return out


def _fold(params: Mapping[str, Any], expert: Any, expert_config: Any
          ) -> dict[str, Any]:
  from expert_t5x import experts  # pylint: disable=g-import-not-at-top
  if isinstance(expert, (str, os.PathLike)):
    expert, metadata = expert_format.load_expert(expert)
    if expert_config is None:
      expert_config = experts.config_from_json(metadata["config"])
  if expert_config is None:
    raise ValueError("export_hf_t5: expert_config is required with an expert "
                     "pytree (pass the AdapterConfig/LoraConfig/FullConfig it "
                     "was trained with, or an expert directory).")
  return experts.fold_expert(params, expert, expert_config)


def export_hf_t5(params: Mapping[str, Any],
                 config: Any,
                 out_dir: str | os.PathLike[str],
                 *,
                 vocab_path: str | os.PathLike[str] | None = None,
                 expert: Any = None,
                 expert_config: Any = None,
                 overwrite: bool = False) -> str:
  """Writes an HF `T5ForConditionalGeneration` directory; returns its path.

  Args:
    params: our base parameter tree.
    config: its `T5Config` (gated GELU).
    out_dir: directory to create (written atomically via a temp dir).
    vocab_path: a SentencePiece model copied in as `spiece.model`.
    expert: optionally an expert (pytree or Expert-format directory) folded
      into the weights first with `experts.fold_expert`.
    expert_config: the expert's config (read from the directory if omitted).
    overwrite: replace an existing `out_dir`.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"export_hf_t5: '{out_dir}' already exists; pass "
                          f"overwrite=True or choose another directory.")
  if vocab_path is not None and not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"export_hf_t5: vocab_path '{vocab_path}' does not "
                            f"exist; pass the SentencePiece .model file.")
  if expert is not None:
    params = _fold(params, expert, expert_config)
  hf_config = hf_config_from_t5(config)
  tensors = params_to_hf(params, config)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  with file_io.atomic_directory(out_dir, commit=file_io.swap_dir) as tmp:
    # transformers refuses safetensors files whose format is not 'pt'.
    save_file(tensors, os.path.join(tmp, HF_SAFETENSORS),
              metadata={"format": "pt"})
    with open(os.path.join(tmp, HF_CONFIG), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    if vocab_path is not None:
      shutil.copyfile(vocab_path, os.path.join(tmp, VOCAB_FILE))
  return out_dir


# ----------------------------------------------------------------------------
# T5X checkpoints.
# ----------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def _resolve_t5x_step_dir(path: str) -> str:
  """Accepts MODEL_DIR, checkpoint_<N> or checkpoint_<N>/state."""
  if os.path.basename(os.path.normpath(path)) == ORBAX_ITEM:
    path = os.path.dirname(os.path.normpath(path))
  if (os.path.isfile(os.path.join(path, LEGACY_MSGPACK)) or
      os.path.isdir(os.path.join(path, ORBAX_ITEM))):
    return path
  steps = [(int(m.group(1)), name) for name in os.listdir(path)
           if (m := _STEP_DIR.match(name)) and
           os.path.isdir(os.path.join(path, name))] if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(
        f"'{path}' is not a T5X checkpoint: expected checkpoint_<step>/state "
        f"(orbax), checkpoint_<step>/checkpoint (legacy) or a model directory "
        f"containing checkpoint_<step> folders.")
  return _resolve_t5x_step_dir(os.path.join(path, max(steps)[1]))


def _restore_orbax_target(state_dir: str) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, Mapping) or "target" not in tree:
    raise ValueError(f"T5X orbax checkpoint '{state_dir}' has no 'target' "
                     f"(the parameters); top-level keys: "
                     f"{sorted(tree) if isinstance(tree, Mapping) else tree}.")
  target = tree["target"]
  item = {"target": jax.tree.map(
      lambda m: np.zeros(m.shape, m.dtype), target)}
  restore_args = {"target": jax.tree.map(
      lambda m: ocp.RestoreArgs(restore_type=np.ndarray), target)}
  # partial_restore: the optimizer state (often larger than the params) is
  # never read.
  restored = checkpointer.restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
  return restored["target"]


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and {"driver", "kvstore"} <= set(value)


def _read_ts_spec(spec: Mapping[str, Any], step_dir: str) -> np.ndarray:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = json.loads(json.dumps(spec, default=lambda x: x.tolist()))
  kvstore = spec["kvstore"]
  # Legacy T5X writes array paths relative to the checkpoint directory, with
  # either a file driver or a placeholder GCS bucket.
  relative = kvstore.get("path", spec.pop("path", ""))
  spec["kvstore"] = {"driver": "file",
                     "path": os.path.join(step_dir, relative)}
  return np.asarray(ts.open(spec, open=True).result().read().result())


def _restore_legacy_target(step_dir: str) -> dict[str, Any]:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(os.path.join(step_dir, LEGACY_MSGPACK), "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  state = contents.get("optimizer", contents)
  if "target" not in state:
    raise ValueError(f"Legacy T5X checkpoint '{step_dir}' has no "
                     f"optimizer.target; top-level keys {sorted(contents)}.")

  def visit(node: Any) -> Any:
    if _is_ts_spec(node):
      return _read_ts_spec(node, step_dir)
    if isinstance(node, Mapping):
      return {k: visit(v) for k, v in node.items()}
    return np.asarray(node)

  return visit(state["target"])


def load_t5x_checkpoint(path: str | os.PathLike[str], *, config: Any = None
                        ) -> dict[str, Any]:
  """Reads the parameters (`target`) of a T5X checkpoint as float32 numpy.

  Args:
    path: a T5X model directory (the latest step is used), a
      `checkpoint_<step>` directory or its orbax `state` item.
    config: if given, the parameters are checked against this T5Config.
  """
  step_dir = _resolve_t5x_step_dir(os.fspath(path))
  if os.path.isfile(os.path.join(step_dir, LEGACY_MSGPACK)):
    target = _restore_legacy_target(step_dir)
  else:
    target = _restore_orbax_target(os.path.join(step_dir, ORBAX_ITEM))
  flat = {k: _to_float32(v)
          for k, v in trees.flatten_params(target).items()}
  params = trees.unflatten_params(flat)
  if config is not None:
    check_params(params, config, source=f"T5X checkpoint '{step_dir}'")
  return params


def infer_t5_config(params: Mapping[str, Any], **overrides: Any) -> Any:
  """A gated-GELU `T5Config` whose shapes match `params` (dropout etc. from
  the defaults or `overrides`)."""
  from expert_t5x import network  # pylint: disable=g-import-not-at-top
  flat = trees.flatten_params(params)
  try:
    vocab, emb = flat["token_embedder/embedding"].shape
    heads, buckets = flat["encoder/relpos_bias/rel_embedding"].shape
    joined = flat["encoder/layers_0/attention/query/kernel"].shape[1]
    mlp = flat["encoder/layers_0/mlp/wi_0/kernel"].shape[1]
  except KeyError as e:
    raise CheckpointMismatchError(f"Cannot infer a T5 config: tensor {e} is "
                                  f"missing (gated-GELU T5X tree expected).")

  def count(stack: str) -> int:
    return len({m.group(1) for k in flat
                if (m := re.match(rf"{stack}/layers_(\d+)/", k))})

  fields = dict(vocab_size=vocab, emb_dim=emb, num_heads=heads,
                num_encoder_layers=count("encoder"),
                num_decoder_layers=count("decoder"), head_dim=joined // heads,
                mlp_dim=mlp, mlp_activations=("gelu", "linear"),
                logits_via_embedding="decoder/logits_dense/kernel" not in flat,
                relative_attention_num_buckets=buckets)
  fields.update(overrides)
  return network.T5Config(**fields)


# ----------------------------------------------------------------------------
# Auto-detection and fingerprints.
# ----------------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
  """'hf', 't5x_legacy' or 't5x_orbax' for a checkpoint path."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, HF_CONFIG)):
    return "hf"
  step_dir = _resolve_t5x_step_dir(path)
  if os.path.isfile(os.path.join(step_dir, LEGACY_MSGPACK)):
    return "t5x_legacy"
  return "t5x_orbax"


def load_params(path: str | os.PathLike[str], **config_overrides: Any
                ) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """Loads any supported checkpoint: (params, T5Config | None, info).

  HF directories carry their config; T5X checkpoints do not, so their config
  is None (use `infer_t5_config` or a named config). `info['format']` is one
  of hf_safetensors, hf_torch, t5x_legacy, t5x_orbax.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint '{path}' does not exist; pass an HF "
                            f"T5 directory or a T5X checkpoint directory.")
  kind = detect_format(path)
  if kind == "hf":
    return load_hf_t5(path, **config_overrides)
  params = load_t5x_checkpoint(path)
  step_dir = _resolve_t5x_step_dir(path)
  info = {"format": kind, "path": step_dir, "vocab_path": None,
          "step": int(_STEP_DIR.match(os.path.basename(step_dir)).group(1))
          if _STEP_DIR.match(os.path.basename(step_dir)) else None}
  return params, None, info


def _file_signature(root: str) -> list[list[Any]]:
  signature = []
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      full = os.path.join(dirpath, name)
      rel = os.path.relpath(full, root)
      if rel == FINGERPRINT_FILE or name.startswith("."):
        continue
      stat = os.stat(full)
      signature.append([rel, stat.st_size, stat.st_mtime_ns])
  return sorted(signature)


def _fingerprint_root(path: str) -> str:
  if detect_format(path) == "hf":
    return path
  return _resolve_t5x_step_dir(path)


def base_fingerprint(path_or_params: str | os.PathLike[str] | Mapping[str, Any]
                     ) -> str:
  """`tree_digest` of a base checkpoint's float32 parameters.

  For a path, the value is cached in `expert_t5x_fingerprint.json` beside the
  checkpoint and keyed by the checkpoint files' sizes and modification times,
  so a changed checkpoint is hashed again. A read-only checkpoint is hashed
  without caching.
  """
  if isinstance(path_or_params, Mapping):
    flat = {k: _to_float32(v)
            for k, v in trees.flatten_params(path_or_params).items()}
    return trees.tree_digest(flat)
  root = _fingerprint_root(os.fspath(path_or_params))
  cache = os.path.join(root, FINGERPRINT_FILE)
  signature = _file_signature(root)
  if os.path.isfile(cache):
    try:
      cached = _read_json(cache)
      if cached.get("files") == signature:
        return cached["fingerprint"]
    except (ValueError, KeyError):
      pass  # a damaged cache is recomputed
  params, _, _ = load_params(os.fspath(path_or_params))
  fingerprint = base_fingerprint(params)
  try:
    file_io.atomic_write_json(cache, {"fingerprint": fingerprint, "files": signature})
  except OSError:
    pass  # read-only checkpoint: no cache
  return fingerprint


__all__ = [
    "CheckpointMismatchError", "base_fingerprint", "check_params",
    "detect_format", "expected_shapes", "export_hf_t5", "find_vocab",
    "hf_config_from_t5", "hf_name_map", "hf_to_params", "infer_t5_config",
    "load_hf_t5", "load_params", "load_t5x_checkpoint", "params_to_hf",
    "t5_config_from_hf",
]
