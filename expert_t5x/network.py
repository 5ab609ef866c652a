"""T5 1.1 / LM-adapted encoder-decoder in Flax linen, parameter-compatible with T5X.

(One module over 600 lines on purpose: T5X's `network.py` and the layers it uses, kept together so
the parameter tree can be read against T5X's in one place.)

Class names, config fields, call signatures and the parameter tree (names, shapes, float32 storage,
2-D flattened attention kernels) follow T5X's `t5x/examples/t5/network.py`, so a T5X checkpoint's
`target` loads without renaming. On top of T5X, every block accepts keyword-only expert hooks:

  expert:       a pytree of expert parameters mirroring the base tree's paths (adapters, LoRA
  factors,
                layer-norm scale overrides; see `expert_t5x.experts`). Leaves may carry a leading
                `expert` axis (stacked experts).
  expert_index: `[batch]` int32 selecting, per example, one expert of a stacked `expert` tree.

With `expert=None` the network computes exactly T5X's function.

Shapes use B=batch, L=length, E=emb_dim, H=num_heads, D=head_dim, F=mlp_dim, V=vocab_size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
from flax import struct
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ExpertTree = Optional[Mapping[str, Any]]
param_with_axes = nn_partitioning.param_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

# Dropout masks: T5X broadcasts one mask over the length axis; HF T5 (the paper's code) drops
# element-wise.
DROPOUT_MODES = {"length_broadcast": (-2,), "elementwise": ()}
# Activation checkpointing policies for large models (XL/XXL).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class T5Config:
  """Global hyper-parameters of the T5 network (T5X's field names, plus memory and dropout
  switches)."""
  vocab_size: int
  # Activation dtype; parameters are always float32.
  dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  # ('gelu', 'linear') is T5 1.1's gated-GELU.
  mlp_activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  # 'length_broadcast' (T5X) or 'elementwise' (HF T5 / the paper's code).
  dropout_mode: str = "length_broadcast"
  # 'none', 'full' or 'minimal' (save matmul outputs): rematerialise each block in the backward
  # pass.
  remat_policy: str = "none"
  layer_norm_epsilon: float = 1e-6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  # Scan each stack's blocks (parameters stacked on a leading `layers` axis under
  # `encoder/layers/...`): one compiled block instead of N, for XL/XXL compile time and memory.
  # `stack_layers` / `unstack_layers` convert trees between the two layouts.
  scan_layers: bool = False
  # Dropout on the input of LoRA factors (set from the LoRA expert's config).
  lora_dropout_rate: float = 0.0

  def __post_init__(self):
    if self.dropout_mode not in DROPOUT_MODES:
      raise ValueError(f"T5Config.dropout_mode must be one of {sorted(DROPOUT_MODES)}; got "
                       f"{self.dropout_mode!r}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"T5Config.remat_policy must be one of {sorted(REMAT_POLICIES)}; got "
                       f"{self.remat_policy!r}.")

  @property
  def dropout_broadcast_dims(self) -> tuple[int, ...]:
    return DROPOUT_MODES[self.dropout_mode]


# T5 1.1 and LM-adapted checkpoints share these shapes (t5x/examples/t5/t5_1_1/*.gin).
_SIZES = {
    "tiny": dict(emb_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, head_dim=8,
                 mlp_dim=64, vocab_size=512),
    "small": dict(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8, head_dim=64,
                  mlp_dim=1024),
    "base": dict(emb_dim=768, num_heads=12, num_encoder_layers=12, num_decoder_layers=12,
                 head_dim=64, mlp_dim=2048),
    "large": dict(emb_dim=1024, num_heads=16, num_encoder_layers=24, num_decoder_layers=24,
                  head_dim=64, mlp_dim=2816),
    "xl": dict(emb_dim=2048, num_heads=32, num_encoder_layers=24, num_decoder_layers=24,
               head_dim=64, mlp_dim=5120),
    "xxl": dict(emb_dim=4096, num_heads=64, num_encoder_layers=24, num_decoder_layers=24,
                head_dim=64, mlp_dim=10240),
}
CONFIG_NAMES = tuple(_SIZES)


def get_config(name: str, **overrides: Any) -> T5Config:
  """Returns the named T5 1.1 configuration ('tiny' is for tests), with field overrides."""
  if name not in _SIZES:
    raise ValueError(f"Unknown T5 config {name!r}; expected one of {', '.join(CONFIG_NAMES)}.")
  fields = dict(vocab_size=32128, dropout_rate=0.1)
  fields.update(_SIZES[name])
  unknown = set(overrides) - {f.name for f in dataclasses.fields(T5Config)}
  if unknown:
    raise ValueError(f"Unknown T5Config fields {sorted(unknown)}.")
  fields.update(overrides)
  return T5Config(**fields)


# ------------------------------------------------------------------------ scanned layout


def stack_layers(tree: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
  """Per-block layout (`encoder/layers_{i}/...`) -> scanned layout (`encoder/layers/...`, leading
  `layers` axis). Works on parameter and expert trees; other entries are kept as they are."""
  if tree is None:
    return None
  out = dict(tree)
  for stack in ("encoder", "decoder"):
    sub = tree.get(stack)
    if not sub or "layers_0" not in sub:
      continue
    count = sum(1 for k in sub if k.startswith("layers_"))
    blocks = [sub[f"layers_{i}"] for i in range(count)]
    rest = {k: v for k, v in sub.items() if not k.startswith("layers_")}
    out[stack] = dict(rest, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))
  return out


def unstack_layers(tree: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
  """Inverse of `stack_layers`."""
  if tree is None:
    return None
  out = dict(tree)
  for stack in ("encoder", "decoder"):
    sub = tree.get(stack)
    if not sub or "layers" not in sub:
      continue
    count = jax.tree.leaves(sub["layers"])[0].shape[0]
    rest = {k: v for k, v in sub.items() if k != "layers"}
    rest.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], sub["layers"])
                 for i in range(count)})
    out[stack] = rest
  return out


# --------------------------------------------------------------------------- expert hooks


def _select(leaf: Array, expert_index: Optional[Array]) -> Array:
  """Per-example view of an expert leaf: `[K, ...]` -> `[B, ...]` when `expert_index` is given."""
  if expert_index is None:
    return leaf
  return jnp.take(leaf, expert_index, axis=0)


def _child(tree: ExpertTree, name: str) -> ExpertTree:
  if tree is None:
    return None
  return tree.get(name)


def _dot_last(x: Array, kernel: Array) -> Array:
  """`x [..., in] @ kernel [in, out]` as one 2-D product.

  Flattening the leading axes first keeps the weight gradient a plain 2-D product: with
  them as separate contracting axes XLA:CPU transposes the activations' gradient for every
  layer (about a third of a T5 MLP's backward time). On accelerators it is a free bitcast.
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
  return y.reshape(x.shape[:-1] + kernel.shape[-1:])


def apply_adapter(x: Array, adapter: ExpertTree, expert_index: Optional[Array]) -> Array:
  """Bottleneck adapter with internal residual: x + up(gelu_tanh(down(x))).

  Args:
    x: `[B, L, E]` block output (before dropout and the block residual).
    adapter: {'wi': {'kernel' [(K,) E, R], 'bias' [(K,) R]}, 'wo': {'kernel' [(K,) R, E], 'bias'}}.
    expert_index: `[B]` or None (unstacked adapter).
  """
  if adapter is None:
    return x
  dtype = x.dtype
  wi_k, wi_b = (_select(adapter["wi"][k], expert_index) for k in ("kernel", "bias"))
  wo_k, wo_b = (_select(adapter["wo"][k], expert_index) for k in ("kernel", "bias"))
  if expert_index is None:
    h = _dot_last(x, wi_k.astype(dtype)) + wi_b.astype(dtype)
    h = nn.gelu(h, approximate=True)
    h = _dot_last(h, wo_k.astype(dtype)) + wo_b.astype(dtype)
  else:
    h = jnp.einsum("ble,ber->blr", x, wi_k.astype(dtype)) + wi_b[:, None].astype(dtype)
    h = nn.gelu(h, approximate=True)
    h = jnp.einsum("blr,bre->ble", h, wo_k.astype(dtype)) + wo_b[:, None].astype(dtype)
  return x + h


def _lora_delta(x: Array, lora: Mapping[str, Any], expert_index: Optional[Array]) -> Array:
  """x @ A @ B for x `[B, L, in]`, 'lora_a' `[(K,) in, r]`, 'lora_b' `[(K,) r, out]`.

  The alpha / r scale is applied to B by `experts.network_tree` before the call.
  """
  a = _select(lora["lora_a"], expert_index).astype(x.dtype)
  b = _select(lora["lora_b"], expert_index).astype(x.dtype)
  if expert_index is None:
    return _dot_last(_dot_last(x, a), b)
  return jnp.einsum("blr,bro->blo", jnp.einsum("bli,bir->blr", x, a), b)


# --------------------------------------------------------------------------------- layers


class DenseGeneral(nn.Module):
  """Dense layer over the last axis; kernel stored 2-D `[in, prod(features)]` as in T5X."""
  features: int | tuple[int, ...]
  kernel_axes: tuple[str, str]
  dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.variance_scaling(1.0, "fan_in",
                                                                        "truncated_normal")
  lora_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, lora: ExpertTree = None,
               expert_index: Optional[Array] = None, deterministic: bool = True) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_dim = x.shape[-1]
    out_dim = int(np.prod(features))
    kernel = param_with_axes("kernel", self.kernel_init, (in_dim, out_dim), jnp.float32,
                             axes=self.kernel_axes)
    y = _dot_last(x.astype(self.dtype), kernel.astype(self.dtype))
    if lora is not None:
      x_lora = nn.Dropout(self.lora_dropout_rate)(x.astype(self.dtype), deterministic=deterministic)
      y = y + _lora_delta(x_lora, lora, expert_index)
    return y.reshape(x.shape[:-1] + features)


