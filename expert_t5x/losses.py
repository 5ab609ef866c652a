"""Token cross-entropy with z-loss and label smoothing, and loss normalizing factors (T5X
semantics).

The loss is a *sum* over target tokens, optionally divided by a loss normalizing factor: a number,
or one of `NUM_REAL_TARGET_TOKENS` (the mean over real target tokens, as HF / the paper's code),
`NUM_TOTAL_TARGET_TOKENS`, `AVERAGE_PER_SEQUENCE`.
"""

from __future__ import annotations

import enum
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array


class SpecialLossNormalizingFactor(enum.Enum):
  NUM_REAL_TARGET_TOKENS = 1
  NUM_TOTAL_TARGET_TOKENS = 2
  AVERAGE_PER_SEQUENCE = 3


LossNormalizingFactor = Union[None, float, int, str, SpecialLossNormalizingFactor]


@jax.custom_vjp
def cross_entropy_with_logits(logits: Array, targets: Array, z_loss: float) -> tuple[Array, Array]:
  """Per-token cross entropy of `[..., V]` logits against soft targets, plus z_loss * log(Z)^2.

  Returns (loss including the z-loss term, z-loss term), each `[...]`. The custom gradient avoids
  materialising a second `[..., V]` softmax in the backward pass.
  """
  logits_sum = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  log_softmax = logits - logits_sum
  loss = -jnp.sum(targets * log_softmax, axis=-1)
  log_z = jnp.squeeze(logits_sum, axis=-1)
  total_z_loss = z_loss * jnp.square(log_z)
  return loss + total_z_loss, total_z_loss


def _cross_entropy_fwd(logits, targets, z_loss):
  max_logit = jnp.max(logits, axis=-1, keepdims=True)
  shifted = logits - max_logit
  exp_shifted = jnp.exp(shifted)
  sum_exp = jnp.sum(exp_shifted, axis=-1, keepdims=True)
  log_softmax = shifted - jnp.log(sum_exp)
  loss = -jnp.sum(targets * log_softmax, axis=-1)
  log_z = jnp.squeeze(jnp.log(sum_exp) + max_logit, axis=-1)
  total_z_loss = z_loss * jnp.square(log_z)
  residuals = (logits, targets, z_loss, exp_shifted, sum_exp, log_softmax, log_z)
  return (loss + total_z_loss, total_z_loss), residuals


def _cross_entropy_bwd(residuals, grads):
  g = grads[0]  # The z-loss output is reported for metrics only; its cotangent is ignored.
  logits, targets, z_loss, exp_shifted, sum_exp, log_softmax, log_z = residuals
  softmax = exp_shifted / sum_exp
  dlogits = (softmax - targets + 2.0 * z_loss * log_z[..., None] * softmax) * g[..., None]
  dtargets = -log_softmax * g[..., None]
  return (jnp.asarray(dlogits, logits.dtype), jnp.asarray(dtargets, targets.dtype),
          jnp.zeros_like(jnp.asarray(z_loss)))


cross_entropy_with_logits.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@jax.custom_vjp
def cross_entropy_with_integer_labels(logits: Array, targets: Array,
                                      z_loss: float) -> tuple[Array, Array]:
  """`cross_entropy_with_logits` for one-hot targets given as ids `[...]`, without building the
  `[..., V]` one-hot: the forward gathers the target logit and the backward's one-hot is a fused
  comparison. Returns (loss including the z-loss term, z-loss term)."""
  return _integer_cross_entropy_fwd(logits, targets, z_loss)[0]


def _integer_cross_entropy_fwd(logits, targets, z_loss):
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  total_z_loss = z_loss * jnp.square(log_z)
  return (log_z - picked + total_z_loss, total_z_loss), (logits, targets, z_loss, log_z)


