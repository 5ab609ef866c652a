"""Shared fixtures: one tiny T5 config and its parameters, built once per test session."""

import jax
import jax.numpy as jnp
import pytest

from expert_t5x import models
from expert_t5x import network

from fakes import TINY_VOCAB


@pytest.fixture(scope="session")
def tiny_config() -> network.T5Config:
  """2+2 layers, emb 32, 4 heads of 8, vocab 64, dropout 0.1."""
  return network.get_config("tiny", vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> models.EncoderDecoderModel:
  return models.EncoderDecoderModel(network.Transformer(tiny_config))


@pytest.fixture(scope="session")
def tiny_params(tiny_model):
  """Random base parameters; layer-norm scales perturbed so scale overrides are visible."""
  variables = tiny_model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4)})
  params = variables["params"]
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x * (1.0 + 0.1 * jnp.arange(x.shape[0]) / x.shape[0])
      if str(getattr(p[-1], "key", "")) == "scale" else x, params)
