"""Expert parameterizations on a frozen T5 base: adapters, LoRA and full deltas.

An *expert* is a pytree of trainable parameters kept apart from the frozen base tree. Its paths
mirror the base tree so that the network's hooks find each piece where it acts:

* ``adapter`` (the paper's prompt experts): per block, a bottleneck ``d -> d/r -> d`` with tanh-GELU
  and an internal residual on the self-attention output and the MLP output (not cross-attention):
  ``encoder/layers_i/{attention_adapter,mlp_adapter}/{wi,wo}/{kernel,bias}`` and
  ``decoder/layers_i/{self_attention_adapter,mlp_adapter}/...``; plus every layer-norm scale of the
  base (``.../pre_attention_layer_norm/scale``, ``encoder/encoder_norm/scale``...), stored as
  absolute values that replace the base scales.
* ``lora``: ``<module>/lora_a [in, r]`` and ``<module>/lora_b [r, out]`` beside a base kernel, with
  ``delta W = (alpha / r) A @ B`` in T5X's ``[in, out]`` kernel layout.
* ``full``: the full parameter delta ``theta - theta_base`` at the base's paths.

A *stacked* expert carries a leading ``expert`` axis on every leaf; with a per-example
``expert_index [B]`` each example runs through its own expert. Stacked experts exist only in memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from expert_t5x import network
from expert_t5x import trees

PyTree = Any
EXPERT_KINDS = ("adapter", "lora", "full")
# Logical axis names of expert-only dimensions (see partitioning.standard_logical_axis_rules).
EXPERT_AXIS, ADAPTER_AXIS, LORA_RANK_AXIS = "expert", "adapter", "lora_rank"

# Module paths where adapters act, per stack.
_ADAPTER_SITES = {"encoder": ("attention_adapter", "mlp_adapter"),
                  "decoder": ("self_attention_adapter", "mlp_adapter")}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Bottleneck adapters + trainable layer-norm scales (the paper's prompt/dataset experts)."""
  reduction_factor: int = 32
  # Zero-initialised up-projection makes a fresh expert reproduce the base exactly (a deviation
  # from the paper's code, which used PyTorch's default Linear init for both projections).
  zero_init_up: bool = False
  train_layer_norms: bool = True
  init_seed: int = 0
  kind: str = dataclasses.field(default="adapter", init=False)

  def __post_init__(self):
    if self.reduction_factor < 1:
      raise ValueError(f"AdapterConfig.reduction_factor must be >= 1; got {self.reduction_factor}.")


# Regexes over kernel module paths (e.g. 'decoder/layers_3/self_attention/query').
LORA_TARGET_PRESETS = {
    "attention_qv": (r"(attention|self_attention|encoder_decoder_attention)/(query|value)$",),
    "encoder_self_attention": (r"^encoder/layers_\d+/attention/(query|key|value|out)$",),
    "decoder_self_attention": (r"^decoder/layers_\d+/self_attention/(query|key|value|out)$",),
    "cross_attention": (r"^decoder/layers_\d+/encoder_decoder_attention/(query|key|value|out)$",),
    "mlp": (r"/mlp/(wi|wi_0|wi_1|wo)$",),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank deltas on selected kernels: W + (alpha / rank) A @ B, B initialised to zero."""
  rank: int = 8
  alpha: float = 16.0
  dropout_rate: float = 0.0
  # Preset names from LORA_TARGET_PRESETS or raw regexes over kernel module paths.
  targets: tuple[str, ...] = ("attention_qv",)
  init_seed: int = 0
  kind: str = dataclasses.field(default="lora", init=False)

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be >= 1; got {self.rank}.")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def target_patterns(self) -> tuple[str, ...]:
    out = []
    for t in self.targets:
      out.extend(LORA_TARGET_PRESETS.get(t, (t,)))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class FullConfig:
  """Full fine-tuning; the expert is the parameter delta from the base."""
  init_seed: int = 0
  kind: str = dataclasses.field(default="full", init=False)


ExpertConfig = Union[AdapterConfig, LoraConfig, FullConfig]
_CONFIG_CLASSES = {"adapter": AdapterConfig, "lora": LoraConfig, "full": FullConfig}


def config_to_json(config: ExpertConfig) -> dict[str, Any]:
  """The expert config as a JSON-able dict (with its `kind`), as stored in `expert.json`."""
  out = dataclasses.asdict(config)
  if "targets" in out:
    out["targets"] = list(out["targets"])
  return out


def config_from_json(data: Mapping[str, Any]) -> ExpertConfig:
  """Inverse of `config_to_json`."""
  kind = data.get("kind")
  if kind not in _CONFIG_CLASSES:
    raise ValueError(f"Expert config kind must be one of {EXPERT_KINDS}; got {kind!r}.")
  fields = {k: v for k, v in data.items() if k != "kind"}
  return _CONFIG_CLASSES[kind](**fields)


# --------------------------------------------------------------------------------- init


def _torch_linear_init(rng: np.random.Generator, fan_in: int, shape: Sequence[int]) -> np.ndarray:
  """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)
  return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def layer_norm_paths(base_params: PyTree) -> list[str]:
  """Paths of every layer-norm scale in the base tree."""
  return sorted(p for p in trees.flatten(base_params) if p.endswith("/scale"))


