"""Benchmark for the first machine with an accelerator: training speed, MFU, stacking, scoring.

Not a test. One command; it detects the accelerator by itself (`jax.devices()[0]`):

    python bench/bench_accelerator.py            # GPU/TPU: T5 1.1 base, large, XL in bfloat16
    python bench/bench_accelerator.py --tiny     # CPU (also the default without an accelerator)

It measures, on one device:
1. training tokens/s and MFU for a prompt expert (adapters), a LoRA expert and full fine-tuning;
   MFU = model FLOPs of the step (`expert_t5x.flops.step_flops`, no remat) / time / device peak
   (`metrics_writer.PEAK_FLOPS`);
2. K stacked prompt experts (K = 1, 8, 32) in one step vs K separate single-expert steps;
3. rank-classification examples/s (4 choices).

Sizes that do not fit are reported as such (the out-of-memory error is caught) and the run goes
on. Prints one table and writes JSON (default bench/RESULTS_accelerator.json). Activations are
bfloat16 on accelerators (float32 on CPU, where bfloat16 products are emulated) and the frozen
base is stored in bfloat16 (`EncoderDecoderModel.base_dtype`) for expert training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

# Per mode: model sizes, (inputs, targets), batch per step, stacked K, timed steps.
MODES = {
    "accelerator": dict(sizes=("base", "large", "xl"), lengths=(512, 128), batch=32,
                        stacked=(1, 8, 32), stacked_batch=8, steps=5, score_batch=32),
    # CI's mode: every measurement once, at the smallest shapes (compiling dominates on CPU).
    "tiny": dict(sizes=("tiny",), lengths=(16, 4), batch=2, stacked=(1, 4), stacked_batch=2,
                 steps=1, score_batch=2),
}


def _batch(rng: np.random.Generator, prefix: tuple[int, ...], li: int, lt: int,
           vocab: int) -> dict[str, np.ndarray]:
  from expert_t5x import models  # pylint: disable=g-import-not-at-top

  def rows(length):
    x = rng.integers(2, vocab, prefix + (length,)).astype(np.int32)
    x[..., -1] = 1
    return x
  enc, tgt = rows(li), rows(lt)
  dec = np.asarray(models.shift_right(tgt.reshape(-1, lt))).reshape(tgt.shape)
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt, "decoder_input_tokens": dec,
          "decoder_loss_weights": np.ones(tgt.shape, np.float32)}


def _expert_config(kind: str, size: str):
  from expert_t5x import experts  # pylint: disable=g-import-not-at-top
  if kind == "adapter":
    return experts.AdapterConfig(reduction_factor=4 if size == "tiny" else 32)
  return experts.LoraConfig() if kind == "lora" else experts.FullConfig()


class Setup:
  """One model size on one device: a random base and a compiled train step for one expert kind."""

  def __init__(self, size: str, kind: str, li: int, lt: int, batch: int, accel: bool,
               num_experts: Optional[int] = None):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from expert_t5x import experts, models, network, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
    self.config = network.get_config(size, dtype=jnp.bfloat16 if accel else jnp.float32,
                                     scan_layers=size in ("xl", "xxl"))
    self.full = kind == "full"
    self.expert_config = _expert_config(kind, size)
    opt = (optimizers.Adafactor(multiply_by_parameter_scale=False, min_dim_size_to_factor=1)
           if self.full else optimizers.AdamW(global_norm_clip_threshold=1.0))
    self.model = models.EncoderDecoderModel(
        network.Transformer(self.config), expert_config=self.expert_config, optimizer_def=opt,
        loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
        base_dtype="float32" if self.full or not accel else "bfloat16")
    shapes = {"encoder_input_tokens": (batch, li), "decoder_input_tokens": (batch, lt)}
    abstract = jax.eval_shape(
        lambda: self.model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    axes = partitioning.params_logical_axes(abstract)
    flat_cfg = self.config.replace(scan_layers=False)
    flat = jax.eval_shape(lambda: network.Transformer(flat_cfg).init(
        jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32), enable_dropout=False))
    axes = {**partitioning.params_logical_axes(flat), **axes}
    self.partitioner = partitioning.PjitPartitioner(devices=jax.devices()[:1])
    base_sh = self.partitioner.sharding_for(
        partitioning.logical_axes_tree(abstract["params"],
                                       partitioning.params_logical_axes(abstract)))
    init = self.partitioner.partition(
        lambda r: self.model.cast_base(self.model.get_initial_variables(r, shapes)["params"]),
        in_shardings=None, out_shardings=base_sh)
    self.base = jax.block_until_ready(init(jax.random.PRNGKey(0)))
    if self.full:
      self.trainable = self.base
    else:
      host = network.unstack_layers(jax.tree.map(np.asarray, self.base))
      one = experts.init_expert(self.expert_config, self.config, host)
      self.trainable = one if num_experts is None else experts.stack_experts([one] * num_experts)
    sched = optimizers.create_learning_rate_scheduler("constant", 1e-4, 0)
    self.trainer = trainer.Trainer(self.model, self.partitioner, sched, num_experts=num_experts)
    self.trainer.compile(jax.eval_shape(lambda: self.trainable), base_sh, axes)
    self.keys = trainer.seed_keys(0 if num_experts is None else np.arange(num_experts))
    self.budget = np.full(() if num_experts is None else (num_experts,), 10**6, np.int32)
    self.state = self.trainer.init_state(self.trainable)

  def step(self, batch) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    batch = jax.device_put(batch, self.trainer.batch_sharding())
    self.state, metrics = self.trainer.train_step(self.base, self.state, batch, self.keys,
                                                  self.budget)
    jax.block_until_ready(metrics)


def _time(fn: Callable[[], None], steps: int) -> float:
  """Median seconds per call after one warm-up (compile) call."""
  fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _guard(fn: Callable[[], dict]) -> dict:
  """Runs one measurement; an out-of-memory (or other XLA) failure becomes a row, not a crash."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