def _integer_cross_entropy_bwd(residuals, grads):
  logits, targets, z_loss, log_z = residuals
  g = grads[0]
  softmax = jnp.exp(logits - log_z[..., None])
  is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
  dlogits = (softmax * (1.0 + 2.0 * z_loss * log_z[..., None]) - is_target) * g[..., None]
  return (jnp.asarray(dlogits, logits.dtype), None, jnp.zeros_like(jnp.asarray(z_loss)))


cross_entropy_with_integer_labels.defvjp(_integer_cross_entropy_fwd, _integer_cross_entropy_bwd)


def compute_weighted_cross_entropy(
    logits: Array, targets: Array, weights: Optional[Array] = None, label_smoothing: float = 0.0,
    z_loss: float = 0.0, loss_normalizing_factor: Optional[float | Array] = None
) -> tuple[Array, Array, Array]:
  """Summed (weighted, normalized) cross entropy.

  Args:
    logits: `[B, L, V]` float.
    targets: `[B, L]` int token ids.
    weights: `[B, L]` loss weights (0 on padding) or None.
    label_smoothing: mass spread uniformly over the other V-1 tokens; the entropy of the smoothed
      target is subtracted so a perfect prediction has loss 0.
    z_loss: coefficient of log(Z)^2.
    loss_normalizing_factor: divides the sum.

  Returns:
    (total loss, total z-loss, sum of weights), scalars.
  """
  if label_smoothing == 0.0:
    loss, z = cross_entropy_with_integer_labels(logits, targets, z_loss)
  else:
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    normalizing_constant = -(confidence * jnp.log(confidence) +
                             (vocab - 1) * low * jnp.log(low + 1e-20))
    soft = jax.nn.one_hot(targets, vocab, dtype=logits.dtype) * (confidence - low) + low
    loss, z = cross_entropy_with_logits(logits, soft, z_loss)
    loss = loss - normalizing_constant
  if weights is None:
    weights = jnp.ones(targets.shape, logits.dtype)
  loss, z = loss * weights, z * weights
  if loss_normalizing_factor is not None:
    loss, z = loss / loss_normalizing_factor, z / loss_normalizing_factor
  return jnp.sum(loss), jnp.sum(z), jnp.sum(weights)


def _parse_factor(factor: LossNormalizingFactor) -> LossNormalizingFactor:
  if isinstance(factor, str):
    try:
      return SpecialLossNormalizingFactor[factor.upper()]
    except KeyError:
      raise ValueError(
          f"loss_normalizing_factor {factor!r} is not one of "
          f"{[f.name for f in SpecialLossNormalizingFactor]} or a number.") from None
  return factor


def get_loss_normalizing_factor_and_weights(
    loss_normalizing_factor: LossNormalizingFactor, batch: Mapping[str, Array]
) -> tuple[Optional[float | Array], Optional[Array]]:
  """Resolves a (possibly special) normalizing factor against a batch, as T5X does.

  Returns the number to divide the summed loss by (or None) and the per-token loss weights.
  """
  factor = _parse_factor(loss_normalizing_factor)
  weights = batch.get("decoder_loss_weights")
  targets = batch["decoder_target_tokens"]
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  if not isinstance(factor, SpecialLossNormalizingFactor):
    return factor, weights
  if factor is SpecialLossNormalizingFactor.NUM_REAL_TARGET_TOKENS:
    return jnp.maximum(jnp.sum(weights), 1.0), weights
  if factor is SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
    return float(targets.size), weights
  # AVERAGE_PER_SEQUENCE: each (segment of a) sequence contributes its mean token loss equally.
  segments = batch.get("decoder_segment_ids")
  if segments is None:
    segments = (targets > 0).astype(jnp.int32)
  same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
  tokens_in_segment = jnp.sum(same * weights[:, None, :], axis=-1)
  per_seq = jnp.where(tokens_in_segment > 0, weights / jnp.maximum(tokens_in_segment, 1.0), 0.0)
  num_segments = jnp.maximum(jnp.sum(per_seq), 1.0)
  return num_segments, per_seq