class LayerNorm(nn.Module):
  """T5 RMS layer norm: no mean subtraction, no bias, computed in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, scale_override: Optional[Array] = None,
               expert_index: Optional[Array] = None) -> Array:
    x = jnp.asarray(x, jnp.float32)
    scale = param_with_axes("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32,
                            axes=("embed",))
    if scale_override is not None:
      # A per-expert replacement of the base scale (trainable layer norms of adapter experts).
      scale = _select(scale_override, expert_index)
      if expert_index is not None:
        scale = scale[:, None, :]
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + self.epsilon)
    return jnp.asarray(y * scale, self.dtype)


def _norm(module: LayerNorm, x: Array, expert: ExpertTree, name: str,
          expert_index: Optional[Array]) -> Array:
  override = _child(_child(expert, name), "scale")
  return module(x, override, expert_index)


class RelativePositionBiases(nn.Module):
  """T5 relative position biases, one table per stack shared by all its layers."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any

  @staticmethod
  def _bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
              max_distance: int) -> np.ndarray:
    """Static (numpy) bucketing of `memory - query` offsets, as in Mesh TensorFlow."""
    ret = np.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
      num_buckets //= 2
      ret += (n < 0).astype(np.int32) * num_buckets
      n = np.abs(n)
    else:
      n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
        np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True) -> Array:
    """Returns `[1, H, qlen, klen]` attention-logit biases."""
    context = np.arange(qlen, dtype=np.int32)[:, None]
    memory = np.arange(klen, dtype=np.int32)[None, :]
    buckets = self._bucket(memory - context, bidirectional, self.num_buckets, self.max_distance)
    table = param_with_axes(
        "rel_embedding", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
        (self.num_heads, self.num_buckets), jnp.float32, axes=("heads", "relpos_buckets"))
    values = jnp.take(jnp.asarray(table, self.dtype), jnp.asarray(buckets), axis=1)  # [H, q, k]
    return values[None]


