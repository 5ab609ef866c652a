"""Analytic FLOP counts of T5 1.1 steps: training (frozen base or full), and rank-classification.

Counts matrix products only (2 FLOPs per multiply-add), per example, split the way the backward
pass treats them:

* W, products with a weight: q/k/v/o projections, MLP, logits. Backward: one product for the
  activation gradient, one more for the weight gradient when the weight is trained.
* A, products of two activations: attention scores and the weighted sum of values. Backward: two
  products (both operands need gradients), trained weights or not.

So a frozen-base (adapter / LoRA) step costs 2W + 3A + 3X (X: the expert's own products, whose
weights are trained), full fine-tuning 3W + 3A, and scoring W + A + X. Rematerialisation adds the
recomputed forward of every block: W_blocks + A for 'full', A for 'minimal' (which keeps the
weight products' outputs). Cross-attention keys and values are computed on the encoder's tokens;
with `num_choices`, the decoder runs `num_choices` target rows per encoded input.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

STEP_KINDS = ("frozen_base", "full", "score")


def _forward_parts(config: Any, li: int, lt: int, num_choices: int) -> tuple[float, float, float]:
  """(W_blocks, W_logits, A) forward FLOPs per encoded input; lt is per target row."""
  e, hd = config.emb_dim, config.num_heads * config.head_dim
  f, v = config.mlp_dim, config.vocab_size
  rows = lt * num_choices  # decoder tokens per input
  mlp = 2 * (len(config.mlp_activations) * e * f + f * e)
  enc_w = config.num_encoder_layers * (2 * 4 * e * hd + mlp) * li
  # self q/k/v/o and cross q/o on the decoder's tokens; cross k/v once on the encoder's.
  dec_w = config.num_decoder_layers * ((2 * 6 * e * hd + mlp) * rows + 2 * 2 * e * hd * li)
  enc_a = config.num_encoder_layers * 4 * li * li * hd
  dec_a = config.num_decoder_layers * 4 * (lt * lt * num_choices + rows * li) * hd
  return float(enc_w + dec_w), float(2 * e * v * rows), float(enc_a + dec_a)


def expert_forward_flops(expert_config: Any, config: Any, li: int, lt: int,
                         num_choices: int = 1) -> float:
  """Forward FLOPs of the expert's own products per encoded input (0 for none or full)."""
  kind = getattr(expert_config, "kind", None)
  e, hd = config.emb_dim, config.num_heads * config.head_dim
  rows = lt * num_choices
  if kind == "adapter":
    r = max(1, e // expert_config.reduction_factor)
    # Two sites per block (attention/self-attention and MLP), each e -> r -> e.
    return float(2 * 2 * 2 * e * r *
                 (config.num_encoder_layers * li + config.num_decoder_layers * rows))
  if kind == "lora":
    import re  # pylint: disable=g-import-not-at-top
    patterns = [re.compile(p) for p in expert_config.target_patterns()]
    r = expert_config.rank
    sites = []  # (module path, in, out, tokens)
    for i in range(config.num_encoder_layers):
      for m in ("query", "key", "value"):
        sites.append((f"encoder/layers_{i}/attention/{m}", e, hd, li))
      sites.append((f"encoder/layers_{i}/attention/out", hd, e, li))
    for i in range(config.num_decoder_layers):
      for m in ("query", "key", "value"):
        sites.append((f"decoder/layers_{i}/self_attention/{m}", e, hd, rows))
      sites.append((f"decoder/layers_{i}/self_attention/out", hd, e, rows))
      for m, tokens in (("query", rows), ("key", li), ("value", li), ("out", rows)):
        sites.append((f"decoder/layers_{i}/encoder_decoder_attention/{m}",
                      hd if m == "out" else e, e if m == "out" else hd, tokens))
    total = 0
    for path, fan_in, fan_out, tokens in sites:
      if any(p.search(path) for p in patterns):
        total += 2 * (fan_in * r + r * fan_out) * tokens
    return float(total)
  return 0.0


def step_flops(config: Any, lengths: Mapping[str, int], kind: str, examples: int,
               expert_config: Optional[Any] = None, num_choices: int = 1,
               remat_policy: Optional[str] = None) -> float:
  """FLOPs of one step over `examples` encoded inputs (training examples, or scored inputs).

  `remat_policy` (default: `config.remat_policy`) adds the recomputed forward; pass 'none' for
  model FLOPs (what MFU counts).
  """
  if kind not in STEP_KINDS:
    raise ValueError(f"FLOP step kind must be one of {STEP_KINDS}; got {kind!r}.")
  li, lt = lengths["inputs"], lengths["targets"]
  w_blocks, w_logits, a = _forward_parts(config, li, lt, num_choices if kind == "score" else 1)
  x = expert_forward_flops(expert_config, config, li, lt, num_choices if kind == "score" else 1)
  if kind == "score":
    return examples * (w_blocks + w_logits + a + x)
  w = w_blocks + w_logits
  total = (3 * w + 3 * a) if kind == "full" else (2 * w + 3 * a + 3 * x)
  remat = config.remat_policy if remat_policy is None else remat_policy
  if remat == "full":
    total += w_blocks + a + x
  elif remat == "minimal":
    total += a
  return examples * total
