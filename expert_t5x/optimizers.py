"""Optimizers and learning-rate schedules in optax, configured the T5X way.

* `AdamW` and `Adafactor` are small optimizer definitions (gin-configurable dataclasses, T5X's
  argument names) whose `create()` returns an optax `GradientTransformation`. Both optionally clip
  gradients by global norm first (`global_norm_clip_threshold`), and both take the learning rate
  as an injected hyper-parameter (`optax.inject_hyperparams`), so the trainer sets it every step
  from a schedule with per-expert arguments (`set_learning_rate`).
* `Adafactor` equals T5X's `adafactor.Adafactor` for parameters of rank <= 2 (all of T5 1.1):
  T5X falls back to the two-largest-dims factoring rule there, which is optax's rule.
* Frozen leaves (`frozen_patterns`, regexes over `/`-joined paths) go through
  `optax.multi_transform` with `optax.set_to_zero()`: no update and no optimizer state.
* `create_learning_rate_scheduler` takes T5X's factor strings. `linear_decay` decays linearly to 0
  at `total_steps` after warmup, as Hugging Face's `get_linear_schedule_with_warmup` (the paper's
  schedule); `total_steps` is bound at run time, when the data size is known.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any
Schedule = Callable[..., Array]

_FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay", "decay_every",
            "cosine_decay", "linear_decay")


@dataclasses.dataclass(frozen=True)
class LearningRateSchedule:
  """A product of T5X schedule factors, evaluated at `step` with an optional `total_steps`.

  `total_steps` may be a traced array (one value per stacked expert).
  """
  factors: str = "constant * linear_warmup * rsqrt_decay"
  base_learning_rate: float = 0.5
  warmup_steps: int = 1000
  decay_factor: float = 0.5
  steps_per_decay: int = 20000
  steps_per_cycle: int = 100000
  step_offset: int = 0
  min_learning_rate: float = 1e-8

  def __post_init__(self):
    unknown = [f for f in self.factor_names if f not in _FACTORS]
    if unknown:
      raise ValueError(f"Unknown learning-rate factor(s) {unknown} in {self.factors!r}; "
                       f"use factors from {list(_FACTORS)} joined by '*'.")

  @property
  def factor_names(self) -> list[str]:
    return [f.strip() for f in self.factors.split("*") if f.strip()]

  @property
  def needs_total_steps(self) -> bool:
    return "linear_decay" in self.factor_names

  def __call__(self, step: Union[int, Array], total_steps: Union[int, Array, None] = None) -> Array:
    step = jnp.maximum(0, jnp.asarray(step, jnp.float32) - self.step_offset)
    warmup = float(self.warmup_steps)
    ret = jnp.asarray(1.0, jnp.float32)
    for name in self.factor_names:
      if name == "constant":
        ret *= self.base_learning_rate
      elif name == "linear_warmup":
        ret *= jnp.minimum(1.0, step / max(warmup, 1.0))
      elif name == "rsqrt_decay":
        ret /= jnp.sqrt(jnp.maximum(step, warmup))
      elif name == "rsqrt_normalized_decay":
        ret *= jnp.sqrt(warmup) / jnp.sqrt(jnp.maximum(step, warmup))
      elif name == "decay_every":
        ret *= self.decay_factor ** (step // self.steps_per_decay)
      elif name == "cosine_decay":
        progress = jnp.maximum(0.0, (step - warmup) / float(self.steps_per_cycle))
        ret *= jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
      elif name == "linear_decay":
        if total_steps is None:
          raise ValueError("The 'linear_decay' learning-rate factor needs total_steps; the trainer "
                           "binds it from TRAIN_STEPS or NUM_EPOCHS.")
        total = jnp.asarray(total_steps, jnp.float32)
        ret *= jnp.clip((total - step) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    return jnp.maximum(ret, self.min_learning_rate)


def create_learning_rate_scheduler(factors: str = "constant * linear_warmup * rsqrt_decay",
                                   base_learning_rate: float = 0.5, warmup_steps: int = 1000,
                                   decay_factor: float = 0.5, steps_per_decay: int = 20000,
                                   steps_per_cycle: int = 100000, step_offset: int = 0,
                                   min_learning_rate: float = 1e-8) -> LearningRateSchedule:
  """T5X's `utils.create_learning_rate_scheduler` (same arguments), plus `linear_decay`."""
  return LearningRateSchedule(factors, base_learning_rate, warmup_steps, decay_factor,
                              steps_per_decay, steps_per_cycle, step_offset, min_learning_rate)