def _attention_dropout_shape(shape: tuple[int, ...], broadcast: bool) -> tuple[int, ...]:
  # T5X shares the attention-weight mask across query positions.
  return shape[:-2] + (1,) + shape[-1:] if broadcast else shape


class MultiHeadDotProductAttention(nn.Module):
  """T5 attention: no runtime 1/sqrt(D) (folded into the query init), softmax in float32."""
  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  broadcast_dropout: bool = True
  float32_logits: bool = False
  lora_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array] = None,
               bias: Optional[Array] = None, *, deterministic: bool = False, decode: bool = False,
               lora: ExpertTree = None, expert_index: Optional[Array] = None) -> Array:
    h, d = self.num_heads, self.head_dim
    depth_scaling = jnp.sqrt(d).astype(jnp.float32)

    def query_init(*args):
      return nn.initializers.variance_scaling(1.0, "fan_in", "normal")(*args) / depth_scaling

    projection = functools.partial(DenseGeneral,
                                   features=(h, d),
                                   kernel_axes=("embed", "joined_kv"),
                                   dtype=self.dtype,
                                   lora_dropout_rate=self.lora_dropout_rate)
    kv_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    query = projection(kernel_init=query_init, name="query")(
        inputs_q, _child(lora, "query"), expert_index, deterministic)
    key = projection(kernel_init=kv_init, name="key")(
        inputs_kv, _child(lora, "key"), expert_index, deterministic)
    value = projection(kernel_init=kv_init, name="value")(
        inputs_kv, _child(lora, "value"), expert_index, deterministic)
    query = with_sharding_constraint(query, ("batch", "length", "heads", "kv"))
    key = with_sharding_constraint(key, ("batch", "length", "heads", "kv"))
    value = with_sharding_constraint(value, ("batch", "length", "heads", "kv"))

    if decode:
      key, value, mask, bias = self._update_cache(key, value, mask, bias)

    if self.float32_logits:
      query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    # Heads-major batched matmuls ([B, H, L, D]): XLA:CPU runs these ~3x faster than einsums over
    # [B, L, H, D]; on accelerators the transposes fuse into the products.
    logits = jnp.matmul(query.transpose(0, 2, 1, 3), key.transpose(0, 2, 3, 1))  # [B, H, q, k]
    if bias is not None:
      logits = logits + bias.astype(logits.dtype)
    if mask is not None:
      logits = jnp.where(mask > 0, logits, jnp.asarray(-1e10, logits.dtype))
    weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0.0:
      keep = 1.0 - self.dropout_rate
      shape = _attention_dropout_shape(weights.shape, self.broadcast_dropout)
      keep_mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
      weights = weights * (keep_mask / keep).astype(weights.dtype)
    x = jnp.matmul(weights, value.astype(self.dtype).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    x = x.reshape(x.shape[:2] + (h * d,))
    out = DenseGeneral(features=inputs_q.shape[-1], kernel_axes=("joined_kv", "embed"),
                       dtype=self.dtype, kernel_init=kv_init,
                       lora_dropout_rate=self.lora_dropout_rate,
                       name="out")(x, _child(lora, "out"), expert_index, deterministic)
    return out

  def _update_cache(self, key: Array, value: Array, mask: Optional[Array],
                    bias: Optional[Array]) -> tuple[Array, Array, Array, Optional[Array]]:
    """Autoregressive step: writes this position's key/value and attends over positions <= it.

    The cache is `[B, L_max, H, D]`. It is created by a `decode=True` call on full-length inputs
    (the init call), then filled one position per call.
    """
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key, value, mask, bias
    batch, max_length, _, _ = cached_key.value.shape
    if key.shape[1] != 1:
      raise ValueError(f"Cached decoding takes one position per call; got length {key.shape[1]}.")
    index = cache_index.value
    key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
    cached_key.value, cached_value.value = key, value
    cache_index.value = index + 1
    mask = (jnp.arange(max_length) <= index)[None, None, None, :]
    mask = jnp.broadcast_to(mask, (batch, 1, 1, max_length))
    if bias is not None:
      bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=-2)
    return key, value, mask, bias


