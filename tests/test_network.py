"""Network and expert-hook properties that need no reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from expert_t5x import experts
from expert_t5x import network
from fakes import random_batch


def test_param_tree_matches_t5x_names_and_shapes(tiny_config, tiny_params):
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(tiny_params, sep="/").items()}
  e, h, d, f, v = 32, 4, 8, 64, tiny_config.vocab_size
  # Names and shapes from T5X's t5x/examples/t5/network.py (T5 1.1, gated GELU, untied logits).
  expected = {
      "token_embedder/embedding": (v, e),
      "encoder/relpos_bias/rel_embedding": (h, 32),
      "encoder/layers_1/attention/query/kernel": (e, h * d),
      "encoder/layers_1/attention/out/kernel": (h * d, e),
      "encoder/layers_0/mlp/wi_0/kernel": (e, f),
      "encoder/layers_0/mlp/wo/kernel": (f, e),
      "encoder/encoder_norm/scale": (e,),
      "decoder/layers_1/encoder_decoder_attention/key/kernel": (e, h * d),
      "decoder/layers_0/pre_cross_attention_layer_norm/scale": (e,),
      "decoder/decoder_norm/scale": (e,),
      "decoder/logits_dense/kernel": (e, v),
  }
  for name, shape in expected.items():
    assert flat[name] == shape, name
  # Embedding, 2 relpos tables, 9 tensors per encoder block, 14 per decoder block, 2 final norms,
  # logits.
  assert len(flat) == 1 + 2 + 9 * 2 + 14 * 2 + 2 + 1


def test_relative_position_buckets_hand_computed():
  # Hand-computed from the Mesh TensorFlow formula: bidirectional, 32 buckets, max distance 128.
  rel = np.array([[-200, -20, -1, 0, 1, 7, 8, 20, 127, 500]])
  got = network.RelativePositionBiases._bucket(rel, True, 32, 128)
  # n = -rel; keys after the query (n < 0) use the upper 16; |n| < 8 exact; else
  # 8 + int(log(|n|/8)/log(16)*8), capped at 15: e.g. 20 -> 8 + int(2.64) = 10.
  assert got.tolist() == [[15, 10, 1, 0, 16 + 1, 16 + 7, 16 + 8, 16 + 10, 16 + 15, 16 + 15]]
  causal = network.RelativePositionBiases._bucket(rel, False, 32, 128)
  # Causal: n = max(-rel, 0); < 16 exact; else 16 + int(log(n/16)/log(8)*16), capped at 31.
  # e.g. 20 -> 16 + int(log(20/16)/log(8)*16) = 16 + int(1.72) = 17; future keys -> 0.
  assert causal.tolist() == [[31, 17, 1, 0, 0, 0, 0, 0, 0, 0]]


def test_dropout_modes_differ_and_are_deterministic(tiny_config, tiny_params):
  batch = random_batch(0)
  outs = {}
  for mode in network.DROPOUT_MODES:
    module = network.Transformer(tiny_config.replace(dropout_mode=mode))
    run = jax.jit(lambda params: module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], enable_dropout=True,
        rngs={"dropout": jax.random.PRNGKey(3)}))
    outs[mode] = run(tiny_params)
    np.testing.assert_array_equal(outs[mode], run(tiny_params))
  assert not np.allclose(outs["length_broadcast"], outs["elementwise"])


def test_bad_config_names_are_clear():
  with pytest.raises(ValueError, match="dropout_mode must be one of"):
    network.get_config("tiny", dropout_mode="sometimes")
  with pytest.raises(ValueError, match="Unknown T5 config 'huge'"):
    network.get_config("huge")


@pytest.mark.parametrize("policy", ["full", "minimal"])
def test_remat_gives_the_same_gradients(tiny_config, tiny_params, policy):
  batch = random_batch(1)

  def loss(params, cfg):
    logits = network.Transformer(cfg).apply({"params": params},
                                            batch["encoder_input_tokens"],
                                            batch["decoder_input_tokens"],
                                            batch["decoder_target_tokens"],
                                            enable_dropout=True,
                                            rngs={"dropout": jax.random.PRNGKey(0)})
    return jnp.sum(jax.nn.log_softmax(logits)[..., 2])

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g0 = grad(tiny_params, tiny_config)
  g1 = grad(tiny_params, tiny_config.replace(remat_policy=policy))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_scanned_layers_equal_unrolled_with_experts(tiny_config, tiny_params):
  """scan_layers computes the same function on the stacked layout (forward, dropout, adapters)."""
  from expert_t5x import models
  cfg = experts.AdapterConfig(reduction_factor=4)
  expert = experts.init_expert(cfg, tiny_config, tiny_params)
  batch = random_batch(5)
  unrolled = models.EncoderDecoderModel(network.Transformer(tiny_config), expert_config=cfg)
  scanned = models.EncoderDecoderModel(
      network.Transformer(tiny_config.replace(scan_layers=True)), expert_config=cfg)
  stacked_params = network.stack_layers(tiny_params)
  assert stacked_params["encoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (2, 64, 32)
  jax.tree.map(np.testing.assert_array_equal, network.unstack_layers(stacked_params), tiny_params)
  np.testing.assert_allclose(scanned.score_batch(stacked_params, batch, expert=expert),
                             unrolled.score_batch(tiny_params, batch, expert=expert), rtol=1e-5)
  # Variables initialised by the scanned network have the stacked layout and 'layers' axis names.
  variables = scanned.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 3)})
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(stacked_params)
  from expert_t5x import partitioning
  axes = partitioning.params_logical_axes(variables)
  assert axes["encoder/layers/mlp/wo/kernel"] == ("layers", "mlp", "embed")