# ------------------------------------------------------------------------- optimizer defs


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_labels(params: PyTree, frozen_patterns: Sequence[str]) -> PyTree:
  """'frozen' for leaves whose `/`-joined path matches any pattern, else 'trainable'."""
  regexes = [re.compile(p) for p in frozen_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(r.search(_path_str(path)) for r in regexes) else "trainable",
      params)


class _OptimizerDef:
  """Shared `create()`: clip by global norm, the core transform, frozen leaves, injected lr."""
  global_norm_clip_threshold: Optional[float]
  frozen_patterns: Sequence[str]

  def _core(self, learning_rate: Array) -> optax.GradientTransformation:
    raise NotImplementedError

  def create(self) -> optax.GradientTransformation:
    """The optax transformation; its learning rate is set per step by `set_learning_rate`."""
    def build(learning_rate):
      parts = []
      if self.global_norm_clip_threshold:
        parts.append(optax.clip_by_global_norm(self.global_norm_clip_threshold))
      parts.append(self._core(learning_rate))
      tx = optax.chain(*parts)
      if self.frozen_patterns:
        patterns = tuple(self.frozen_patterns)
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                   lambda p: param_labels(p, patterns))
      return tx
    return optax.inject_hyperparams(build)(learning_rate=0.0)


@dataclasses.dataclass(frozen=True)
class AdamW(_OptimizerDef):
  """AdamW (decoupled weight decay, scaled by the learning rate as in PyTorch / HF)."""
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  global_norm_clip_threshold: Optional[float] = None
  frozen_patterns: Sequence[str] = ()

  def _core(self, learning_rate):
    return optax.adamw(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                       weight_decay=self.weight_decay)


@dataclasses.dataclass(frozen=True)
class Adafactor(_OptimizerDef):
  """T5X's Adafactor arguments over `optax.adafactor` (identical for rank <= 2 parameters).

  `step_offset` is T5X's: the second-moment decay is `1 - (step - step_offset + 1) ** -decay_rate`;
  a negative offset mimics a restored pre-training step count (T5X fine-tuning restores it).
  """
  factored: bool = True
  multiply_by_parameter_scale: bool = True
  beta1: Optional[float] = None
  decay_rate: float = 0.8
  step_offset: int = 0
  clipping_threshold: Optional[float] = 1.0
  weight_decay_rate: Optional[float] = None
  min_dim_size_to_factor: int = 128
  epsilon1: float = 1e-30
  epsilon2: float = 1e-3
  global_norm_clip_threshold: Optional[float] = None
  frozen_patterns: Sequence[str] = ()

  def __post_init__(self):
    if self.epsilon2 != 1e-3:
      raise ValueError(f"Adafactor.epsilon2={self.epsilon2}: optax fixes the parameter-scale floor "
                       "at 1e-3 (T5X's default); leave epsilon2 at 1e-3.")

  def _core(self, learning_rate):
    return optax.adafactor(
        learning_rate, min_dim_size_to_factor=self.min_dim_size_to_factor,
        decay_rate=self.decay_rate, decay_offset=self.step_offset,
        multiply_by_parameter_scale=self.multiply_by_parameter_scale,
        clipping_threshold=self.clipping_threshold, momentum=self.beta1,
        weight_decay_rate=self.weight_decay_rate, eps=self.epsilon1, factored=self.factored)


OptimizerDef = Union[AdamW, Adafactor]


def set_learning_rate(opt_state: Any, learning_rate: Array) -> Any:
  """The state of an `OptimizerDef.create()` transformation with a new learning rate."""
  hyper = dict(opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(learning_rate, jnp.asarray(hyper["learning_rate"]).dtype)
  return opt_state._replace(hyperparams=hyper)


def count_state_leaves(opt_state: Any) -> int:
  """Number of array leaves in an optimizer state (tests: frozen leaves keep none)."""
  return len(jax.tree.leaves(opt_state))
