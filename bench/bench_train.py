"""Benchmark: training speed and memory per expert type, and K stacked experts vs K separate runs.

Not a test; results and the machine in bench/RESULTS_train.md.

1. Per model size and expert type (adapter, LoRA, full fine-tuning): tokens/s of the sharded train
   step (`trainer.Trainer`, random full-length batches, no input pipeline), an MFU estimate, the
   XLA-counted FLOPs next to the trainer's own FLOP formula, and memory: the step program's
   argument + temporary buffers (`Compiled.memory_analysis()`) and the process's peak RSS. Each
   measurement runs in its own process so the peak RSS belongs to that expert type alone.
2. K adapter experts stacked in one program (`Trainer(num_experts=K)`, batch `[K, B_k, ...]`) vs K
   separate runs of the single-expert program: steady-state examples/s, with compile and start-up
   time reported separately.

    python bench/bench_train.py --out bench/RESULTS_train.md

MFU is reported against two peaks: a nominal float32 peak (cores x clock x 32 FLOP/cycle, two
256-bit FMA pipes per core) and the measured rate of a large float32 matmul on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

KINDS = ("adapter", "lora", "full")
FLOP_PER_CYCLE_F32 = 32


# --------------------------------------------------------------------------- one measurement


def _expert_config(kind: str, size: str):
  from expert_t5x import experts  # pylint: disable=g-import-not-at-top
  if kind == "adapter":  # the paper's r=32 on T5 small; tiny (emb 32) gets a bottleneck of 8
    return experts.AdapterConfig(reduction_factor=32 if size != "tiny" else 4)
  if kind == "lora":
    return experts.LoraConfig()
  return experts.FullConfig()


def _batch(rng: np.random.Generator, shape_prefix: tuple[int, ...], lengths: dict[str, int],
           vocab: int) -> dict[str, np.ndarray]:
  """Full-length rows (every position is a real token, EOS last), so tokens/s counts real tokens."""
  from expert_t5x import models  # pylint: disable=g-import-not-at-top

  def rows(length):
    x = rng.integers(2, vocab, shape_prefix + (length,)).astype(np.int32)
    x[..., -1] = 1
    return x
  enc, tgt = rows(lengths["inputs"]), rows(lengths["targets"])
  dec = np.asarray(models.shift_right(tgt.reshape(-1, tgt.shape[-1]))).reshape(tgt.shape)
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt, "decoder_input_tokens": dec,
          "decoder_loss_weights": np.ones(tgt.shape, np.float32)}


class _Setup:
  """A model of `size` with a `kind` expert, its sharded random base and a compiled train step."""

  def __init__(self, size: str, kind: str, lengths: dict[str, int], batch: int,
               num_experts: int | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    from expert_t5x import experts, models, network, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    self.config = network.get_config(size, dropout_rate=0.1)
    expert_config = _expert_config(kind, size)
    self.model = models.EncoderDecoderModel(
        network.Transformer(self.config), expert_config=expert_config,
        loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
        optimizer_def=optimizers.AdamW(global_norm_clip_threshold=1.0))
    shapes = {"encoder_input_tokens": (batch, lengths["inputs"]),
              "decoder_input_tokens": (batch, lengths["targets"])}
    abstract = jax.eval_shape(
        lambda: self.model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    axes = partitioning.params_logical_axes(abstract)
    self.partitioner = partitioning.PjitPartitioner()
    base_sh = self.partitioner.sharding_for(partitioning.logical_axes_tree(
        abstract["params"], axes))
    init = self.partitioner.partition(
        lambda r: self.model.get_initial_variables(r, shapes)["params"], in_shardings=None,
        out_shardings=base_sh)
    self.base = jax.block_until_ready(init(jax.random.PRNGKey(0)))
    self.full = kind == "full"
    if self.full:
      self.trainable = self.base
    else:
      one = experts.init_expert(expert_config, self.config, jax.tree.map(np.asarray, self.base))
      self.trainable = one if num_experts is None else experts.stack_experts([one] * num_experts)
    sched = optimizers.create_learning_rate_scheduler("constant", 1e-4, 0)
    self.trainer = trainer.Trainer(self.model, self.partitioner, sched, num_experts=num_experts)
    self.trainer.compile(jax.eval_shape(lambda: self.trainable), base_sh, axes)
    self.num_experts = num_experts
    self.init_s = time.perf_counter() - start
    self.seed_keys = trainer.seed_keys(0 if num_experts is None else np.arange(num_experts))
    self.budget = np.full(() if num_experts is None else (num_experts,), 10**6, np.int32)
    self.compiled = None

  def new_state(self):
    return self.trainer.init_state(self.trainable)

  def compile(self, state, batch) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    batch = jax.device_put(batch, self.trainer.batch_sharding())
    base = None if self.full else self.base  # a full fine-tuning step takes no base
    lowered = self.trainer._step_fn.lower(base, state, batch, jnp.asarray(self.seed_keys),  # pylint: disable=protected-access
                                          jnp.asarray(self.budget))
    self.compiled = lowered.compile()
    return time.perf_counter() - start

  def step(self, state, batch):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    batch = jax.device_put(batch, self.trainer.batch_sharding())
    state, metrics = self.compiled(None if self.full else self.base, state, batch,
                                   jnp.asarray(self.seed_keys), jnp.asarray(self.budget))
    jax.block_until_ready(metrics)
    return state, metrics


def _timed_steps(setup: _Setup, state, batches: list) -> tuple[Any, list[float]]:
  times = []
  for batch in batches:
    start = time.perf_counter()
    state, _ = setup.step(state, batch)
    times.append(time.perf_counter() - start)
  return state, times


def _count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(size: str, kind: str, lengths: dict[str, int], batch: int, steps: int) -> dict:
  """Tokens/s, FLOPs and memory of one expert type's train step (run in a fresh process)."""
  from expert_t5x import metrics_writer  # pylint: disable=g-import-not-at-top
  baseline_rss = _peak_rss()
  setup = _Setup(size, kind, lengths, batch)
  rng = np.random.default_rng(0)
  batches = [_batch(rng, (batch,), lengths, setup.config.vocab_size) for _ in range(steps + 1)]
  state = setup.new_state()
  compile_s = setup.compile(state, batches[0])
  cost = setup.compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = setup.compiled.memory_analysis()
  state, _ = setup.step(state, batches[0])  # warm-up
  state, times = _timed_steps(setup, state, batches[1:])
  step_s = statistics.median(times)
  tokens = batch * (lengths["inputs"] + lengths["targets"])
  formula = metrics_writer.train_flops_per_example(setup.config, lengths, setup.full) * batch
  return {
      "size": size, "kind": kind, "batch": batch, "lengths": lengths, "steps": steps,
      "trainable_params": _count(setup.trainable), "base_params": _count(setup.base),
      "optimizer_state_floats": _count(state.opt_state),
      "init_s": setup.init_s, "compile_s": compile_s, "step_s": step_s,
      "tokens_per_s": tokens / step_s, "examples_per_s": batch / step_s,
      "flops_formula": formula, "flops_xla": float(cost.get("flops", float("nan"))),
      "xla_argument_bytes": mem.argument_size_in_bytes, "xla_temp_bytes": mem.temp_size_in_bytes,
      "xla_output_bytes": mem.output_size_in_bytes, "xla_alias_bytes": mem.alias_size_in_bytes,
      "peak_rss_bytes": _peak_rss(), "startup_rss_bytes": baseline_rss,
      # Measured after the steps, in this process, so it sees the same machine load.
      "matmul_flops": measured_matmul_flops(),
  }