class MlpBlock(nn.Module):
  """Gated MLP: product of activations(wi_i x), dropout, then wo."""
  intermediate_dim: int
  activations: Sequence[str]
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  dropout_broadcast_dims: Sequence[int] = (-2,)
  lora_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs: Array, *, deterministic: bool = False, lora: ExpertTree = None,
               expert_index: Optional[Array] = None) -> Array:
    dense = functools.partial(DenseGeneral, dtype=self.dtype,
                              lora_dropout_rate=self.lora_dropout_rate)
    hidden = None
    for i, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      x = dense(self.intermediate_dim, ("embed", "mlp"), name=name)(
          inputs, _child(lora, name), expert_index, deterministic)
      x = x if act == "linear" else getattr(nn, act)(x)
      hidden = x if hidden is None else hidden * x
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=self.dropout_broadcast_dims)(
        hidden, deterministic=deterministic)
    hidden = with_sharding_constraint(hidden, ("batch", "length", "mlp"))
    out = dense(inputs.shape[-1], ("mlp", "embed"), name="wo")(
        hidden, _child(lora, "wo"), expert_index, deterministic)
    return out


# --------------------------------------------------------------------------------- blocks


def _layer_stack(layer_cls: type[nn.Module], config: T5Config, num_layers: int,
                 scanned_in_axes: tuple[Any, ...]) -> type[nn.Module]:
  """Applies the remat policy, and with `scan_layers` scans the block over a `layers` axis."""
  if config.remat_policy != "none":
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[config.remat_policy])
  if config.scan_layers:
    layer_cls = nn_partitioning.scan_with_axes(
        layer_cls, variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True}, in_axes=scanned_in_axes, length=num_layers,
        axis_name="layers")
  return layer_cls


