"""Test fakes shared by the test modules: generated batches (no files, no network)."""

import jax.numpy as jnp
import numpy as np

from expert_t5x import models

TINY_VOCAB = 64


def random_batch(seed: int, batch: int = 3, inputs_len: int = 10, targets_len: int = 6,
                 vocab: int = TINY_VOCAB) -> dict:
  """A padded batch with EOS (1) ending every real sequence and ragged lengths."""
  rng = np.random.default_rng(seed)

  def rows(length):
    out = np.zeros((batch, length), np.int32)
    for i in range(batch):
      n = rng.integers(2, length + 1)
      out[i, :n - 1] = rng.integers(2, vocab, n - 1)
      out[i, n - 1] = 1
    return out

  enc, tgt = rows(inputs_len), rows(targets_len)
  return {"encoder_input_tokens": jnp.asarray(enc), "decoder_target_tokens": jnp.asarray(tgt),
          "decoder_input_tokens": models.shift_right(jnp.asarray(tgt)),
          "decoder_loss_weights": jnp.asarray((tgt > 0).astype(np.float32))}