def measure_stacked(size: str, num_experts: int, lengths: dict[str, int], batch: int,
                    steps: int) -> dict:
  """K adapter experts stacked in one program vs K separate runs of the single-expert program."""
  rng = np.random.default_rng(0)
  k = num_experts
  stacked = _Setup(size, "adapter", lengths, batch, num_experts=k)
  batches = [_batch(rng, (k, batch), lengths, stacked.config.vocab_size) for _ in range(steps + 1)]
  state = stacked.new_state()
  stacked_compile = stacked.compile(state, batches[0])
  start = time.perf_counter()
  state, _ = stacked.step(state, batches[0])
  stacked_first = time.perf_counter() - start
  state, stacked_times = _timed_steps(stacked, state, batches[1:])
  del state

  single = _Setup(size, "adapter", lengths, batch)
  single_init = single.init_s
  first_state = single.new_state()
  expert_batches = lambda e: [{n: v[e] for n, v in b.items()} for b in batches]  # pylint: disable=unnecessary-lambda-assignment
  single_compile = single.compile(first_state, expert_batches(0)[0])
  del first_state
  separate_times, startup = [], []
  for e in range(k):  # the K runs one after another, each with its own state and data stream
    start = time.perf_counter()
    state = single.new_state()
    state, _ = single.step(state, expert_batches(e)[0])
    startup.append(time.perf_counter() - start)
    state, times = _timed_steps(single, state, expert_batches(e)[1:])
    separate_times.extend(times)
  # Medians of per-step times: robust to other jobs on a shared machine.
  stacked_rate = k * batch / statistics.median(stacked_times)
  separate_rate = batch / statistics.median(separate_times)
  return {
      "size": size, "num_experts": k, "batch_per_expert": batch, "lengths": lengths,
      "steps": steps,
      "stacked": {"init_s": stacked.init_s, "compile_s": stacked_compile,
                  "first_step_s": stacked_first, "step_s": statistics.median(stacked_times),
                  "examples_per_s": stacked_rate},
      "separate": {"init_s": single_init, "compile_s": single_compile,
                   "first_step_s_median": statistics.median(startup),
                   "step_s": statistics.median(separate_times), "examples_per_s": separate_rate},
      "speedup": stacked_rate / separate_rate,
  }