class EncoderLayer(nn.Module):
  """Pre-LN encoder block: self-attention, then MLP, each with dropout and a residual.

  `bias` is the stack's shared relative-position bias `[1, H, L, L]`. With `scanned`, the block
  returns `(output, None)` as `nn.scan` expects.
  """
  config: T5Config
  deterministic: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, inputs: Array, encoder_mask: Optional[Array], bias: Array,
               expert: ExpertTree, expert_index: Optional[Array] = None) -> Array:
    cfg, deterministic = self.config, self.deterministic
    dropout = functools.partial(nn.Dropout, cfg.dropout_rate,
                                broadcast_dims=cfg.dropout_broadcast_dims)
    x = _norm(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_attention_layer_norm"),
              inputs, expert, "pre_attention_layer_norm", expert_index)
    x = MultiHeadDotProductAttention(
        cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.dropout_rate,
        broadcast_dropout=bool(cfg.dropout_broadcast_dims),
        float32_logits=cfg.float32_attention_logits, lora_dropout_rate=cfg.lora_dropout_rate,
        name="attention")(
            x, x, encoder_mask, bias, deterministic=deterministic,
            lora=_child(expert, "attention"), expert_index=expert_index)
    x = apply_adapter(x, _child(expert, "attention_adapter"), expert_index)
    x = dropout()(x, deterministic=deterministic) + inputs
    y = _norm(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm"),
              x, expert, "pre_mlp_layer_norm", expert_index)
    y = MlpBlock(cfg.mlp_dim, tuple(cfg.mlp_activations), cfg.dtype, cfg.dropout_rate,
                 cfg.dropout_broadcast_dims, cfg.lora_dropout_rate, name="mlp")(
                     y, deterministic=deterministic, lora=_child(expert, "mlp"),
                     expert_index=expert_index)
    y = apply_adapter(y, _child(expert, "mlp_adapter"), expert_index)
    y = dropout()(y, deterministic=deterministic) + x
    y = with_sharding_constraint(y, ("batch", "length", "embed"))
    return (y, None) if self.scanned else y