_SINGLE: dict[tuple, Setup] = {}  # one compiled single-adapter step per (size, batch), reused


def _single_adapter(size: str, li: int, lt: int, batch: int, accel: bool) -> Setup:
  if (size, batch) not in _SINGLE:
    _SINGLE.clear()  # keep at most one model's base on the device
    _SINGLE[(size, batch)] = Setup(size, "adapter", li, lt, batch, accel)
  return _SINGLE[(size, batch)]


def train_row(size: str, kind: str, mode: dict, accel: bool, peak: Optional[float]) -> dict:
  from expert_t5x import flops  # pylint: disable=g-import-not-at-top
  li, lt = mode["lengths"]
  setup = (_single_adapter(size, li, lt, mode["batch"], accel) if kind == "adapter" else
           Setup(size, kind, li, lt, mode["batch"], accel))
  batch = _batch(np.random.default_rng(0), (mode["batch"],), li, lt, setup.config.vocab_size)
  dt = _time(lambda: setup.step(batch), mode["steps"])
  model_flops = flops.step_flops(setup.config, {"inputs": li, "targets": lt},
                                 "full" if setup.full else "frozen_base", mode["batch"],
                                 setup.expert_config, remat_policy="none")
  return {"step_s": dt, "tokens_per_s": mode["batch"] * (li + lt) / dt,
          "model_tflops_per_s": model_flops / dt / 1e12,
          "mfu": model_flops / dt / peak if peak else None}


def stacked_row(size: str, k: int, mode: dict, accel: bool) -> dict:
  """K experts in one step vs K separate single-expert steps, steady state."""
  li, lt = mode["lengths"]
  b = mode["stacked_batch"]
  rng = np.random.default_rng(0)
  stacked = Setup(size, "adapter", li, lt, b, accel, num_experts=k)
  batch = _batch(rng, (k, b), li, lt, stacked.config.vocab_size)
  t_stacked = _time(lambda: stacked.step(batch), mode["steps"])
  stacked = None  # frees its buffers before the single-expert steps
  single = _single_adapter(size, li, lt, b, accel)
  one = _batch(rng, (b,), li, lt, single.config.vocab_size)
  t_single = _time(lambda: single.step(one), mode["steps"])
  return {"stacked_step_s": t_stacked, "separate_steps_s": k * t_single,
          "speedup": k * t_single / t_stacked}