def measured_matmul_flops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
  """The best float32 matmul rate over a few square sizes (an attainable peak on this machine)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  best = 0.0
  f = jax.jit(lambda x: x @ x)
  for n in sizes:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    jax.block_until_ready(f(a))
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(f(a))
      best = max(best, 2 * n**3 / (time.perf_counter() - start))
  return best


# --------------------------------------------------------------------------------- machine


def machine() -> dict:
  info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "mhz": None}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          info["cpu"] = value.strip()
        elif key.strip() == "cpu MHz" and info["mhz"] is None:
          info["mhz"] = float(value)
  except OSError:
    pass
  info["load_average"] = os.getloadavg()
  import jax  # pylint: disable=g-import-not-at-top
  info["jax"] = jax.__version__
  info["nominal_peak_flops"] = (info["cores"] * info["mhz"] * 1e6 * FLOP_PER_CYCLE_F32
                                if info["mhz"] else None)
  return info


# ---------------------------------------------------------------------------------- report


def _child(args: list[str]) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True,
                       text=True, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if out.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(x: float) -> str:
  return f"{x / 2**20:,.0f} MiB"


def report(rows: list[dict], stacked: list[dict], info: dict, matmul: float,
           command: str) -> str:
  peak = info["nominal_peak_flops"]
  lines = [
      "| model | lengths x batch | expert | trainable params | tokens/s | step (median) | compile "
      "| "
      "FLOPs/step (formula / XLA) | MFU nominal | MFU vs matmul | step buffers (args + temp) | "
      "peak RSS (above start-up) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"
  ]
  by_size: dict[str, dict[str, dict]] = {}
  for r in rows:
    by_size.setdefault(r["size"], {})[r["kind"]] = r
    rate = r["flops_formula"] / r["step_s"]
    lines.append(
        f"| {r['size']} | {r['lengths']['inputs']}/{r['lengths']['targets']} x {r['batch']} | "
        f"{r['kind']} | {r['trainable_params']:,} | {r['tokens_per_s']:,.0f} | "
        f"{r['step_s'] * 1e3:,.1f} ms | {r['compile_s']:.1f} s | "
        f"{r['flops_formula'] / 1e9:.2f} / {r['flops_xla'] / 1e9:.2f} G | "
        f"{100 * rate / peak:.1f}% | {100 * rate / r['matmul_flops']:.0f}% | "
        f"{_mb(r['xla_argument_bytes'] + r['xla_temp_bytes'])} | {_mb(r['peak_rss_bytes'])} "
        f"({_mb(r['peak_rss_bytes'] - r['startup_rss_bytes'])}) |")
  lines += ["", "| model | adapter / full tokens/s | lora / full tokens/s | full / adapter step "
            "buffers | full / adapter peak RSS | full / adapter optimizer state |",
            "|---|---|---|---|---|---|"]
  for size, kinds in by_size.items():
    if not all(k in kinds for k in KINDS):
      continue
    a, l, f = kinds["adapter"], kinds["lora"], kinds["full"]
    buf = lambda r: r["xla_argument_bytes"] + r["xla_temp_bytes"]  # pylint: disable=unnecessary-lambda-assignment
    grown = lambda r: r["peak_rss_bytes"] - r["startup_rss_bytes"]  # pylint: disable=unnecessary-lambda-assignment
    lines.append(
        f"| {size} | {a['tokens_per_s'] / f['tokens_per_s']:.2f}x | "
        f"{l['tokens_per_s'] / f['tokens_per_s']:.2f}x | {buf(f) / buf(a):.2f}x | "
        f"{f['peak_rss_bytes'] / a['peak_rss_bytes']:.2f}x ({grown(f) / grown(a):.2f}x above "
        "start-up) | "
        f"{f['optimizer_state_floats'] / a['optimizer_state_floats']:.0f}x |")
  for s in stacked:
    st, se = s["stacked"], s["separate"]
    lines += [
        "", f"K = {s['num_experts']} adapter experts, {s['size']}, per-expert batch "
        f"{s['batch_per_expert']}, lengths {s['lengths']['inputs']}/{s['lengths']['targets']}, "
        f"{s['steps']} timed steps per expert after one warm-up step (rates from median step "
        "times):", "",
        "| variant | steady-state examples/s | step | compile | set-up (base init, trace) | "
        "first step |", "|---|---|---|---|---|---|",
        f"| {s['num_experts']} stacked, one program | {st['examples_per_s']:,.1f} | "
        f"{st['step_s'] * 1e3:,.1f} ms | {st['compile_s']:.1f} s | {st['init_s']:.1f} s | "
        f"{st['first_step_s']:.2f} s |",
        f"| {s['num_experts']} separate runs, one after another | {se['examples_per_s']:,.1f} | "
        f"{se['step_s'] * 1e3:,.1f} ms per run | {se['compile_s']:.1f} s (once; "
        f"{s['num_experts'] * se['compile_s']:.1f} s as separate jobs) | {se['init_s']:.1f} s | "
        f"{se['first_step_s_median']:.2f} s each |",
        f"| ratio stacked / separate | **{s['speedup']:.2f}x** | | | | |"]
  head = [
      f"Machine: {info['cpu']}, {info['cores']} cores at {info['mhz']:.0f} MHz, CPU only, "
      f"jax {info['jax']}, float32. Load average at the start: "
      f"{', '.join(f'{x:.1f}' for x in info['load_average'])}.",
      f"Peaks for MFU: nominal {peak / 1e9:.0f} GFLOP/s ({info['cores']} cores x base clock x "
      f"{FLOP_PER_CYCLE_F32} FLOP/cycle); best float32 matmul (1024^2, 2048^2) measured in each "
      f"measurement's process after its steps ({matmul / 1e9:.0f} GFLOP/s in the parent at the "
      "start). MFU uses the formula FLOPs.",
      f"Command: `{command}`", ""]
  return "\n".join(head + lines) + "\n"


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--kinds", default=",".join(KINDS))
  parser.add_argument("--inputs", type=int, default=64)
  parser.add_argument("--targets", type=int, default=16)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20, help="timed steps after one warm-up step")
  parser.add_argument("--small_steps", type=int, default=6, help="timed steps for sizes > tiny")
  parser.add_argument("--stacked", default="tiny:8", help="SIZE:K pairs, comma separated ('' off)")
  parser.add_argument("--stacked_steps", type=int, default=20)
  parser.add_argument("--out", default=None, help="also write the report (markdown) here")
  parser.add_argument("--one", nargs=2, metavar=("SIZE", "KIND"), help=argparse.SUPPRESS)
  parser.add_argument("--one_stacked", nargs=2, metavar=("SIZE", "K"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  lengths = {"inputs": args.inputs, "targets": args.targets}
  if args.one:
    size, kind = args.one
    steps = args.steps if size == "tiny" else args.small_steps
    print(json.dumps(measure_one(size, kind, lengths, args.batch, steps)))
    return
  if args.one_stacked:
    size, k = args.one_stacked
    print(json.dumps(measure_stacked(size, int(k), lengths, args.batch, args.stacked_steps)))
    return

  info = machine()
  matmul = measured_matmul_flops()
  common = ["--inputs", str(args.inputs), "--targets", str(args.targets), "--batch",
            str(args.batch), "--steps", str(args.steps), "--small_steps", str(args.small_steps),
            "--stacked_steps", str(args.stacked_steps)]
  rows, stacked = [], []
  for size in filter(None, args.sizes.split(",")):
    for kind in filter(None, args.kinds.split(",")):
      rows.append(_child(["--one", size, kind, *common]))
      print(json.dumps(rows[-1]), flush=True)
  for pair in filter(None, args.stacked.split(",")):
    size, k = pair.split(":")
    stacked.append(_child(["--one_stacked", size, k, *common]))
    print(json.dumps(stacked[-1]), flush=True)
  command = "python bench/bench_train.py " + " ".join(argv)
  text = report(rows, stacked, info, matmul, command.strip())
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main(sys.argv[1:])
