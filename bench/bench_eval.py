"""Benchmark: rank-classification scoring speed (not a test; results in bench/RESULTS_eval.md).

1. Encode-once (`score_choices`: each input encoded once, its K choices in one decoder pass) vs the
   naive one-row-per-(input, choice) scoring (`score_batch` on K copies of every input), on a
   K-choice task; the scores must agree within rtol 1e-5.
2. E stacked adapter experts in one pass (each input repeated E times with an `expert_index`) vs
   E separate passes with one expert each; same scores.

    python bench/bench_eval.py --config small --batch_size 8 --input_length 128 --choices 4

Prints one JSON line per measurement (median of --repeats timed calls after a compile call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from expert_t5x import experts as experts_lib
from expert_t5x import models
from expert_t5x import network


def _time(fn, repeats: int) -> tuple[float, np.ndarray]:
  out = jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), np.asarray(out)


def _data(rng, batch, input_length, choices, target_length, vocab):
  inputs = rng.integers(2, vocab, (batch, input_length)).astype(np.int32)
  inputs[:, -1] = 1
  cands = np.zeros((batch, choices, target_length), np.int32)
  for b in range(batch):
    for k in range(choices):
      n = int(rng.integers(1, target_length))
      cands[b, k, :n] = rng.integers(2, vocab, n)
      cands[b, k, n] = 1
  return inputs, cands


def bench_encode_once(args, config, params) -> dict:
  model = models.EncoderDecoderModel(network.Transformer(config))
  rng = np.random.default_rng(0)
  inputs, choices = _data(rng, args.batch_size, args.input_length, args.choices,
                          args.target_length, config.vocab_size)
  b, k, lt = choices.shape
  encode_once = jax.jit(lambda p, x, c: model.score_choices(p, x, c))
  # Naive: one row per (input, choice): every input is encoded K times.
  flat_targets = jnp.asarray(choices.reshape(b * k, lt))
  naive_batch = {"encoder_input_tokens": jnp.asarray(np.repeat(inputs, k, axis=0)),
                 "decoder_target_tokens": flat_targets,
                 "decoder_input_tokens": models.shift_right(flat_targets),
                 "decoder_loss_weights": (flat_targets > 0).astype(jnp.float32)}
  naive = jax.jit(lambda p, batch: model.score_batch(p, batch).reshape(b, k))
  t_once, s_once = _time(lambda: encode_once(params, jnp.asarray(inputs), jnp.asarray(choices)),
                         args.repeats)
  t_naive, s_naive = _time(lambda: naive(params, naive_batch), args.repeats)
  np.testing.assert_allclose(s_once, s_naive, rtol=1e-5, atol=1e-4)
  return {"bench": "encode_once_vs_per_pair", "examples_per_s_encode_once": b / t_once,
          "examples_per_s_per_pair": b / t_naive, "speedup": t_naive / t_once,
          "max_abs_score_diff": float(np.max(np.abs(s_once - s_naive)))}


def bench_stacked(args, config, params) -> dict:
  cfg = experts_lib.AdapterConfig(reduction_factor=32)
  trees = [experts_lib.init_expert(experts_lib.AdapterConfig(reduction_factor=32, init_seed=s),
                                   config, params) for s in range(args.experts)]
  stacked = experts_lib.stack_experts(trees)
  trees = [jax.tree.map(jnp.asarray, t) for t in trees]
  model = models.EncoderDecoderModel(network.Transformer(config), expert_config=cfg)
  rng = np.random.default_rng(1)
  inputs, choices = _data(rng, args.batch_size, args.input_length, args.choices,
                          args.target_length, config.vocab_size)
  e = args.experts
  one = jax.jit(lambda p, ex, x, c: model.score_choices(p, x, c, expert=ex))
  many = jax.jit(lambda p, ex, x, c, idx: model.score_choices(p, x, c, expert=ex,
                                                              expert_index=idx))
  rows_x = jnp.asarray(np.repeat(inputs, e, axis=0))
  rows_c = jnp.asarray(np.repeat(choices, e, axis=0))
  index = jnp.asarray(np.tile(np.arange(e, dtype=np.int32), inputs.shape[0]))
  x, c = jnp.asarray(inputs), jnp.asarray(choices)
  t_many, s_many = _time(lambda: many(params, stacked, rows_x, rows_c, index), args.repeats)
  t_sep, s_sep = _time(lambda: jnp.stack([one(params, t, x, c) for t in trees], 1), args.repeats)
  s_many = s_many.reshape(inputs.shape[0], e, -1)
  np.testing.assert_allclose(s_many, s_sep, rtol=1e-5, atol=1e-4)
  pairs = inputs.shape[0] * e
  return {"bench": "stacked_vs_separate_experts", "experts": e,
          "example_experts_per_s_stacked": pairs / t_many,
          "example_experts_per_s_separate": pairs / t_sep, "speedup": t_sep / t_many,
          "max_abs_score_diff": float(np.max(np.abs(s_many - s_sep)))}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="small")
  p.add_argument("--vocab_size", type=int, default=32128)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--input_length", type=int, default=128)
  p.add_argument("--target_length", type=int, default=8)
  p.add_argument("--choices", type=int, default=4)
  p.add_argument("--experts", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", choices=("encode_once", "stacked"))
  args = p.parse_args()
  config = network.get_config(args.config, vocab_size=args.vocab_size, dropout_rate=0.0)
  model = models.EncoderDecoderModel(network.Transformer(config))
  params = jax.jit(lambda r: model.get_initial_variables(
      r, {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)})["params"])(
          jax.random.PRNGKey(0))
  machine = {"platform": jax.devices()[0].platform, "device": jax.devices()[0].device_kind,
             "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
             "jax": jax.__version__}
  setup = {k: getattr(args, k) for k in ("config", "vocab_size", "batch_size", "input_length",
                                         "target_length", "choices", "repeats")}
  for name, fn in (("encode_once", bench_encode_once), ("stacked", bench_stacked)):
    if args.only in (None, name):
      print(json.dumps({**fn(args, config, params), **setup, "machine": machine}), flush=True)


if __name__ == "__main__":
  main()
