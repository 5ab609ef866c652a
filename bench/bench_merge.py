"""Benchmark: merge wall time and peak memory vs the number k of merged experts
(`merge_expert_dirs`).

  python bench/bench_merge.py [--config xl] [--reduction_factor 32] [--ks 1 2 4 8 16]
      [--methods uniform task_arithmetic ties dare]

Not a test; results and the machine in bench/RESULTS_merge.md.

Synthetic adapter experts in Expert format v1 are written to a temporary directory (removed at the
end): their tensor names and shapes are those of `experts.init_expert` for the named T5 1.1 config
(default: the paper's T5-XL with reduction factor 32, 97.8 MiB per expert), their values θ_init
+ noise, with layer-norm scales base + noise, so task-vector methods take adapters against θ_init
  and
layer norms against the base exactly as on real experts. The base is represented by its layer-norm
scales only (the only base tensors an adapter merge reads), with shapes from `jax.eval_shape`.

Each (method, k) merge runs in a fresh child process (`--child`). The child loads θ_init and the
base scales, resets its peak-RSS mark, measures its resident set (VmRSS) just before merging, then
calls `merging.merge_expert_dirs` on the first k experts and reports the wall time and the peak RSS
(VmHWM). "extra RSS" = peak RSS − RSS before the merge, i.e. what the merge itself added. The peak
is VmHWM rather than `getrusage(RUSAGE_SELF).ru_maxrss` because Linux carries ru_maxrss over fork
and exec: every child would report at least the parent's RSS at fork time (~210 MiB here, jax being
imported to get the base's shapes), hiding the merge. ru_maxrss is still printed in the child's
JSON line. A sampling thread (every --sample_ms) also records the peaks of the anonymous (heap)
and file-backed (mapped files) parts of the RSS, which tells whether growth comes from arrays the
merge allocates or from pages of the memory-mapped inputs.
Methods use their defaults: TIES with a global (per-expert) threshold at density 0.2, DARE with
drop 0.9 and linear combination, λ = 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from bench_common import cpu_model

MIB = 1024 * 1024
METHODS = ("uniform", "task_arithmetic", "ties", "dare")
NOISE = 0.01  # std of θ − θ_init; only magnitudes' spread matters to TIES, not the scale


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config",
                 default="xl",
                 help="T5 1.1 size whose adapter shapes are used (paper: xl)")
  p.add_argument("--reduction_factor",
                 type=int,
                 default=32,
                 help="adapter reduction factor (paper: 32)")
  p.add_argument("--ks",
                 type=int,
                 nargs="+",
                 default=[1, 2, 4, 8, 16],
                 help="numbers of experts to merge")
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--sample_ms", type=float, default=10.0, help="RSS sampling period in the child")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--method", help=argparse.SUPPRESS)
  p.add_argument("--experts", nargs="+", help=argparse.SUPPRESS)
  p.add_argument("--work", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if min(args.ks) < 1:
    p.error(f"--ks must be positive integers; got {args.ks}.")
  return args


# ----------------------------------------------------------------------------
# Machine description.
# ----------------------------------------------------------------------------


def load_average() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "unknown"


def _status_kib(*fields: str) -> dict[str, int]:
  """Fields of /proc/self/status in KiB (Linux); empty where unavailable."""
  out = {}
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        key = line.split(":", 1)[0]
        if key in fields:
          out[key] = int(line.split()[1])
  except OSError:
    pass
  return out


# ----------------------------------------------------------------------------
# Synthetic experts (parent only: needs jax for the base's shapes).
# ----------------------------------------------------------------------------


def layer_norm_base(config_name: str) -> dict[str, np.ndarray]:
  """The base's layer-norm scales ({flat path: float32}), shapes from an abstract init (no
  weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from expert_t5x import models, network  # pylint: disable=g-import-not-at-top
  model = models.EncoderDecoderModel(network.Transformer(network.get_config(config_name)))
  abstract = jax.eval_shape(lambda: model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}))
  shapes = {
      p: s.shape for p, s in traverse_util.flatten_dict(dict(abstract["params"]), sep="/").items()
  }
  rng = np.random.default_rng(1234)
  # Trained T5 scales are far from 1; their exact values do not change the merge's cost.
  return {p: rng.uniform(0.05, 2.0, shape).astype(np.float32)
          for p, shape in sorted(shapes.items()) if p.endswith("/scale")}