class DecoderLayer(nn.Module):
  """Pre-LN decoder block: causal self-attention, cross-attention, MLP.

  With `num_choices=K`, the batch holds K consecutive target rows per encoded input
  (`[B*K, L]` targets against `[B, Li, E]` encodings): cross-attention then folds the K rows into
  the query axis, so the encoder's keys and values are computed once per input rather than K times.
  """
  config: T5Config
  deterministic: bool = False
  decode: bool = False
  num_choices: int = 1
  scanned: bool = False

  @nn.compact
  def __call__(self, inputs: Array, encoded: Array, decoder_mask: Optional[Array],
               encoder_decoder_mask: Optional[Array], bias: Array, expert: ExpertTree,
               expert_index: Optional[Array] = None) -> Array:
    cfg, deterministic, num_choices = self.config, self.deterministic, self.num_choices
    dropout = functools.partial(nn.Dropout, cfg.dropout_rate,
                                broadcast_dims=cfg.dropout_broadcast_dims)
    attention = functools.partial(
        MultiHeadDotProductAttention, cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.dropout_rate,
        broadcast_dropout=bool(cfg.dropout_broadcast_dims),
        float32_logits=cfg.float32_attention_logits, lora_dropout_rate=cfg.lora_dropout_rate)

    x = _norm(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_self_attention_layer_norm"),
              inputs, expert, "pre_self_attention_layer_norm", expert_index)
    x = attention(name="self_attention")(
        x, x, decoder_mask, bias, deterministic=deterministic, decode=self.decode,
        lora=_child(expert, "self_attention"), expert_index=expert_index)
    x = apply_adapter(x, _child(expert, "self_attention_adapter"), expert_index)
    x = dropout()(x, deterministic=deterministic) + inputs

    y = _norm(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_cross_attention_layer_norm"),
              x, expert, "pre_cross_attention_layer_norm", expert_index)
    rows, tlen, emb = y.shape
    if num_choices > 1:
      y = y.reshape(rows // num_choices, num_choices * tlen, emb)  # [B, K*L, E]
    y = attention(name="encoder_decoder_attention")(
        y, encoded, encoder_decoder_mask, deterministic=deterministic,
        lora=_child(expert, "encoder_decoder_attention"),
        expert_index=(expert_index if expert_index is None or num_choices == 1
                      else expert_index[::num_choices]))
    y = y.reshape(rows, tlen, emb)
    y = dropout()(y, deterministic=deterministic) + x

    z = _norm(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm"),
              y, expert, "pre_mlp_layer_norm", expert_index)
    z = MlpBlock(cfg.mlp_dim, tuple(cfg.mlp_activations), cfg.dtype, cfg.dropout_rate,
                 cfg.dropout_broadcast_dims, cfg.lora_dropout_rate, name="mlp")(
                     z, deterministic=deterministic, lora=_child(expert, "mlp"),
                     expert_index=expert_index)
    z = apply_adapter(z, _child(expert, "mlp_adapter"), expert_index)
    z = dropout()(z, deterministic=deterministic) + y
    z = with_sharding_constraint(z, ("batch", "length", "embed"))
    return (z, None) if self.scanned else z


class Embed(nn.Module):
  """Token embedding table `[V, E]`, initialised N(0, 1) as in T5X."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = param_with_axes("embedding", nn.initializers.normal(stddev=1.0),
                                     (self.num_embeddings, self.features), jnp.float32,
                                     axes=("vocab", "embed"))

  def __call__(self, inputs: Array) -> Array:
    # Gather, then cast: a bfloat16-stored table is not copied whole to the activation dtype.
    return jnp.take(self.embedding, inputs.astype(jnp.int32), axis=0).astype(self.dtype)

  def attend(self, query: Array) -> Array:
    flat = query.reshape(-1, query.shape[-1])
    logits = jnp.einsum("te,ve->tv", flat, jnp.asarray(self.embedding, self.dtype))
    return logits.reshape(query.shape[:-1] + logits.shape[-1:])


class Encoder(nn.Module):
  """Stack of encoder blocks sharing one relative position table."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_mask: Optional[Array] = None,
               deterministic: bool = False, expert: ExpertTree = None,
               expert_index: Optional[Array] = None) -> Array:
    cfg = self.config
    rel_emb = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                     cfg.relative_attention_max_distance, cfg.num_heads, cfg.dtype,
                                     name="relpos_bias")
    x = self.shared_embedding(encoder_input_tokens).astype(cfg.dtype)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=cfg.dropout_broadcast_dims)(
        x, deterministic=deterministic)
    length = encoder_input_tokens.shape[-1]
    bias = rel_emb(length, length, True)  # Shared by every block of the stack.
    layer_cls = _layer_stack(EncoderLayer, cfg, cfg.num_encoder_layers,
                             (nn.broadcast, nn.broadcast, 0, nn.broadcast))
    if cfg.scan_layers:
      x, _ = layer_cls(cfg, deterministic, scanned=True, name="layers")(
          x, encoder_mask, bias, _child(expert, "layers"), expert_index)
    for i in range(0 if cfg.scan_layers else cfg.num_encoder_layers):
      x = layer_cls(cfg, deterministic, name=f"layers_{i}")(
          x, encoder_mask, bias, _child(expert, f"layers_{i}"), expert_index)
    x = _norm(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm"), x, expert,
              "encoder_norm", expert_index)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Stack of decoder blocks, final norm and (untied) output logits in float32."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, decoder_input_tokens: Array,
               decoder_mask: Optional[Array] = None,
               encoder_decoder_mask: Optional[Array] = None, deterministic: bool = False,
               decode: bool = False, max_decode_length: Optional[int] = None,
               num_choices: int = 1, expert: ExpertTree = None,
               expert_index: Optional[Array] = None) -> Array:
    cfg = self.config
    rel_emb = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                     cfg.relative_attention_max_distance, cfg.num_heads, cfg.dtype,
                                     name="relpos_bias")
    y = self.shared_embedding(decoder_input_tokens).astype(cfg.dtype)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=cfg.dropout_broadcast_dims)(
        y, deterministic=deterministic)
    # While decoding step by step the bias covers the whole cache; each step takes its row.
    length = max_decode_length if decode and max_decode_length else decoder_input_tokens.shape[-1]
    bias = rel_emb(length, length, False)
    layer_cls = _layer_stack(
        DecoderLayer, cfg, cfg.num_decoder_layers,
        (nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast))
    if cfg.scan_layers:
      y, _ = layer_cls(cfg, deterministic, decode, num_choices, scanned=True, name="layers")(
          y, encoded, decoder_mask, encoder_decoder_mask, bias, _child(expert, "layers"),
          expert_index)
    for i in range(0 if cfg.scan_layers else cfg.num_decoder_layers):
      y = layer_cls(cfg, deterministic, decode, num_choices, name=f"layers_{i}")(
          y, encoded, decoder_mask, encoder_decoder_mask, bias, _child(expert, f"layers_{i}"),
          expert_index)
    y = _norm(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="decoder_norm"), y, expert,
              "decoder_norm", expert_index)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])
    else:
      logits = DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32,
                            lora_dropout_rate=cfg.lora_dropout_rate, name="logits_dense")(
                                y, _child(expert, "logits_dense"), expert_index, deterministic)
    return with_sharding_constraint(logits, ("batch", "length", "vocab"))


