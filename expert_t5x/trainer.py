"""Train state and the jitted, sharded train step: one expert, or K experts stacked with vmap.

The frozen base parameters are an argument of the step, never part of the state: only the trainable
tree (an expert, or the full parameters when fine-tuning everything) has gradients and optimizer
state. The single-expert step is

    rng = fold_in(seed_key, step); lr = schedule(step, total_steps)
    grads = sum over microbatches of d loss / d params   (loss normalised over the whole batch)
    params, opt_state = optax update (clipping, optimizer)  -- only while step < total_steps

and the K-expert step is `jax.vmap` of it over a leading `expert` axis of the state, the batch
(`[K, B_k, ...]`), the seed keys and the step budgets, with the base broadcast. Each stacked expert
therefore has its own data, dropout rngs, step counter, schedule, clipping and optimizer statistics;
the base matmuls see `K * B_k` rows at once (vmap folds the expert axis into their batch), while
only the expert's own einsums carry K. An expert whose step counter reached its budget is masked:
its parameters, optimizer state and step stay unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from expert_t5x import experts as experts_lib
from expert_t5x import losses
from expert_t5x import models
from expert_t5x import optimizers
from expert_t5x import partitioning

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]


@flax.struct.dataclass
class TrainState:
  """`step` (int32, `[K]` when stacked), trainable `params`, optax `opt_state`."""
  step: Array
  params: PyTree
  opt_state: Any

  def state_dict(self) -> dict[str, Any]:
    """T5X's checkpoint tree: `{'target': params, 'state': {'step', 'param_states'}}`."""
    return {"target": self.params, "state": {"step": self.step, "param_states": self.opt_state}}

  def restore_state(self, state_dict: Mapping[str, Any]) -> "TrainState":
    return self.replace(step=state_dict["state"]["step"], params=state_dict["target"],
                        opt_state=state_dict["state"]["param_states"])


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"Batch size {x.shape[0]} is not divisible by num_microbatches="
                       f"{num_microbatches}; choose a divisor of the batch size.")
    return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
  return jax.tree.map(split, dict(batch))


def _key_path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def match_state_shardings(abstract_tree: PyTree, params_shardings: PyTree, params_shapes: PyTree,
                          replicated: NamedSharding) -> PyTree:
  """Shardings for a tree of optimizer-state leaves: a leaf whose dict-key path ends with a
  parameter's path and has that parameter's shape is sharded like it; everything else (counts,
  factored second moments, learning rates) is replicated."""
  by_path = {}
  for (path, sharding), (_, shape) in zip(
      jax.tree_util.tree_flatten_with_path(params_shardings)[0],
      jax.tree_util.tree_flatten_with_path(params_shapes)[0]):
    by_path[_key_path_names(path)] = (sharding, tuple(shape.shape))

  def pick(path, leaf):
    names = _key_path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[1] == tuple(leaf.shape):
        return hit[0]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


