"""Model API: losses, scoring and rank-classification scoring against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from expert_t5x import losses
from expert_t5x import models
from fakes import random_batch


def _logits(model, params, batch):
  return np.asarray(model._compute_logits(params, batch), np.float64)


def test_score_batch_equals_numpy_log_softmax_gather(tiny_model, tiny_params):
  batch = random_batch(0)
  logits = _logits(tiny_model, tiny_params, batch)
  # Independent: float64 numpy log-softmax, gather, mask padding, sum (EOS included).
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tgt = np.asarray(batch["decoder_target_tokens"])
  want = (np.take_along_axis(logp, tgt[..., None], -1)[..., 0] * (tgt > 0)).sum(-1)
  got = np.asarray(tiny_model.score_batch(tiny_params, batch))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  mean = np.asarray(tiny_model.score_batch(tiny_params, batch, normalize="mean"))
  np.testing.assert_allclose(mean, want / (tgt > 0).sum(-1), rtol=1e-5)
  limited = np.asarray(tiny_model.score_batch(tiny_params, batch, logit_vocab_limit=60))
  sub = logits[..., :60]
  logp60 = sub - np.log(np.exp(sub).sum(-1, keepdims=True))
  want60 = (np.take_along_axis(logp60,
                               np.minimum(tgt, 59)[..., None], -1)[..., 0] * (tgt > 0)).sum(-1)
  np.testing.assert_allclose(limited, want60, rtol=1e-5)


def test_score_choices_equals_scoring_each_pair(tiny_model, tiny_params):
  rng = np.random.default_rng(1)
  b, k, li, lt = 3, 4, 9, 5
  inputs = np.asarray(random_batch(2, batch=b, inputs_len=li)["encoder_input_tokens"])
  choices = np.zeros((b, k, lt), np.int32)
  for i in range(b):
    for j in range(k - (i == 1)):  # Input 1 has only 3 choices.
      n = rng.integers(1, lt)
      choices[i, j, :n] = rng.integers(2, 64, n)
      choices[i, j, n] = 1
  got = np.asarray(jax.jit(tiny_model.score_choices)(tiny_params, jnp.asarray(inputs),
                                                      jnp.asarray(choices)))
  score_pair = jax.jit(tiny_model.score_batch)
  assert got.shape == (b, k) and got[1, 3] == -np.inf
  for i in range(b):
    for j in range(k - (i == 1)):
      tgt = jnp.asarray(choices[i, j][None])
      pair = {"encoder_input_tokens": jnp.asarray(inputs[i][None]), "decoder_target_tokens": tgt,
              "decoder_input_tokens": models.shift_right(tgt)}
      want = float(score_pair(tiny_params, pair)[0])
      np.testing.assert_allclose(got[i, j], want, rtol=1e-5)


def test_cross_entropy_custom_gradient_matches_autodiff():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 3, 7)), jnp.float32)
  targets = jax.nn.one_hot(jnp.asarray(rng.integers(0, 7, (2, 3))), 7) * 0.9 + 0.1 / 7
  z = 1e-2

  def plain(logits):  # The formula written out, differentiated by JAX itself.
    log_z = jax.nn.logsumexp(logits, -1)
    return jnp.sum(-jnp.sum(targets * (logits - log_z[..., None]), -1) + z * log_z ** 2)

  custom = lambda logits: jnp.sum(losses.cross_entropy_with_logits(logits, targets, z)[0])
  np.testing.assert_allclose(custom(logits), plain(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(custom)(logits), jax.grad(plain)(logits), rtol=1e-5,
                             atol=1e-7)


def test_label_smoothing_perfect_prediction_has_zero_loss():
  # Hand-computed: with smoothing 0.1 over V=4, a prediction equal to the smoothed target has
  # cross entropy equal to the target's entropy, which T5X subtracts.
  soft = np.array([0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3])
  logits = jnp.asarray(np.log(soft)[None, None], jnp.float32)
  loss, _, _ = losses.compute_weighted_cross_entropy(logits, jnp.array([[0]]), label_smoothing=0.1)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_loss_normalizing_factors():
  tgt = jnp.array([[5, 1, 0, 0], [7, 8, 9, 1]])
  batch = {"decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(jnp.float32)}
  factor, _ = losses.get_loss_normalizing_factor_and_weights("NUM_REAL_TARGET_TOKENS", batch)
  assert float(factor) == 6.0
  factor, _ = losses.get_loss_normalizing_factor_and_weights("num_total_target_tokens", batch)
  assert float(factor) == 8.0
  factor, w = losses.get_loss_normalizing_factor_and_weights("AVERAGE_PER_SEQUENCE", batch)
  # Each sequence's tokens weigh 1/len; two sequences.
  np.testing.assert_allclose(w, [[0.5, 0.5, 0, 0], [0.25] * 4])
  assert float(factor) == 2.0
  with pytest.raises(ValueError, match="loss_normalizing_factor 'tokens' is not one of"):
    losses.get_loss_normalizing_factor_and_weights("tokens", batch)


def test_loss_fn_mean_over_real_tokens_equals_score(tiny_params, tiny_config):
  from expert_t5x import network
  model = models.EncoderDecoderModel(network.Transformer(tiny_config),
                                     loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
  batch = random_batch(3)
  loss, metrics = model.loss_fn(tiny_params, batch, None)
  scores = model.score_batch(tiny_params, batch)
  ntok = float(jnp.sum(batch["decoder_target_tokens"] > 0))
  np.testing.assert_allclose(loss, -float(jnp.sum(scores)) / ntok, rtol=1e-5)
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_integer_label_cross_entropy_equals_soft_target_version():
  """The gather-based path (no label smoothing) equals the one-hot formula, values and grads."""
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.standard_normal((2, 3, 11)) * 3, jnp.float32)
  ids = jnp.asarray(rng.integers(0, 11, (2, 3)))
  for z in (0.0, 1e-3):
    soft = lambda x: jnp.sum(losses.cross_entropy_with_logits(x, jax.nn.one_hot(ids, 11), z)[0])
    hard = lambda x: jnp.sum(losses.cross_entropy_with_integer_labels(x, ids, z)[0])
    np.testing.assert_allclose(hard(logits), soft(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(hard)(logits), jax.grad(soft)(logits), rtol=1e-5,
                               atol=1e-7)