def make_attention_mask(query_input: Array, key_input: Array,
                        extra_batch_dims: int = 0) -> Array:
  """`[B, 1, q, k]` float mask: 1 where both query and key positions are real (> 0)."""
  mask = jnp.logical_and(query_input[..., :, None] > 0, key_input[..., None, :] > 0)
  return jnp.expand_dims(mask, axis=-3).astype(jnp.float32)


def _segment_mask(query_segments: Array, key_segments: Array) -> Array:
  return jnp.expand_dims(jnp.equal(query_segments[..., :, None], key_segments[..., None, :]),
                         -3).astype(jnp.float32)


class Transformer(nn.Module):
  """T5 1.1 encoder-decoder (T5X's `Transformer`), with optional expert hooks."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             encoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
             expert: ExpertTree = None, expert_index: Optional[Array] = None) -> Array:
    """Encodes `[B, Li]` int32 tokens (0 = padding) into `[B, Li, E]`."""
    del encoder_positions  # Relative positions only, as in T5X.
    mask = make_attention_mask(encoder_input_tokens, encoder_input_tokens)
    if encoder_segment_ids is not None:
      mask = mask * _segment_mask(encoder_segment_ids, encoder_segment_ids)
    return self.encoder(encoder_input_tokens, mask, deterministic=not enable_dropout,
                        expert=_child(expert, "encoder"), expert_index=expert_index)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array], encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None, decoder_positions: Optional[Array] = None,
             *, enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None, num_choices: int = 1,
             expert: ExpertTree = None, expert_index: Optional[Array] = None) -> Array:
    """Returns `[B', Lt, V]` float32 logits; B' = B*num_choices rows of targets per encoded input.

    `expert_index` is `[B']` (one entry per target row).
    """
    del decoder_positions
    if decode:
      decoder_mask = None
      encoder_decoder_mask = make_attention_mask(jnp.ones_like(decoder_input_tokens),
                                                 encoder_input_tokens)
    else:
      decoder_mask = nn.make_causal_mask(decoder_target_tokens, dtype=jnp.float32)
      decoder_mask = decoder_mask * make_attention_mask(decoder_target_tokens,
                                                        decoder_target_tokens)
      if decoder_segment_ids is not None:
        decoder_mask = decoder_mask * _segment_mask(decoder_segment_ids, decoder_segment_ids)
      target_rows = decoder_target_tokens
      if num_choices > 1:
        target_rows = target_rows.reshape(encoded.shape[0], -1)  # [B, K*Lt]
      encoder_decoder_mask = make_attention_mask(target_rows, encoder_input_tokens)
      if encoder_segment_ids is not None:
        encoder_decoder_mask = encoder_decoder_mask * _segment_mask(decoder_segment_ids,
                                                                    encoder_segment_ids)
    return self.decoder(encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length, num_choices=num_choices,
                        expert=_child(expert, "decoder"), expert_index=expert_index)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None,
               expert: ExpertTree = None, expert_index: Optional[Array] = None) -> Array:
    """Teacher-forced logits `[B, Lt, V]` float32 for `[B, Li]` inputs and `[B, Lt]` targets."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout, expert=expert, expert_index=expert_index)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, decoder_positions,
                       enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length, expert=expert,
                       expert_index=expert_index)