def score_row(size: str, mode: dict, accel: bool, num_choices: int = 4) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from expert_t5x import models, network  # pylint: disable=g-import-not-at-top
  li, lt = mode["lengths"][0], 64 if size != "tiny" else 8
  config = network.get_config(size, dtype=jnp.bfloat16 if accel else jnp.float32,
                              scan_layers=size in ("xl", "xxl"))
  model = models.EncoderDecoderModel(network.Transformer(config))
  b = mode["score_batch"]
  params = jax.jit(lambda r: model.get_initial_variables(
      r, {"encoder_input_tokens": (1, li), "decoder_input_tokens": (1, lt)})["params"])(
          jax.random.PRNGKey(0))
  if accel:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(_batch(rng, (b,), li, lt, config.vocab_size)["encoder_input_tokens"])
  choices = jnp.asarray(rng.integers(2, config.vocab_size, (b, num_choices, lt)), jnp.int32)
  fn = jax.jit(lambda p, x, c: model.score_choices(p, x, c))
  dt = _time(lambda: jax.block_until_ready(fn(params, inputs, choices)), mode["steps"])
  return {"examples_per_s": b / dt, "choices": num_choices}


def detect() -> tuple[str, bool, Optional[float]]:
  import jax  # pylint: disable=g-import-not-at-top
  from expert_t5x import metrics_writer  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  accel = device.platform in ("gpu", "tpu", "cuda", "rocm")
  name = device.device_kind if accel else f"CPU ({platform.processor() or platform.machine()})"
  return name, accel, metrics_writer.peak_flops_per_device(device) if accel else None


def run(mode_name: str, accel: bool, peak: Optional[float], only_sizes=None) -> list[dict]:
  mode = MODES[mode_name]
  rows = []
  for size in only_sizes or mode["sizes"]:
    for kind in ("adapter", "lora", "full"):
      rows.append({"size": size, "what": f"train {kind}",
                   **_guard(lambda: train_row(size, kind, mode, accel, peak))})
      print(rows[-1], flush=True)
    for k in mode["stacked"]:
      rows.append({"size": size, "what": f"stacked K={k}",
                   **_guard(lambda: stacked_row(size, k, mode, accel))})
      print(rows[-1], flush=True)
    rows.append({"size": size, "what": "rank classification",
                 **_guard(lambda: score_row(size, mode, accel))})
    print(rows[-1], flush=True)
  return rows


def table(rows: list[dict], device: str) -> str:
  lines = [f"Device: {device}", "", "| size | measurement | result |", "|---|---|---|"]
  for r in rows:
    if "error" in r:
      res = f"failed: {r['error']}"
    elif "tokens_per_s" in r:
      mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      res = (f"{r['tokens_per_s']:.0f} tokens/s, {r['model_tflops_per_s']:.3f} TFLOP/s, "
             f"MFU {mfu}")
    elif "speedup" in r:
      res = (f"{r['speedup']:.2f}x faster than separate runs ({r['stacked_step_s'] * 1e3:.1f} ms "
             f"vs {r['separate_steps_s'] * 1e3:.1f} ms)")
    else:
      res = f"{r['examples_per_s']:.1f} examples/s ({r['choices']} choices)"
    lines.append(f"| {r['size']} | {r['what']} | {res} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny configs (the default when no accelerator is found)")
  parser.add_argument("--sizes", default="", help="comma-separated sizes (default: the mode's)")
  parser.add_argument("--json", default=os.path.join(HERE, "RESULTS_accelerator.json"))
  args = parser.parse_args(argv)
  device, accel, peak = detect()
  mode_name = "tiny" if args.tiny or not accel else "accelerator"
  start = time.perf_counter()
  rows = run(mode_name, accel, peak, [s for s in args.sizes.split(",") if s] or None)
  text = table(rows, device)
  print(text)
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump({"device": device, "mode": mode_name, "peak_flops": peak, "rows": rows,
               "wall_s": time.perf_counter() - start}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
