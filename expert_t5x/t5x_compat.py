"""What upstream T5X (`python -m t5x.train` / `t5x.eval`) needs to train and score our experts.

Nothing here imports t5x: the gin files in `gin/t5x/` put these objects into T5X's own
configurables.

* `ExpertTransformer`: `network.Transformer` plus one expert's parameters, usable as
  `models.EncoderDecoderModel.module`. The base parameters keep T5X's paths (`token_embedder`,
  `encoder`, `decoder`), so a T5X base checkpoint restores unchanged; the expert's adapters or
  LoRA factors live under a top-level `expert` subtree whose paths mirror the base
  (`expert/encoder/layers_0/mlp_adapter/wi/kernel`, `expert/decoder/layers_1/self_attention/
  query/lora_a`, ...). An adapter expert's layer-norm scales are trained in place, at the base's
  own `.../scale` paths. Every parameter carries logical axis names (`params_axes`).
* `param_labels` / `freeze_base`: the labels ('trainable' / 'frozen') and the
  `optax.multi_transform` that trains only the expert (put it inside `t5x.optimizers.chain`).
* `task_vocabulary`: the very vocabulary object a registered task uses, so T5X's
  `verify_matching_vocabs` (an equality check, identity for our lazy vocabulary) passes.
* `expert_from_t5x_params`: a trained T5X parameter tree -> the expert tree of Expert format v1.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from expert_t5x import checkpoint_importer
from expert_t5x import experts
from expert_t5x import network
from expert_t5x import trees

PyTree = Any
EXPERT_COLLECTION_KEY = "expert"  # Top-level parameter subtree of the expert.
TRAINABLE, FROZEN = "trainable", "frozen"


# ---------------------------------------------------------------------------------- module


_CACHE: dict[tuple[str, str, str], Any] = {}


def _cached(what: str, expert: Any, config: network.T5Config, make: Callable[[], Any]) -> Any:
  # Keyed by repr: gin may hand over lists inside the configs, which are not hashable.
  key = (what, repr(expert), repr(config))
  if key not in _CACHE:
    _CACHE[key] = make()
  return _CACHE[key]


def _initial_expert(expert: experts.ExpertConfig,
                    config: network.T5Config) -> dict[str, np.ndarray]:
  """The seeded initial expert (as `expert_t5x.train` makes it), without layer-norm copies."""
  def make():
    shapes = checkpoint_importer.expected_shapes(config)
    base = trees.unflatten(
        {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
    cfg = expert
    if isinstance(cfg, experts.AdapterConfig):
      cfg = dataclasses.replace(cfg, train_layer_norms=False)  # Scales are trained in place.
    return trees.flatten(experts.init_expert(cfg, config, base))
  return _cached("init", expert, config, make)


def base_logical_axes(config: network.T5Config) -> dict[str, tuple[str, ...]]:
  """Flat `{path: logical axis names}` of the base network's parameters."""
  from expert_t5x import partitioning  # pylint: disable=g-import-not-at-top

  def make():
    shapes = jax.eval_shape(lambda: network.Transformer(config).init(
        jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
        jnp.ones((1, 2), jnp.int32), enable_dropout=False))
    return partitioning.params_logical_axes(shapes)
  return _cached("axes", None, config, make)


def _expert_axes(expert: experts.ExpertConfig, config: network.T5Config) -> dict[str, tuple]:
  tree = trees.unflatten(_initial_expert(expert, config))
  axes = experts.logical_axes(tree, base_logical_axes(config))
  return trees.flatten(axes)  # axis-name tuples are leaves


class _ParamTree(nn.Module):
  """Declares the leaves of a flat `{path: value}` spec as parameters (with logical axes) in
  nested submodules named by the path, and returns them as a nested tree."""
  leaves: tuple[tuple[str, Any, tuple[str, ...]], ...]  # (path, initial value, axes)

  @nn.compact
  def __call__(self) -> dict[str, Any]:
    heads: dict[str, list] = {}
    out: dict[str, Any] = {}
    for path, value, axes in self.leaves:
      head, _, rest = path.partition("/")
      if rest:
        heads.setdefault(head, []).append((rest, value, axes))
      else:
        init = lambda *_, v=value: jnp.asarray(v, jnp.float32)
        out[head] = network.param_with_axes(head, init, np.shape(value), jnp.float32, axes=axes)
    for head, sub in heads.items():
      out[head] = _ParamTree(tuple(sub), name=head)()
    return out


