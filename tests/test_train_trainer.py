"""Trainer: K stacked experts equal K separate runs, microbatching, masking, the frozen base.

No TensorFlow: batches come from `fakes.random_batch`. All tests share one tiny model and compile
the single-expert program once and the stacked program once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from expert_t5x import experts, models, network, optimizers, partitioning, trainer
from fakes import random_batch

K, STEPS, BUDGETS = 3, 4, (2, 4, 3)


@functools.lru_cache(maxsize=None)
def _setup(num_microbatches=None):
  cfg = network.get_config("tiny", vocab_size=64)  # dropout 0.1: per-expert rngs matter
  acfg = experts.AdapterConfig(reduction_factor=4)
  model = models.EncoderDecoderModel(network.Transformer(cfg),
                                     expert_config=acfg,
                                     loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
                                     optimizer_def=optimizers.AdamW(global_norm_clip_threshold=1.0))
  variables = model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (4, 10), "decoder_input_tokens": (4, 6)})
  params, axes = variables["params"], partitioning.params_logical_axes(variables)
  part = partitioning.PjitPartitioner()
  base_sh = part.sharding_for(partitioning.logical_axes_tree(params, axes))
  sched = optimizers.create_learning_rate_scheduler("constant * linear_decay", 1e-2, 0,
                                                    min_learning_rate=0.0)
  expert = experts.init_expert(acfg, cfg, params)
  return model, params, axes, part, base_sh, sched, expert


def _batches(k):
  return [random_batch(100 * k + s, batch=4) for s in range(STEPS)]


@functools.lru_cache(maxsize=None)
def _trainer(num_experts):
  """One compiled program per shape, shared by every run (budgets and seeds are arguments)."""
  model, params, axes, part, base_sh, sched, expert = _setup()
  tr = trainer.Trainer(model, part, sched, num_experts=num_experts)
  init = expert if num_experts is None else experts.stack_experts([expert] * num_experts)
  tr.compile(jax.eval_shape(lambda: init), base_sh, axes)
  return tr, init


def _train(num_experts, budgets, seeds, batches):
  params = _setup()[1]
  tr, init = _trainer(num_experts)
  state = tr.init_state(init)
  keys = trainer.seed_keys(seeds)
  for b in batches:
    state, _ = tr.train_step(params, state, b, keys, np.asarray(budgets))
  return state


@pytest.fixture(scope="module")
def separate_runs():
  return [_train(None, BUDGETS[k], k + 7, _batches(k)) for k in range(K)]


def test_stacked_experts_equal_separate_runs(separate_runs):
  # Independent reference: each expert trained alone (single-expert program, its own budget).
  stacked_batches = [jax.tree.map(lambda *xs: jnp.stack(xs), *[_batches(k)[s] for k in range(K)])
                     for s in range(STEPS)]
  stacked = _train(K, BUDGETS, [k + 7 for k in range(K)], stacked_batches)
  np.testing.assert_array_equal(np.asarray(stacked.step), BUDGETS)
  for k, alone in enumerate(separate_runs):
    assert int(alone.step) == BUDGETS[k]
    for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(stacked.params)):
      np.testing.assert_allclose(np.asarray(b)[k], np.asarray(a), rtol=1e-4, atol=1e-6)


def test_finished_expert_is_masked(separate_runs):
  # Expert 0 (budget 2) trained for 4 steps is identical to the same expert trained 2 steps.
  two = _train(None, BUDGETS[0], 7, _batches(0)[:2])
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(separate_runs[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_base_is_bitwise_unchanged():
  _, params, *_ = _setup()
  before = jax.tree.map(lambda x: np.array(x, copy=True), params)
  _train(None, 2, 0, _batches(0)[:2])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_microbatched_gradients_equal_full_batch():
  # Gradients accumulated over 2 microbatches vs one pass over the batch (dropout off, so both
  # compute the same function); the loss is normalised over the whole batch's tokens in both.
  model, params, axes, part, base_sh, sched, expert = _setup()
  model = models.EncoderDecoderModel(network.Transformer(model.config.replace(dropout_rate=0.0)),
                                     expert_config=model.expert_config,
                                     loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
                                     optimizer_def=model.optimizer_def)
  batch = random_batch(3, batch=4)
  out = []
  for m in (None, 2):
    tr = trainer.Trainer(model, part, sched, num_microbatches=m)
    grads, loss, _ = jax.jit(tr._grads)(params, expert, batch, jax.random.PRNGKey(0))  # pylint: disable=protected-access
    out.append((grads, loss))
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_full_finetuning_cannot_be_stacked():
  model, _, _, part, _, sched, _ = _setup()
  full = models.EncoderDecoderModel(model.module, expert_config=experts.FullConfig(),
                                    optimizer_def=model.optimizer_def)
  with pytest.raises(ValueError, match="never stacked"):
    trainer.Trainer(full, part, sched, num_experts=2)
