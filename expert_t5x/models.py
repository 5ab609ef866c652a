"""`EncoderDecoderModel`: loss, scoring, rank-classification scoring and decoding (T5X semantics).

`params` is always the frozen base tree. Every method takes an optional `expert` (the pytree of
`self.expert_config`'s kind, see `expert_t5x.experts`); with a stacked expert,
`batch['expert_index']` (`[B]` int32) selects one expert per example. Gradients are taken with
respect to `expert` (or to `params` for full fine-tuning without an expert).

Batches use T5X's feature names: `encoder_input_tokens [B, Li]`, `decoder_input_tokens [B, Lt]`,
`decoder_target_tokens [B, Lt]`, `decoder_loss_weights [B, Lt]`; 0 is padding, 1 is EOS.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from expert_t5x import decoding
from expert_t5x import experts as experts_lib
from expert_t5x import losses
from expert_t5x import network

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]
SCORE_NORMALIZATIONS = ("sum", "mean")
# Storage dtypes of the frozen base. 'bfloat16' halves the base's memory; activations keep
# `T5Config.dtype` (the weights are cast up to it in each product), so it rounds the weights only.
BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def shift_right(targets: Array, bos_id: int = 0) -> Array:
  """Decoder inputs for teacher forcing: targets shifted right by one, starting with `bos_id`."""
  shifted = jnp.pad(targets, [(0, 0)] * (targets.ndim - 1) + [(1, 0)], constant_values=bos_id)
  return shifted[..., :-1]


def token_log_probs(logits: Array,
                    targets: Array,
                    logit_vocab_limit: Optional[int] = None) -> Array:
  """`[..., L]` log p(target) from `[..., L, V]` logits, normalised over the first
  `logit_vocab_limit` logits when set (the paper's code scored over 32100 of T5's 32128)."""
  logits = logits.astype(jnp.float32)
  if logit_vocab_limit is not None:
    logits = logits[..., :logit_vocab_limit]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - log_z


class EncoderDecoderModel:
  """T5X's `EncoderDecoderModel` contract over `network.Transformer`, with expert hooks."""

  def __init__(self, module: network.Transformer, input_vocabulary: Any = None,
               output_vocabulary: Any = None, optimizer_def: Any = None,
               decode_fn: str = "beam_search", label_smoothing: float = 0.0, z_loss: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizingFactor = None,
               expert_config: Optional[experts_lib.ExpertConfig] = None,
               base_dtype: str = "float32"):
    if base_dtype not in BASE_DTYPES:
      raise ValueError(f"EncoderDecoderModel.base_dtype must be one of {sorted(BASE_DTYPES)}; got "
                       f"{base_dtype!r}.")
    if base_dtype != "float32" and (expert_config is None or
                                    isinstance(expert_config, experts_lib.FullConfig)):
      raise ValueError(f"EncoderDecoderModel.base_dtype={base_dtype!r} needs a frozen base, but "
                       "full fine-tuning trains it; keep base_dtype='float32' for full experts.")
    if decode_fn not in ("beam_search", "temperature_sample"):
      raise ValueError(
          f"decode_fn must be 'beam_search' or 'temperature_sample'; got {decode_fn!r}.")
    if isinstance(expert_config, experts_lib.LoraConfig) and expert_config.dropout_rate:
      module = network.Transformer(
          module.config.replace(lora_dropout_rate=expert_config.dropout_rate))
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.optimizer_def = optimizer_def
    self.decode_fn = decode_fn
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.loss_normalizing_factor = loss_normalizing_factor
    self.expert_config = expert_config
    self.base_dtype = base_dtype

  @property
  def base_dtype_jnp(self) -> Any:
    return BASE_DTYPES[self.base_dtype]

  def cast_base(self, params: PyTree) -> PyTree:
    """The frozen base in `base_dtype`. Every forward applies it, so a float32 base passed in
    computes what a stored bfloat16 one does; storing the cast tree saves the memory."""
    if self.base_dtype == "float32":
      return params
    dtype = self.base_dtype_jnp
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        params)

  @property
  def config(self) -> network.T5Config:
    return self.module.config

  # ------------------------------------------------------------------------------ init

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None) -> PyTree:
    """Initial `{'params', 'params_axes'}` variables for the given feature shapes."""
    input_types = input_types or {}
    enc_shape = input_shapes["encoder_input_tokens"]
    dec_shape = input_shapes["decoder_input_tokens"]
    enc = jnp.ones(enc_shape, input_types.get("encoder_input_tokens", jnp.int32))
    dec = jnp.ones(dec_shape, input_types.get("decoder_input_tokens", jnp.int32))
    return self.module.init(rng, enc, dec, dec, enable_dropout=False)

  # ----------------------------------------------------------------------------- forward

  def _apply(self, params: PyTree, expert: Optional[PyTree], *args: Any, method: Any = None,
             dropout_rng: Optional[Array] = None, **kwargs: Any) -> Any:
    cfg = self.expert_config
    expert = self._expert_layout(expert)
    variables = {"params": self.cast_base(experts_lib.effective_params(params, expert, cfg))}
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(variables, *args, method=method, rngs=rngs,
                             expert=experts_lib.network_tree(expert, cfg), **kwargs)

  def _expert_layout(self, expert: Optional[PyTree]) -> Optional[PyTree]:
    """Experts are stored per block; a scanned network takes them stacked on a `layers` axis."""
    return network.stack_layers(expert) if self.config.scan_layers else expert

  def _compute_logits(self, params: PyTree, batch: Batch, dropout_rng: Optional[Array] = None,
                      expert: Optional[PyTree] = None) -> Array:
    return self._apply(
        params, expert, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], batch.get("encoder_segment_ids"),
        batch.get("decoder_segment_ids"), dropout_rng=dropout_rng,
        enable_dropout=dropout_rng is not None, expert_index=batch.get("expert_index"))

  def loss_fn(self, params: PyTree, batch: Batch, dropout_rng: Optional[Array],
              expert: Optional[PyTree] = None) -> tuple[Array, dict[str, Array]]:
    """Summed token cross-entropy (with z-loss, label smoothing and the normalizing factor)."""
    logits = self._compute_logits(params, batch, dropout_rng, expert)
    factor, weights = losses.get_loss_normalizing_factor_and_weights(
        self.loss_normalizing_factor, batch)
    targets = batch["decoder_target_tokens"]
    loss, z_loss, _ = losses.compute_weighted_cross_entropy(
        logits, targets, weights, self.label_smoothing, self.z_loss, factor)
    real = (targets > 0).astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * real
    metrics = {
        "loss": loss,
        "z_loss": z_loss,
        "cross_ent_loss": loss - z_loss,
        "accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(real), 1.0),
        "num_target_tokens": jnp.sum(real),
    }
    return loss, metrics

  def score_batch(self, params: PyTree, batch: Batch, expert: Optional[PyTree] = None,
                  return_intermediates: bool = False, normalize: str = "sum",
                  logit_vocab_limit: Optional[int] = None) -> Array:
    """Sequence scores `[B]`: sum of natural-log target log-probs including EOS, padding masked.

    `normalize='mean'` divides by the number of target tokens. With `return_intermediates`,
    returns `(scores, {'token_scores': [B, Lt]})`.
    """
    _check_normalize(normalize)
    logits = self._compute_logits(params, batch, None, expert)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0) if weights is None else weights
    token_scores = token_log_probs(logits, targets, logit_vocab_limit) * weights
    scores = jnp.sum(token_scores, axis=-1)
    if normalize == "mean":
      scores = scores / jnp.maximum(jnp.sum(weights, axis=-1), 1)
    if return_intermediates:
      return scores, {"token_scores": token_scores}
    return scores

  def score_choices(self, params: PyTree, inputs: Array, choices: Array,
                    expert: Optional[PyTree] = None, expert_index: Optional[Array] = None,
                    normalize: str = "sum", logit_vocab_limit: Optional[int] = None) -> Array:
    """Rank-classification scores: each input encoded once, all its choices in one decoder pass.

    Args:
      inputs: `[B, Li]` int32 encoder tokens (0-padded, EOS-terminated).
      choices: `[B, K, Lt]` int32 target tokens of each answer choice (0-padded, EOS-terminated);
        an all-zero row is an absent choice (inputs may have different numbers of choices).
      expert: optional expert (stacked when `expert_index` is given).
      expert_index: `[B]` int32 expert per input.
      normalize: 'sum' (the paper) or 'mean' over the choice's target tokens.
      logit_vocab_limit: normalise log-probs over the first N logits only.

    Returns:
      `[B, K]` float32 scores; absent choices score -inf.
    """
    _check_normalize(normalize)
    b, k, lt = choices.shape
    encoded = self._apply(params, expert, inputs, method=network.Transformer.encode,
                          enable_dropout=False, expert_index=expert_index)
    targets = choices.reshape(b * k, lt)  # [B*K, Lt]
    row_expert_index = None if expert_index is None else jnp.repeat(expert_index, k)
    logits = self._apply(params, expert, encoded, inputs, shift_right(targets), targets,
                         method=network.Transformer.decode, enable_dropout=False, num_choices=k,
                         expert_index=row_expert_index)  # [B*K, Lt, V]
    weights = (targets > 0).astype(jnp.float32)
    scores = jnp.sum(token_log_probs(logits, targets, logit_vocab_limit) * weights, -1)
    if normalize == "mean":
      scores = scores / jnp.maximum(jnp.sum(weights, -1), 1.0)
    scores = scores.reshape(b, k)
    present = jnp.any(choices > 0, axis=-1)
    return jnp.where(present, scores, -jnp.inf)

  # ---------------------------------------------------------------------------- decoding

  def predict_batch_with_aux(self, params: PyTree, batch: Batch, rng: Optional[Array] = None,
                             decoder_params: Optional[Mapping[str, Any]] = None,
                             num_decodes: int = 1, expert: Optional[PyTree] = None,
                             eos_id: int = 1) -> tuple[Array, dict[str, Array]]:
    """Decodes `[B, Lt]` tokens (Lt = `decoder_input_tokens`'s length) with a key/value cache.

    `self.decode_fn` is 'beam_search' (`num_decodes` beams, `decoder_params['alpha']`) or
    'temperature_sample' (`decoder_params` 'temperature' (0 = greedy) and 'topk').
    """
    decoder_params = dict(decoder_params or {})
    inputs = batch["encoder_input_tokens"]
    b, max_len = inputs.shape[0], batch["decoder_input_tokens"].shape[1]
    expert_index = batch.get("expert_index")
    encoded = self._apply(params, expert, inputs, method=network.Transformer.encode,
                          enable_dropout=False, expert_index=expert_index)
    rows = num_decodes if self.decode_fn == "beam_search" else 1
    if rows > 1:
      encoded = jnp.repeat(encoded, rows, axis=0)
      inputs = jnp.repeat(inputs, rows, axis=0)
      expert_index = None if expert_index is None else jnp.repeat(expert_index, rows)
    dummy = jnp.ones((b * rows, max_len), jnp.int32)
    _, variables = self._apply(params, expert, encoded, inputs, dummy, dummy,
                               method=network.Transformer.decode, enable_dropout=False,
                               decode=True, mutable=["cache"], expert_index=expert_index)
    cache = variables["cache"]

    def tokens_to_logits(tokens: Array, cache: PyTree) -> tuple[Array, PyTree]:
      logits, new_vars = self._decode_step(params, expert, encoded, inputs, tokens, cache,
                                           max_len, expert_index)
      return logits[:, 0], new_vars["cache"]

    if self.decode_fn == "beam_search":
      seqs, scores = decoding.beam_search(cache, tokens_to_logits, b, num_decodes, max_len,
                                          eos_id, alpha=decoder_params.get("alpha", 0.6),
                                          cache_batch_axis=1 if self.config.scan_layers else 0)
      return seqs[:, -1], {"scores": scores[:, -1], "all_decodes": seqs, "all_scores": scores}
    seqs, scores = decoding.temperature_sample(
        cache, tokens_to_logits, b, max_len, eos_id, rng,
        temperature=decoder_params.get("temperature", 0.0), topk=decoder_params.get("topk", 0))
    return seqs, {"scores": scores}

  def _decode_step(self, params, expert, encoded, inputs, tokens, cache, max_len, expert_index):
    cfg = self.expert_config
    expert = self._expert_layout(expert)
    variables = {"params": self.cast_base(experts_lib.effective_params(params, expert, cfg)),
                 "cache": cache}
    return self.module.apply(variables, encoded, inputs, tokens, tokens,
                             method=network.Transformer.decode, enable_dropout=False, decode=True,
                             max_decode_length=max_len, mutable=["cache"],
                             expert=experts_lib.network_tree(expert, cfg),
                             expert_index=expert_index)

  def predict_batch(self, params: PyTree, batch: Batch, rng: Optional[Array] = None,
                    **kwargs: Any) -> Array:
    """Top decodes `[B, Lt]` (see `predict_batch_with_aux`)."""
    return self.predict_batch_with_aux(params, batch, rng, **kwargs)[0]


def _check_normalize(normalize: str) -> None:
  if normalize not in SCORE_NORMALIZATIONS:
    raise ValueError(f"Score normalization must be one of {SCORE_NORMALIZATIONS}; got "
                     f"{normalize!r}. Per-character normalization needs the choice strings and is "
                     "applied by the evaluator.")


def feature_converter_cls():
  """seqio's encoder-decoder feature converter (imported lazily: model code stays TF-free)."""
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.EncDecFeatureConverter