class _Frozen:
  """Wraps numpy initial values so the module's fields stay hashable (compared by identity)."""

  def __init__(self, value: np.ndarray):
    self.value = value

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.value, dtype)

  @property
  def shape(self):
    return self.value.shape


class ExpertTransformer(network.Transformer):
  """T5 1.1 (`network.Transformer`) with one expert's parameters, for upstream T5X.

  Attributes:
    config: the base `network.T5Config`.
    expert_config: `experts.AdapterConfig` / `experts.LoraConfig` (the expert trained beside the
    base),
      `experts.FullConfig` or None (no extra parameters: full fine-tuning trains the base itself).

  The expert's initial values are `experts.init_expert`'s (seeded by its `init_seed`, whatever rng
  T5X passes), so a T5X run starts from the same expert as `python -m expert_t5x.train`.
  """
  expert_config: Optional[experts.ExpertConfig] = None

  def _has_expert_params(self) -> bool:
    return isinstance(self.expert_config, (experts.AdapterConfig, experts.LoraConfig))

  def _network_config(self) -> network.T5Config:
    if isinstance(self.expert_config, experts.LoraConfig):
      return self.config.replace(lora_dropout_rate=self.expert_config.dropout_rate)
    return self.config

  def setup(self):
    cfg = self._network_config()
    if cfg.scan_layers:
      raise ValueError("ExpertTransformer needs per-block parameters (T5X's layout); set "
                       "network.T5Config.scan_layers = False.")
    self.token_embedder = network.Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = network.Encoder(cfg, self.token_embedder)
    self.decoder = network.Decoder(cfg, self.token_embedder)
    if self._has_expert_params():
      axes = _expert_axes(self.expert_config, cfg)
      leaves = tuple((k, _Frozen(v), axes[k])
                     for k, v in sorted(_initial_expert(self.expert_config, cfg).items()))
      # The attribute name is the parameter subtree's name (EXPERT_COLLECTION_KEY).
      self.expert = _ParamTree(leaves)

  def _expert_tree(self) -> Optional[PyTree]:
    if not self._has_expert_params():
      return None
    return experts.network_tree(self.expert(), self.expert_config)

  # `network.Transformer.__call__` goes through encode/decode, so these two add the expert.
  def encode(self, *args, **kwargs) -> jax.Array:
    if kwargs.get("expert") is None:
      kwargs["expert"] = self._expert_tree()
    return super().encode(*args, **kwargs)

  def decode(self, *args, **kwargs) -> jax.Array:
    if kwargs.get("expert") is None:
      kwargs["expert"] = self._expert_tree()
    return super().decode(*args, **kwargs)


# ---------------------------------------------------------------------------------- labels


def _is_layer_norm_scale(path: str) -> bool:
  return path.endswith("/scale")


def param_labels(params: PyTree, expert: Optional[experts.ExpertConfig] = None) -> PyTree:
  """'trainable' / 'frozen' for every parameter of an `ExpertTransformer`.

  Trainable: the `expert` subtree; an adapter expert's layer-norm scales (when
  `train_layer_norms`); everything for full fine-tuning (`expert` None or `FullConfig`).
  """
  full = expert is None or isinstance(expert, experts.FullConfig)
  train_norms = isinstance(expert, experts.AdapterConfig) and expert.train_layer_norms

  def label(path: tuple[Any, ...], _: Any) -> str:
    keys = [str(getattr(p, "key", p)) for p in path]
    joined = "/".join(keys)
    if full or keys[0] == EXPERT_COLLECTION_KEY or (train_norms and _is_layer_norm_scale(joined)):
      return TRAINABLE
    return FROZEN

  return jax.tree_util.tree_map_with_path(label, params)


def freeze_base(trainable: Sequence[optax.GradientTransformation],
                expert: Optional[experts.ExpertConfig] = None) -> optax.GradientTransformation:
  """`optax.multi_transform`: `trainable` (chained, e.g. clipping then AdamW) on the expert's
  parameters, zero updates on the frozen base (whose parameters then stay bitwise unchanged).

  Gradient clipping inside `trainable` sees the expert's gradients only, as in our trainer.
  """
  if not trainable:
    raise ValueError("freeze_base needs at least one trainable transformation, e.g. "
                     "[@optax.adamw()].")
  return optax.multi_transform({TRAINABLE: optax.chain(*trainable), FROZEN: optax.set_to_zero()},
                               functools.partial(param_labels, expert=expert))


# ------------------------------------------------------------------------------ vocabulary