def init_expert(config: ExpertConfig, t5_config: network.T5Config, base_params: PyTree,
                rng: Optional[jax.Array] = None) -> PyTree:
  """A freshly initialised expert of `config`'s kind for this base (numpy float32 leaves).

  Initialisation is seeded by `config.init_seed` (recorded in the expert's metadata) unless `rng`
  is given, in which case it is folded into the seed.
  """
  seed = config.init_seed
  if rng is not None:
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1)) ^ seed
  gen = np.random.default_rng(seed)
  # Experts are always laid out per block, whatever the base's layout.
  base_params = network.unstack_layers(base_params)
  flat_base = trees.flatten(base_params)
  flat: dict[str, np.ndarray] = {}
  if isinstance(config, AdapterConfig):
    emb = t5_config.emb_dim
    bottleneck = max(1, emb // config.reduction_factor)
    for stack, num_layers in (("encoder", t5_config.num_encoder_layers),
                              ("decoder", t5_config.num_decoder_layers)):
      for i in range(num_layers):
        for site in _ADAPTER_SITES[stack]:
          prefix = f"{stack}/layers_{i}/{site}"
          flat[f"{prefix}/wi/kernel"] = _torch_linear_init(gen, emb, (emb, bottleneck))
          flat[f"{prefix}/wi/bias"] = _torch_linear_init(gen, emb, (bottleneck,))
          if config.zero_init_up:
            flat[f"{prefix}/wo/kernel"] = np.zeros((bottleneck, emb), np.float32)
            flat[f"{prefix}/wo/bias"] = np.zeros((emb,), np.float32)
          else:
            flat[f"{prefix}/wo/kernel"] = _torch_linear_init(gen, bottleneck, (bottleneck, emb))
            flat[f"{prefix}/wo/bias"] = _torch_linear_init(gen, bottleneck, (emb,))
    if config.train_layer_norms:
      for path in layer_norm_paths(base_params):
        flat[path] = np.array(flat_base[path], np.float32)
  elif isinstance(config, LoraConfig):
    patterns = [re.compile(p) for p in config.target_patterns()]
    for path in sorted(flat_base):
      if not path.endswith("/kernel"):
        continue
      module = path[:-len("/kernel")]
      if not any(p.search(module) for p in patterns):
        continue
      fan_in, fan_out = flat_base[path].shape
      # As PEFT: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0.
      flat[f"{module}/lora_a"] = _torch_linear_init(gen, fan_in, (fan_in, config.rank))
      flat[f"{module}/lora_b"] = np.zeros((config.rank, fan_out), np.float32)
    if not flat:
      raise ValueError(f"LoraConfig.targets {config.targets} match no kernel of the base; "
                       f"use presets {sorted(LORA_TARGET_PRESETS)} or regexes over paths like "
                       "'decoder/layers_0/self_attention/query'.")
  elif isinstance(config, FullConfig):
    flat = {p: np.zeros(np.shape(v), np.float32) for p, v in flat_base.items()}
  else:
    raise TypeError(f"Unknown expert config {config!r}.")
  return trees.unflatten(flat)


# ------------------------------------------------------------------------- application


def network_tree(expert: Optional[PyTree], config: Optional[ExpertConfig]) -> Optional[PyTree]:
  """The tree the network's hooks consume (None for full experts, which are added to the base).

  For LoRA the alpha/r scale is folded into B here, inside the differentiated function, which
  gives the same values and gradients as scaling the product.
  """
  if expert is None or config is None or isinstance(config, FullConfig):
    return None
  if isinstance(config, LoraConfig):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * config.scale if _last_key(path) == "lora_b" else x, expert)
  return expert