def write_experts(work: str, config_name: str, reduction_factor: int,
                  count: int) -> tuple[list[str], float]:
  """Writes θ_init, the layer-norm base and `count` experts under `work`; returns (dirs,
  MiB/expert)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from expert_t5x import expert_format, experts, network  # pylint: disable=g-import-not-at-top
  base = layer_norm_base(config_name)
  config = experts.AdapterConfig(reduction_factor=reduction_factor, init_seed=0)
  init = expert_format.flatten_params(
      experts.init_expert(config, network.get_config(config_name),
                          expert_format.unflatten_params(base)))
  save_file(init, os.path.join(work, "init.safetensors"))
  save_file(base, os.path.join(work, "base.safetensors"))
  fingerprint = expert_format.tree_digest(base)
  dirs = []
  for i in range(count):
    rng = np.random.default_rng(i + 1)
    params = {n: x + NOISE * rng.standard_normal(x.shape, dtype=np.float32)
              for n, x in init.items()}
    meta = expert_format.build_metadata(
        "adapter", experts.config_to_json(config), base_fingerprint=fingerprint,
        base_config_name=config_name,
        provenance=[{"task": f"task_{i}", "dataset": f"dataset_{i}", "subset": None, "prompt": None,
                     "role": "train"}],
        training={"init_seed": 0})
    d = os.path.join(work, f"expert_{i:02d}")
    expert_format.save_expert(d, params, meta)
    dirs.append(d)
  size = os.path.getsize(os.path.join(dirs[0], expert_format.PARAMS_FILE)) / MIB
  return dirs, size


# ----------------------------------------------------------------------------
# Child: one merge, measured.
# ----------------------------------------------------------------------------


class _RssSampler(threading.Thread):
  """Peaks of RssAnon and RssFile (KiB), read every `period` seconds until stopped."""

  def __init__(self, period: float):
    super().__init__(daemon=True)
    self.period = period
    self.peak = {"RssAnon": 0, "RssFile": 0}
    self._halt = threading.Event()

  def sample(self) -> None:
    for key, value in _status_kib("RssAnon", "RssFile").items():
      self.peak[key] = max(self.peak[key], value)

  def run(self) -> None:
    while not self._halt.wait(self.period):
      self.sample()

  def stop(self) -> None:
    self._halt.set()
    self.join()
    self.sample()


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0) so that it measures the merge alone."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(args: argparse.Namespace) -> None:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from expert_t5x import merging  # pylint: disable=g-import-not-at-top
  # Loaded before the baseline so that every child starts the merge from the same state.
  init = load_file(os.path.join(args.work, "init.safetensors"))
  base = load_file(os.path.join(args.work, "base.safetensors"))
  out_dir = os.path.join(args.work, "merged")
  gc.collect()
  reset = _reset_peak_rss()
  before = _status_kib("VmRSS", "VmHWM", "RssAnon", "RssFile")
  sampler = _RssSampler(args.sample_ms / 1000)
  sampler.start()
  start = time.perf_counter()
  merging.merge_expert_dirs(args.experts, out_dir, args.method, base_params=base, init_params=init)
  seconds = time.perf_counter() - start
  peak = _status_kib("VmHWM").get("VmHWM")
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  sampler.stop()
  shutil.rmtree(out_dir)
  print(
      json.dumps({
          "seconds": seconds, "rss_before_kib": before.get("VmRSS"),
          "hwm_before_kib": before.get("VmHWM"), "hwm_reset": reset,
          "peak_kib": peak if peak is not None else maxrss, "ru_maxrss_kib": maxrss,
          "anon_before_kib": before.get("RssAnon"), "file_before_kib": before.get("RssFile"),
          "anon_peak_kib": sampler.peak["RssAnon"], "file_peak_kib": sampler.peak["RssFile"]
      }))


def run_child(args: argparse.Namespace, work: str, method: str, dirs: list[str]) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--work", work, "--method", method,
         "--sample_ms", str(args.sample_ms), "--experts", *dirs]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ,
             PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"merge child ({method}, k={len(dirs)}) failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Parent.
# ----------------------------------------------------------------------------


def _mib(kib: float | None) -> str:
  return "?" if kib is None else f"{kib / 1024:.0f}"


def print_table(rows: list[dict], expert_mib: float) -> None:
  print("| method | k | seconds | s / expert | peak RSS MiB | extra RSS MiB | extra / expert "
        "| extra vs k=1 | heap (anon) extra MiB | mapped-file extra MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  first = {}
  for r in rows:
    extra = r["peak_kib"] - r["rss_before_kib"]
    first.setdefault(r["method"], extra)
    anon = r["anon_peak_kib"] - r["anon_before_kib"] if r["anon_before_kib"] is not None else None
    mapped = r["file_peak_kib"] - r["file_before_kib"] if r["file_before_kib"] is not None else None
    # Without a reset, a higher peak while loading θ_init would hide the merge's own peak.
    flag = "" if r["hwm_reset"] or r["peak_kib"] > r["hwm_before_kib"] else " (load peak)"
    print(f"| {r['method']} | {r['k']} | {r['seconds']:.2f} | {r['seconds'] / r['k']:.2f} "
          f"| {_mib(r['peak_kib'])}{flag} | {_mib(extra)} | {extra / 1024 / expert_mib:.2f}x "
          f"| {extra / first[r['method']]:.2f}x | {_mib(anon)} | {_mib(mapped)} |")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    child(args)
    return
  import safetensors  # pylint: disable=g-import-not-at-top
  print(f"# {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"numpy {np.__version__}, safetensors {safetensors.__version__}; "
        f"load average before: {load_average()}")
  work = tempfile.mkdtemp(prefix="bench_merge_")
  try:
    start = time.perf_counter()
    all_dirs, expert_mib = write_experts(work, args.config, args.reduction_factor, max(args.ks))
    print(f"# {len(all_dirs)} adapter experts (T5 1.1 {args.config}, reduction factor "
          f"{args.reduction_factor}) of {expert_mib:.1f} MiB each, written in "
          f"{time.perf_counter() - start:.1f} s; inputs are in the page cache (just written)")
    rows = []
    for method in args.methods:
      for k in sorted(args.ks):
        r = run_child(args, work, method, all_dirs[:k])
        rows.append(dict(r, method=method, k=k))
        print(f"#   {method} k={k}: {r['seconds']:.2f} s, peak RSS {_mib(r['peak_kib'])} MiB",
              flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(
      f"# expert size {expert_mib:.1f} MiB; extra RSS = child's peak RSS (VmHWM, reset just before "
      f"the merge) - its RSS just before the merge; heap / mapped-file columns: sampled every "
      f"{args.sample_ms:g} ms"
  )
  print_table(rows, expert_mib)
  print(f"# load average after: {load_average()}")


if __name__ == "__main__":
  main()