def task_vocabulary(mixture_or_task_name: str, feature: str = "targets") -> Any:
  """The vocabulary object of a registered seqio task or mixture's `feature` (the same object,
  so T5X's vocabulary checks pass)."""
  import seqio  # pylint: disable=g-import-not-at-top
  try:
    task = seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError as e:
    raise ValueError(f"task_vocabulary: {mixture_or_task_name!r} is not a registered task or "
                     f"mixture ({e}); import the module that registers it in the gin file "
                     "(`import seqio_tasks`).") from None
  if feature not in task.output_features:
    raise ValueError(f"task_vocabulary: task {mixture_or_task_name!r} has no feature {feature!r}; "
                     f"it has {sorted(task.output_features)}.")
  return task.output_features[feature].vocabulary


# ------------------------------------------------------------------------------ conversion


def expert_from_t5x_params(params: Mapping[str, Any], expert: experts.ExpertConfig,
                           base_params: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The Expert format v1 tree of a trained `ExpertTransformer`'s parameters.

  Adapter: the `expert` subtree plus (with `train_layer_norms`) every layer-norm scale, as
  absolute values. LoRA: the `expert` subtree (factors unscaled, as `experts` stores them).
  Full: the parameter delta from `base_params`.
  """
  flat = {k: np.asarray(v, np.float32)
          for k, v in trees.flatten(params).items()}
  prefix = EXPERT_COLLECTION_KEY + "/"
  if isinstance(expert, experts.FullConfig):
    if base_params is None:
      raise ValueError("A full fine-tuning expert is the delta from its base: pass the base "
                       "checkpoint (--base).")
    base = {k: np.asarray(v, np.float32)
            for k, v in trees.flatten(base_params).items()}
    missing = sorted(set(base) ^ set(flat))
    if missing:
      raise ValueError(f"The T5X parameters and the base differ in paths, e.g. {missing[:3]}; "
                       "is --base the checkpoint this run started from?")
    out = {k: flat[k] - base[k] for k in base}
  else:
    out = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if not out:
      raise ValueError(f"The T5X parameters have no '{EXPERT_COLLECTION_KEY}' subtree: was the run "
                       "trained with t5x_compat.ExpertTransformer and an adapter or LoRA expert?")
    if isinstance(expert, experts.AdapterConfig) and expert.train_layer_norms:
      out.update({k: v for k, v in flat.items()
                  if not k.startswith(prefix) and _is_layer_norm_scale(k)})
  return trees.unflatten(out)


def base_from_t5x_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The base tree of an `ExpertTransformer`'s parameters (the `expert` subtree dropped)."""
  return {k: v for k, v in dict(params).items() if k != EXPERT_COLLECTION_KEY}


def expert_config_from_gin_text(text: str) -> experts.ExpertConfig:
  """The expert config a T5X run used, read from its `config.gin` (operative config)."""
  fields: dict[str, Any] = {}
  kind = None
  for cls, name in ((experts.AdapterConfig, "AdapterConfig"), (experts.LoraConfig, "LoraConfig"),
                    (experts.FullConfig, "FullConfig")):
    if re.search(rf"@[\w.]*experts\.{name}\(\)", text):
      kind = cls
      for field in dataclasses.fields(cls):
        if not field.init:
          continue
        m = re.search(rf"^[\w.]*experts\.{name}\.{field.name}\s*=\s*(.+)$", text, re.M)
        value = m.group(1) if m else _block_binding(text, name, field.name)
        if value is not None:
          fields[field.name] = _literal(value)
      break
  if kind is None:
    raise ValueError("The run's config.gin names no experts.AdapterConfig/LoraConfig/FullConfig; "
                     "train it with a gin/t5x/ file (t5x_compat.ExpertTransformer.expert_config).")
  return kind(**fields)


def _block_binding(text: str, name: str, field: str) -> Optional[str]:
  """`field = value` inside a `experts.<name>:` block of an operative config."""
  block = re.search(rf"^[\w.]*experts\.{name}:\n((?:[ \t]+.+\n?)+)", text, re.M)
  if block is None:
    return None
  m = re.search(rf"^\s+{field}\s*=\s*(.+)$", block.group(1), re.M)
  return m.group(1) if m else None


def _literal(value: Any) -> Any:
  import ast  # pylint: disable=g-import-not-at-top
  value = value.strip() if isinstance(value, str) else value
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


__all__ = [
    "ExpertTransformer", "param_labels", "freeze_base", "task_vocabulary",
    "expert_from_t5x_params", "base_from_t5x_params", "expert_config_from_gin_text",
    "base_logical_axes", "TRAINABLE", "FROZEN",
]