class Trainer:
  """Builds the sharded init and train-step programs for one model and optimizer.

  Args:
    model: the `EncoderDecoderModel`; `model.optimizer_def` (an `optimizers.AdamW`/`Adafactor`)
      and `model.expert_config` define what is trained (`None` or `FullConfig`: all parameters).
    partitioner: the mesh and logical rules.
    learning_rate_fn: a schedule `(step, total_steps) -> lr` (`optimizers.LearningRateSchedule`).
    num_microbatches: gradient accumulation; None or 0/1 means one pass over the batch.
    num_experts: K for stacked experts (leading axis on state and batch); None for one.
  """

  def __init__(self, model: models.EncoderDecoderModel,
               partitioner: partitioning.PjitPartitioner,
               learning_rate_fn: Callable[..., Array],
               num_microbatches: Optional[int] = None,
               num_experts: Optional[int] = None):
    if model.optimizer_def is None:
      raise ValueError("The model has no optimizer_def; bind EncoderDecoderModel.optimizer_def = "
                       "%OPTIMIZER (an optimizers.AdamW() or optimizers.Adafactor()).")
    self.model = model
    self.partitioner = partitioner
    self.learning_rate_fn = learning_rate_fn
    self.num_microbatches = num_microbatches if (num_microbatches or 0) > 1 else None
    self.full = model.expert_config is None or isinstance(model.expert_config,
                                                          experts_lib.FullConfig)
    if self.full and num_experts is not None:
      raise ValueError("Full fine-tuning experts are never stacked; train them one per job "
                       "(set NUM_STACKED_EXPERTS = None).")
    self.num_experts = num_experts
    self.tx = model.optimizer_def.create()
    self._step_fn = None
    self._init_fn = None

  # --------------------------------------------------------------------------- losses

  def _loss(self, model: models.EncoderDecoderModel, base: PyTree, params: PyTree, batch: Batch,
            rng: Array):
    if self.full:
      return model.loss_fn(params, batch, rng)
    return model.loss_fn(base, batch, rng, expert=params)

  def _grads(self, base: PyTree, params: PyTree, batch: Batch, rng: Array):
    """Gradients and metrics for one expert's batch, accumulated over microbatches."""
    grad_fn = jax.value_and_grad(lambda p, b, r, m: self._loss(m, base, p, b, r), has_aux=True)
    if self.num_microbatches is None:
      (loss, metrics), grads = grad_fn(params, batch, rng, self.model)
      return grads, loss, metrics
    # Normalise over the whole batch once, so the summed microbatch losses equal the batch loss.
    factor, weights = losses.get_loss_normalizing_factor_and_weights(
        self.model.loss_normalizing_factor, batch)
    if factor is not None:
      weights = weights / factor
    model = copy.copy(self.model)
    model.loss_normalizing_factor = None
    micro = _split_microbatches({**batch, "decoder_loss_weights": weights}, self.num_microbatches)

    def body(carry, inputs):
      grads_sum, loss_sum, correct, tokens, z_sum = carry
      index, mb = inputs
      (loss, m), grads = grad_fn(params, mb, jax.random.fold_in(rng, index), model)
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, loss_sum + loss, correct + m["accuracy"] * m["num_target_tokens"],
              tokens + m["num_target_tokens"], z_sum + m["z_loss"]), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, 0.0, 0.0, 0.0, 0.0)
    (grads, loss, correct, tokens, z), _ = jax.lax.scan(
        body, init, (jnp.arange(self.num_microbatches), micro))
    metrics = {"loss": loss, "z_loss": z, "cross_ent_loss": loss - z,
               "accuracy": correct / jnp.maximum(tokens, 1.0), "num_target_tokens": tokens}
    return grads, loss, metrics

  # ------------------------------------------------------------------------ one expert

  def _single_step(self, base: PyTree, state: TrainState, batch: Batch, seed_key: Array,
                   total_steps: Array) -> tuple[TrainState, dict[str, Array]]:
    rng = jax.random.fold_in(seed_key, state.step)
    lr = self.learning_rate_fn(state.step, total_steps)
    grads, loss, metrics = self._grads(base, state.params, batch, rng)
    opt_state = optimizers.set_learning_rate(state.opt_state, lr)
    updates, opt_state = self.tx.update(grads, opt_state, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state)
    active = state.step < total_steps
    new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
    metrics = dict(metrics, learning_rate=lr, grad_norm=optax.global_norm(grads),
                   active=active.astype(jnp.float32), loss=loss)
    return new, metrics

  def _single_init(self, params: PyTree) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params))

  # ------------------------------------------------------------------------- shardings

  def params_logical_specs(self, params: PyTree, base_axes: Mapping[str, tuple[str, ...]]):
    """Logical `PartitionSpec`s of the trainable tree."""
    if self.full:
      return partitioning.logical_axes_tree(params, base_axes)
    axes = experts_lib.logical_axes(params, base_axes, stacked=self.num_experts is not None)
    return jax.tree.map(lambda a: PartitionSpec(*a), axes, is_leaf=lambda x: isinstance(x, tuple))

  def state_shardings(self, abstract_params: PyTree, base_axes: Mapping[str, tuple[str, ...]]):
    """(abstract TrainState, its shardings) for a trainable tree of these shapes."""
    params_sh = self.partitioner.sharding_for(self.params_logical_specs(abstract_params, base_axes))
    abstract_state = jax.eval_shape(self._init, abstract_params)
    opt_sh = match_state_shardings(abstract_state.opt_state, params_sh, abstract_params,
                                   self.partitioner.replicated)
    shardings = TrainState(step=self.partitioner.replicated, params=params_sh, opt_state=opt_sh)
    return abstract_state, shardings

  def batch_sharding(self) -> NamedSharding:
    from expert_t5x.partitioning import DATA_AXIS  # pylint: disable=g-import-not-at-top
    if self.num_experts is None:
      return NamedSharding(self.partitioner.mesh, PartitionSpec(DATA_AXIS))
    return NamedSharding(self.partitioner.mesh, PartitionSpec(None, DATA_AXIS))

  # -------------------------------------------------------------------------- programs

  def _init(self, params: PyTree) -> TrainState:
    if self.num_experts is None:
      return self._single_init(params)
    return jax.vmap(self._single_init)(params)

  def _step(self, base, state, batch, seed_keys, total_steps):
    if self.num_experts is None:
      return self._single_step(base, state, batch, seed_keys, total_steps)
    return jax.vmap(self._single_step, in_axes=(None, 0, 0, 0, 0))(
        base, state, batch, seed_keys, total_steps)

  def compile(self, abstract_params: PyTree, base_shardings: PyTree,
              base_axes: Mapping[str, tuple[str, ...]]) -> None:
    """Builds the sharded init and step programs for trainable trees shaped `abstract_params`."""
    self.abstract_state, self.state_sharding = self.state_shardings(abstract_params, base_axes)
    rep = self.partitioner.replicated
    # Full fine-tuning trains the parameters themselves: the step takes no base (an argument it
    # ignored would still hold a second copy of the model on every device).
    base_in = None if self.full else base_shardings
    self._init_fn = self.partitioner.partition(
        self._init, in_shardings=(self.state_sharding.params,), out_shardings=self.state_sharding)
    self._step_fn = self.partitioner.partition(
        self._step,
        in_shardings=(base_in, self.state_sharding, self.batch_sharding(), rep, rep),
        out_shardings=(self.state_sharding, rep), donate_argnums=(1,))

  def init_state(self, params: PyTree) -> TrainState:
    """A fresh sharded train state around (possibly stacked) trainable `params`."""
    params = jax.device_put(params, self.state_sharding.params)
    return self._init_fn(params)

  def train_step(self, base: PyTree, state: TrainState, batch: Batch, seed_keys: Array,
                 total_steps: Array) -> tuple[TrainState, dict[str, Array]]:
    """One step; `state` is donated. `batch` must already be a global (sharded) array tree.

    `base` is ignored when fine-tuning all parameters."""
    return self._step_fn(None if self.full else base, state, batch, jnp.asarray(seed_keys),
                         jnp.asarray(total_steps, jnp.int32))


def seed_keys(seeds: Any) -> Array:
  """PRNG keys (raw uint32 `[2]` or `[K, 2]`) for integer seeds."""
  seeds = np.asarray(seeds)
  if seeds.ndim == 0:
    return jax.random.PRNGKey(int(seeds))
  return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