def effective_params(params: PyTree, expert: Optional[PyTree],
                     config: Optional[ExpertConfig]) -> PyTree:
  """Base parameters as the network sees them: base + delta for full experts, else the base."""
  if expert is None or not isinstance(config, FullConfig):
    return params
  flat_p, flat_e = trees.flatten(params), trees.flatten(expert)
  return trees.unflatten({k: (v + flat_e[k] if k in flat_e else v) for k, v in flat_p.items()})


def _last_key(path: tuple[Any, ...]) -> str:
  last = path[-1]
  return str(getattr(last, "key", last))


def fold_expert(base_params: PyTree, expert: PyTree, config: ExpertConfig) -> PyTree:
  """Folds an expert into base weights: W + (alpha/r) A@B for LoRA, base + delta for full.

  Adapters are nonlinear and cannot be folded; their layer-norm scales alone could be, but a
  half-folded adapter expert would silently change the model, so it is refused.
  """
  flat_base = {k: np.asarray(v) for k, v in trees.flatten(base_params).items()}
  flat_e = {k: np.asarray(v) for k, v in trees.flatten(expert).items()}
  if isinstance(config, AdapterConfig):
    raise ValueError(
        "Adapter experts cannot be folded into the base weights (the bottleneck is "
        "nonlinear); evaluate them with expert=... instead, or use a LoRA/full expert.")
  out = dict(flat_base)
  if isinstance(config, FullConfig):
    for k, v in flat_e.items():
      _check_path(k, flat_base)
      out[k] = (flat_base[k] + v).astype(np.float32)
    return trees.unflatten(out)
  for k in flat_e:
    if k.endswith("/lora_a"):
      module = k[:-len("/lora_a")]
      kernel = f"{module}/kernel"
      _check_path(kernel, flat_base)
      delta = config.scale * (flat_e[k].astype(np.float64) @ flat_e[f"{module}/lora_b"])
      out[kernel] = (flat_base[kernel] + delta).astype(np.float32)
  return trees.unflatten(out)


def _check_path(path: str, flat_base: Mapping[str, Any]) -> None:
  if path not in flat_base:
    raise ValueError(
        f"Expert parameter {path!r} has no counterpart in the base tree; is the expert "
        "for a different base architecture?")


# ------------------------------------------------------------------------------ stacking


def stack_experts(experts: Sequence[PyTree]) -> PyTree:
  """Stacks experts of identical structure along a new leading `expert` axis."""
  if not experts:
    raise ValueError("stack_experts needs at least one expert.")
  structures = {jax.tree_util.tree_structure(e) for e in experts}
  if len(structures) > 1:
    raise ValueError("Experts to stack must share one structure (same kind, targets and shapes).")
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *experts)


def unstack_expert(stacked: PyTree, index: int) -> PyTree:
  """Expert `index` of a stacked expert."""
  return jax.tree.map(lambda x: x[index], stacked)


def logical_axes(expert: PyTree, base_axes: Mapping[str, tuple[str, ...]],
                 stacked: bool = False) -> PyTree:
  """Logical axis names for every expert leaf (a tree of tuples), for sharding rules.

  Args:
    expert: an expert tree.
    base_axes: flat `{path: axis names}` of the base tree (`partitioning.params_logical_axes`).
    stacked: whether leaves carry a leading `expert` axis.
  """
  def axes_for(path: str) -> tuple[Optional[str], ...]:
    name = path.rsplit("/", 1)[-1]
    module = path.rsplit("/", 1)[0]
    if "_adapter/" in path:
      table = {"wi/kernel": ("embed", ADAPTER_AXIS), "wi/bias": (ADAPTER_AXIS,),
               "wo/kernel": (ADAPTER_AXIS, "embed"), "wo/bias": ("embed",)}
      return table[path.split("_adapter/", 1)[1]]
    if name == "lora_a":
      return (base_axes[f"{module}/kernel"][0], LORA_RANK_AXIS)
    if name == "lora_b":
      return (LORA_RANK_AXIS, base_axes[f"{module}/kernel"][1])
    return tuple(base_axes[path])

  flat = {k: axes_for(k) for k in trees.flatten(expert)}
  if stacked:
    flat = {k: (EXPERT_AXIS,) + v for k, v in flat.items()}
  return trees.unflatten(flat)


def count_parameters(tree: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
