"""Cached decoding against uncached teacher-forced forward passes and brute-force enumeration."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from expert_t5x import models
from expert_t5x import network
from fakes import random_batch

VOCAB, MAX_LEN = 5, 3


@pytest.fixture(scope="module")
def small_vocab_model():
  cfg = network.get_config("tiny", vocab_size=VOCAB)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  params = model.get_initial_variables(
      jax.random.PRNGKey(1), {"encoder_input_tokens": (1, 6), "decoder_input_tokens": (1, 3)})
  # Sharper distributions make ties impossible and beams distinct.
  params = jax.tree.map(lambda x: x * 3.0, params["params"])
  return model, params


def _uncached_log_probs(model, params, inputs, prefix_tokens):
  """log p(next | prefix) for each position, by a full forward pass with every position real."""
  return np.asarray(_forward_log_probs(model.module, params, inputs,
                                       jnp.asarray(prefix_tokens, jnp.int32)[None]), np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _forward_log_probs(module, params, inputs, tgt):
  logits = module.apply({"params": params}, inputs, models.shift_right(tgt), jnp.ones_like(tgt),
                        enable_dropout=False)
  return jax.nn.log_softmax(logits[0].astype(jnp.float32))


def test_greedy_cached_equals_uncached_argmax(tiny_model, tiny_params):
  batch = random_batch(0, batch=2, targets_len=5)
  greedy = models.EncoderDecoderModel(tiny_model.module, decode_fn="temperature_sample")
  decodes = np.asarray(greedy.predict_batch(tiny_params, batch, decoder_params={"temperature": 0}))
  for row in range(2):
    inputs = batch["encoder_input_tokens"][row:row + 1]
    seq = []
    for pos in range(5):
      logp = _uncached_log_probs(tiny_model, tiny_params, inputs, seq + [0])
      seq.append(int(np.argmax(logp[pos])))
      if seq[-1] == 1:
        break
    want = np.zeros(5, np.int32)
    want[:len(seq)] = seq
    np.testing.assert_array_equal(decodes[row], want)


def test_beam_search_finds_the_brute_force_best(small_vocab_model):
  model, params = small_vocab_model
  beam_model = models.EncoderDecoderModel(model.module, decode_fn="beam_search")
  inputs = jnp.array([[3, 2, 4, 1, 0, 0]], jnp.int32)
  # Enumerate every sequence (stopping at the first EOS) and score it exactly.
  best, best_seq = -np.inf, None
  for tokens in itertools.product(range(VOCAB), repeat=MAX_LEN):
    seq = list(tokens[:tokens.index(1) + 1]) if 1 in tokens else list(tokens)
    logp = _uncached_log_probs(model, params, inputs, seq)
    score = sum(logp[i, t] for i, t in enumerate(seq))
    if score > best + 1e-9:
      best, best_seq = score, seq
  batch = {
      "encoder_input_tokens": inputs, "decoder_input_tokens": jnp.zeros((1, MAX_LEN), jnp.int32)
  }
  top, aux = beam_model.predict_batch_with_aux(params, batch, num_decodes=VOCAB ** (MAX_LEN - 1),
                                               decoder_params={"alpha": 0.0})
  want = np.zeros(MAX_LEN, np.int32)
  want[:len(best_seq)] = best_seq
  np.testing.assert_array_equal(np.asarray(top[0]), want)
  np.testing.assert_allclose(float(aux["scores"][0]), best, rtol=1e-5)


def test_sampling_is_seeded(tiny_model, tiny_params):
  model = models.EncoderDecoderModel(tiny_model.module, decode_fn="temperature_sample")
  batch = random_batch(1, batch=2, targets_len=4)
  run = lambda seed: np.asarray(model.predict_batch(
      tiny_params, batch, jax.random.PRNGKey(seed), decoder_params={"temperature": 1.0}))
  np.testing.assert_array_equal(run(0), run(0))


def test_scanned_network_decodes_like_the_unrolled_one(tiny_model, tiny_params):
  """The key/value cache under scan_layers is stacked on the layers axis; decodes must agree."""
  batch = random_batch(2, batch=2, targets_len=5)
  decodes = []
  for scan, params in ((False, tiny_params), (True, network.stack_layers(tiny_params))):
    module = network.Transformer(tiny_model.config.replace(scan_layers=scan))
    model = models.EncoderDecoderModel(module, decode_fn="beam_search")
    decodes.append(np.asarray(model.predict_batch(params, batch, num_decodes=3)))
  np.testing.assert_array_equal(decodes[0], decodes[1])
