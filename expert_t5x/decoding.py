"""Autoregressive decoding with a key/value cache: temperature sampling (greedy at 0) and beam
search.

Both take `tokens_to_logits(tokens [N, 1], cache) -> (logits [N, V], cache)` over a flat batch of
N rows, so they are independent of the network. Token 0 starts decoding and pads after EOS.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]
NEG_INF = -1.0e7


def temperature_sample(cache: Cache, tokens_to_logits: TokensToLogits, batch_size: int,
                       max_decode_length: int, eos_id: int, rng: Array | None = None,
                       temperature: float = 0.0, topk: int = 0) -> tuple[Array, Array]:
  """Samples `[B, L]` sequences and their summed log-probs `[B]`; temperature 0 is greedy.

  Sequences stop at EOS (kept) and are zero-padded after it.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def step(state):
    i, token, seqs, logp, ended, cache, rng = state
    logits, cache = tokens_to_logits(token[:, None], cache)
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    rng, sub = jax.random.split(rng)
    if temperature == 0.0:
      nxt = jnp.argmax(logits, axis=-1)
    else:
      scaled = logits / temperature
      if topk:
        kth = jax.lax.top_k(scaled, topk)[0][:, -1:]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
      nxt = jax.random.categorical(sub, scaled, axis=-1)
    nxt = jnp.where(ended, 0, nxt).astype(jnp.int32)
    logp = logp + jnp.where(ended, 0.0, jnp.take_along_axis(log_probs, nxt[:, None], -1)[:, 0])
    seqs = seqs.at[:, i].set(nxt)
    ended = ended | (nxt == eos_id)
    return i + 1, nxt, seqs, logp, ended, cache, rng

  def cond(state):
    i, _, _, _, ended, _, _ = state
    return (i < max_decode_length) & ~jnp.all(ended)

  init = (jnp.array(0), jnp.zeros((batch_size,), jnp.int32),
          jnp.zeros((batch_size, max_decode_length), jnp.int32), jnp.zeros((batch_size,)),
          jnp.zeros((batch_size,), bool), cache, rng)
  _, _, seqs, logp, _, _, _ = jax.lax.while_loop(cond, step, init)
  return seqs, logp


def brevity_penalty(alpha: float, length: Array) -> Array:
  """Google NMT length penalty ((5 + length) / 6) ** alpha."""
  return jnp.power((5.0 + length.astype(jnp.float32)) / 6.0, alpha)


def _gather_beams(tree: Any, beam_indices: Array, batch_size: int, old_beams: int,
                  new_beams: int, batch_axis: int = 0) -> Any:
  """Gathers the beams `[B, new_beams]` of every leaf whose `batch_axis` is `B * old_beams` (flat).

  Leaves without that axis (e.g. the cache index) are kept.
  """
  def gather(x):
    if x.ndim <= batch_axis or x.shape[batch_axis] != batch_size * old_beams:
      return x
    x = jnp.moveaxis(x, batch_axis, 0)
    x = x.reshape((batch_size, old_beams) + x.shape[1:])
    index = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, index, axis=1)
    out = out.reshape((batch_size * new_beams,) + x.shape[2:])
    return jnp.moveaxis(out, 0, batch_axis)
  return jax.tree.map(gather, tree)


def beam_search(cache: Cache, tokens_to_logits: TokensToLogits, batch_size: int, beam_size: int,
                max_decode_length: int, eos_id: int, alpha: float = 0.6,
                cache_batch_axis: int = 0) -> tuple[Array, Array]:
  """Beam search; returns `[B, W, L]` sequences sorted by ascending score and scores `[B, W]`.

  `cache` must already be expanded to `B * W` rows (beam-major within each example) along
  `cache_batch_axis` (1 when the cache is stacked on a leading `layers` axis). Scores are
  summed log-probs divided by `brevity_penalty(alpha, length)`; sequences that reach the maximum
  length without EOS compete as finished at the end.
  """
  b, w, length = batch_size, beam_size, max_decode_length
  alive_seqs = jnp.zeros((b, w, length), jnp.int32)
  # Only beam 0 is live initially so the W identical starts do not fill the beam.
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (w - 1)), (b, 1))
  fin_seqs = jnp.zeros((b, w, length), jnp.int32)
  fin_scores = jnp.full((b, w), NEG_INF)

  def step(i, state):
    alive_seqs, alive_logp, fin_seqs, fin_scores, cache = state
    prev = jnp.where(i > 0, alive_seqs[:, :, jnp.maximum(i - 1, 0)], 0).reshape(b * w)
    logits, cache = tokens_to_logits(prev[:, None], cache)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, w, vocab)
    candidates = (alive_logp[:, :, None] + log_probs).reshape(b, w * vocab)
    top_logp, top_idx = jax.lax.top_k(candidates, 2 * w)
    beam_idx, token = top_idx // vocab, top_idx % vocab
    seqs = jnp.take_along_axis(alive_seqs, beam_idx[:, :, None], axis=1)
    seqs = seqs.at[:, :, i].set(token)
    is_eos = token == eos_id
    # New alive beams: best W candidates that did not end.
    alive_rank = jnp.where(is_eos, NEG_INF, top_logp)
    new_logp, keep = jax.lax.top_k(alive_rank, w)
    new_seqs = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(beam_idx, keep, axis=1), b, w, w,
                          cache_batch_axis)
    # Finished: candidates that emitted EOS, plus every alive beam at the last step.
    last = i == length - 1
    ended_score = jnp.where(is_eos | last, top_logp / brevity_penalty(alpha, i + 1), NEG_INF)
    ended_score = jnp.where(top_logp <= NEG_INF / 2, NEG_INF, ended_score)
    pool_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)
    pool_scores = jnp.concatenate([fin_scores, ended_score], axis=1)
    fin_scores, best = jax.lax.top_k(pool_scores, w)
    fin_seqs = jnp.take_along_axis(pool_seqs, best[:, :, None], axis=1)
    return new_seqs, new_logp, fin_seqs, fin_scores, cache

  state = (alive_seqs, alive_logp, fin_seqs, fin_scores, cache)
  _, _, fin_seqs, fin_scores, _ = jax.lax.fori_loop(0, length, step, state)
  order = jnp.argsort(fin_scores, axis=-1)  # Ascending, as T5X: the best beam is last.
  return (jnp.take_along_axis(fin_seqs, order[:, :, None], axis=1),
          jnp.take_along_axis(fin_scores, order, axis=1))
