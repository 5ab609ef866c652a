"""Expert parameterizations: identity at zero init, gradients, folding, stacking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from expert_t5x import experts
from expert_t5x import models
from expert_t5x import network
from fakes import random_batch

LORA_ALL = experts.LoraConfig(rank=4, alpha=8.0, targets=("attention_qv", "mlp", "cross_attention"))


def _scores(model, params, batch, expert=None):
  # Jitted: eager op-by-op dispatch is far slower than one compile of this tiny model.
  return np.asarray(jax.jit(model.score_batch)(params, batch, expert=expert))


def _randomized(tree, seed):
  """Non-zero values everywhere (fresh LoRA B and full deltas are zero)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x))
                                      .astype(np.float32) for x in leaves])


def test_zero_init_adapter_reproduces_base_bitwise(tiny_config, tiny_params, tiny_model):
  cfg = experts.AdapterConfig(reduction_factor=4, zero_init_up=True)
  expert = experts.init_expert(cfg, tiny_config, tiny_params)
  model = models.EncoderDecoderModel(network.Transformer(tiny_config), expert_config=cfg)
  batch = random_batch(0)
  np.testing.assert_array_equal(_scores(model, tiny_params, batch, expert),
                                _scores(tiny_model, tiny_params, batch))


def test_adapter_shapes_and_count_match_the_paper_formula(tiny_config, tiny_params):
  cfg = experts.AdapterConfig(reduction_factor=4)
  flat = traverse_util.flatten_dict(experts.init_expert(cfg, tiny_config, tiny_params), sep="/")
  assert flat["encoder/layers_0/attention_adapter/wi/kernel"].shape == (32, 8)
  assert flat["decoder/layers_1/self_attention_adapter/wo/bias"].shape == (32,)
  assert not any("encoder_decoder_attention_adapter" in k for k in flat)
  # elm_method.md §3: 4 adapters per layer pair x (d*d/r + d/r + d/r*d + d) plus every LN scale.
  adapters = 2 * 2 * 2 * (32 * 8 + 8 + 8 * 32 + 32)
  norms = (2 * 2 + 1 + 2 * 3 + 1) * 32
  assert experts.count_parameters(flat) == adapters + norms
  # PyTorch's default Linear init bounds (U(+-1/sqrt(fan_in))), not zero.
  wo = flat["encoder/layers_0/mlp_adapter/wo/kernel"]
  assert 0 < np.abs(wo).max() <= 1 / np.sqrt(8)


@pytest.mark.parametrize("cfg", [experts.AdapterConfig(reduction_factor=4), LORA_ALL,
                                 experts.FullConfig()], ids=lambda c: c.kind)
def test_gradients_reach_every_expert_leaf_and_only_them(cfg, tiny_config, tiny_params):
  expert = _randomized(experts.init_expert(cfg, tiny_config, tiny_params), 1)
  model = models.EncoderDecoderModel(network.Transformer(tiny_config), expert_config=cfg)
  batch = random_batch(2)
  grads_e, grads_p = jax.jit(jax.grad(
      lambda e, p: model.loss_fn(jax.lax.stop_gradient(p), batch, None, expert=e)[0],
      argnums=(0, 1)))(expert, tiny_params)
  for path, g in traverse_util.flatten_dict(grads_e, sep="/").items():
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path
  assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(grads_p))


def test_folded_lora_equals_unfolded(tiny_config, tiny_params):
  expert = _randomized(experts.init_expert(LORA_ALL, tiny_config, tiny_params), 3)
  model = models.EncoderDecoderModel(network.Transformer(tiny_config), expert_config=LORA_ALL)
  base_model = models.EncoderDecoderModel(network.Transformer(tiny_config))
  batch = random_batch(4)
  folded = experts.fold_expert(tiny_params, expert, LORA_ALL)
  np.testing.assert_allclose(_scores(base_model, folded, batch),
                             _scores(model, tiny_params, batch, expert), rtol=1e-5)


def test_folded_full_delta_equals_unfolded(tiny_config, tiny_params):
  cfg = experts.FullConfig()
  delta = _randomized(experts.init_expert(cfg, tiny_config, tiny_params), 5)
  model = models.EncoderDecoderModel(network.Transformer(tiny_config), expert_config=cfg)
  base_model = models.EncoderDecoderModel(network.Transformer(tiny_config))
  batch = random_batch(6)
  np.testing.assert_allclose(
      _scores(base_model, experts.fold_expert(tiny_params, delta, cfg), batch),
      _scores(model, tiny_params, batch, delta), rtol=1e-5)


def test_adapters_refuse_to_fold(tiny_config, tiny_params):
  cfg = experts.AdapterConfig(reduction_factor=4)
  with pytest.raises(ValueError, match="cannot be folded"):
    experts.fold_expert(tiny_params, experts.init_expert(cfg, tiny_config, tiny_params), cfg)


@pytest.mark.parametrize("cfg", [experts.AdapterConfig(reduction_factor=4), LORA_ALL],
                         ids=lambda c: c.kind)
def test_stacked_expert_e_equals_expert_e_alone(cfg, tiny_config, tiny_params):
  singles = [_randomized(experts.init_expert(cfg, tiny_config, tiny_params), 10 + i)
             for i in range(3)]
  stacked = experts.stack_experts(singles)
  model = models.EncoderDecoderModel(network.Transformer(tiny_config), expert_config=cfg)
  batch = random_batch(7, batch=4)
  index = jnp.array([2, 0, 1, 2], jnp.int32)
  got = _scores(model, tiny_params, dict(batch, expert_index=index), stacked)
  for row, e in enumerate(index.tolist()):
    one = {k: v[row:row + 1] for k, v in batch.items()}
    want = _scores(model, tiny_params, one, singles[e])
    np.testing.assert_allclose(got[row], want[0], rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(jax.tree.leaves(experts.unstack_expert(stacked, 1))[0]),
      np.asarray(jax.tree.leaves(singles[1])[0]))


def test_lora_targets_that_match_nothing_are_refused(tiny_config, tiny_params):
  with pytest.raises(ValueError, match="match no kernel"):
    experts.init_expert(experts.LoraConfig(targets=("nowhere",)), tiny_config, tiny_params)


def test_config_json_round_trip():
  for cfg in (experts.AdapterConfig(reduction_factor=16, zero_init_up=True), LORA_ALL,
              experts.FullConfig(init_seed=3)):
    assert experts.config_from_json(experts.config_to_json(cfg)) == cfg
  with pytest.raises(ValueError, match="kind must be one of"):
    experts.config_from_json({"kind": "prefix"})
