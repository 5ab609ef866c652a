"""Benchmark: the paper-scale steps (T5 1.1 XL/XXL) compiled, not run, on fake CPU devices.

Not a test. Each case is lowered with `jax.ShapeDtypeStruct` inputs carrying their shardings and
compiled by XLA for a mesh of N fake host devices (`--xla_force_host_platform_device_count=N`, one
subprocess per device count), so nothing of that size is ever allocated. Per device it reports the
compiled program's memory (`memory_analysis()`: arguments, outputs, temporaries, and the peak of
what is live at once = arguments + outputs - aliased + temporaries), XLA's FLOP count and the
bytes of collective operations read from the optimised HLO, beside the analytic FLOPs of the same
step (`expert_t5x.flops.step_flops`).

    python bench/bench_scale.py                 # every case and mesh, results cached
    python bench/bench_scale.py --only 'pe_xl*' # cases by name, or by prefix with a trailing *
    python bench/bench_scale.py --report        # table from the cache only (no compiling)

Results go to bench/RESULTS_scale.json (a cache keyed by case and mesh: a rerun compiles only what
is missing; --force recompiles) and the tables to bench/RESULTS_scale.md.

How the numbers are obtained:
* Memory comes from the program a user runs: layers scanned (`T5Config.scan_layers`, one compiled
  block, the layout T5X uses for XL/XXL), microbatches accumulated in a loop.
* XLA's cost analysis counts a loop body once, whatever its trip count, so FLOPs and collective
  bytes come from unrolled programs instead: the same step with 1 and 2 encoder+decoder layers
  (everything else at full size) and one microbatch; the cost is exactly linear in the number of
  layers, so `c(L) = c(1) + (L - 1) * (c(2) - c(1))`, times the number of microbatches.
* FLOPs are per device (the SPMD-partitioned program); the analytic count is divided by the device
  count. A mesh that splits a dimension unevenly is skipped by the partitioner's own checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
CACHE = os.path.join(HERE, "RESULTS_scale.json")
REPORT = os.path.join(HERE, "RESULTS_scale.md")
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Case:
  """One step to compile. kind: adapter / lora / full (training) or score (rank classification)."""
  name: str
  size: str
  kind: str
  batch: int
  inputs: int
  targets: int
  num_experts: Optional[int] = None  # stacked experts (training: batch is per expert)
  microbatches: Optional[int] = None
  choices: int = 0  # score cases
  base_dtype: str = "float32"
  remat: str = "none"


# The paper's recipes (elm_method.md): prompt experts batch 8, 256/128 tokens; dataset experts
# batch 128 (accumulated as 32 microbatches of 4), 512/128, Adafactor; scoring 512/64.
CASES = [
    Case("pe_xl", "xl", "adapter", 8, 256, 128),
    Case("pe_xxl", "xxl", "adapter", 8, 256, 128),
    Case("pe_xl_k8", "xl", "adapter", 8, 256, 128, num_experts=8),
    Case("pe_xl_k32", "xl", "adapter", 8, 256, 128, num_experts=32),
    Case("pe_xl_k64", "xl", "adapter", 8, 256, 128, num_experts=64),
    Case("lora_xl", "xl", "lora", 8, 256, 128),
    Case("de_full_xl", "xl", "full", 128, 512, 128, microbatches=32),
    Case("score4_xl", "xl", "score", 32, 512, 64, choices=4),
    Case("score10_xl", "xl", "score", 32, 512, 64, choices=10),
    Case("score4_xxl", "xxl", "score", 32, 512, 64, choices=4),
    Case("score10_xxl", "xxl", "score", 32, 512, 64, choices=10),
    Case("score4_xl_k8", "xl", "score", 32, 512, 64, choices=4, num_experts=8),
    Case("score10_xl_k8", "xl", "score", 32, 512, 64, choices=10, num_experts=8),
    Case("score4_xxl_k8", "xxl", "score", 32, 512, 64, choices=4, num_experts=8),
    Case("score10_xxl_k8", "xxl", "score", 32, 512, 64, choices=10, num_experts=8),
    # Memory options (section 3): bfloat16 frozen base, rematerialisation.
    Case("pe_xl_bf16", "xl", "adapter", 8, 256, 128, base_dtype="bfloat16"),
    Case("pe_xxl_bf16", "xxl", "adapter", 8, 256, 128, base_dtype="bfloat16"),
    Case("pe_xl_remat", "xl", "adapter", 8, 256, 128, remat="full"),
    Case("pe_xl_bf16_remat", "xl", "adapter", 8, 256, 128, base_dtype="bfloat16", remat="full"),
    Case("pe_xl_k8_bf16_remat", "xl", "adapter", 8, 256, 128, num_experts=8,
         base_dtype="bfloat16", remat="full"),
    Case("pe_xl_k32_bf16_remat", "xl", "adapter", 8, 256, 128, num_experts=32,
         base_dtype="bfloat16", remat="full"),
    Case("de_full_xl_remat", "xl", "full", 128, 512, 128, microbatches=32, remat="full"),
    # The same batch of 128 as 16 microbatches of 8, which splits over 8 data shards.
    Case("de_full_xl_mb16", "xl", "full", 128, 512, 128, microbatches=16),
]


@dataclasses.dataclass(frozen=True)
class Mesh:
  """`devices` split as data x model; `fsdp`: parameters also sharded over 'data' (embed axis)."""
  devices: int
  model: int
  fsdp: bool = False

  @property
  def name(self) -> str:
    return f"{self.devices // self.model}x{self.model}" + ("-fsdp" if self.fsdp else "")


# What gin/partitioning/*.gin produce on 8 devices (data_parallel, model_parallel_{2,4,8}, fsdp)
# and on 32 (model_parallel_4); one device for the single-chip question (section 3).
MESHES = [Mesh(8, 1), Mesh(8, 2), Mesh(8, 4), Mesh(8, 8), Mesh(8, 1, True), Mesh(8, 2, True),
          Mesh(32, 4), Mesh(1, 1)]


def key(case: Case, mesh: Mesh) -> str:
  return f"{case.name}@{mesh.name}@{mesh.devices}"


# ------------------------------------------------------------------------------ the child


def _model(case: Case, layers: Optional[int], scan: bool):
  from expert_t5x import experts, models, network, optimizers  # pylint: disable=g-import-not-at-top
  overrides = dict(scan_layers=scan, remat_policy=case.remat, dropout_mode="elementwise")
  if layers is not None:
    overrides.update(num_encoder_layers=layers, num_decoder_layers=layers)
  config = network.get_config(case.size, **overrides)
  expert_config = {"adapter": experts.AdapterConfig(), "lora": experts.LoraConfig(),
                   "full": experts.FullConfig(), "score": experts.AdapterConfig()}[case.kind]
  if case.kind == "full":
    opt = optimizers.Adafactor(multiply_by_parameter_scale=False, decay_rate=0.8,
                               min_dim_size_to_factor=1, global_norm_clip_threshold=0.5)
  else:
    opt = optimizers.AdamW(global_norm_clip_threshold=1.0)
  return models.EncoderDecoderModel(
      network.Transformer(config), expert_config=expert_config, optimizer_def=opt,
      loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", base_dtype=case.base_dtype)


def _abstract_expert(case: Case, model, base_abstract) -> Any:
  """Shapes of one (or K stacked) experts, without allocating them: `init_expert` on a base of
  zero-stride numpy views (it reads only shapes and the layer-norm scales)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from expert_t5x import experts  # pylint: disable=g-import-not-at-top
  views = jax.tree.map(lambda s: np.broadcast_to(np.float32(1), s.shape), base_abstract)
  one = experts.init_expert(model.expert_config, model.config, views)
  prefix = () if case.num_experts is None else (case.num_experts,)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(prefix + np.shape(x), np.float32), one)


def _lower(case: Case, mesh_spec: Mesh, layers: Optional[int], scan: bool):
  """The lowered step of `case` (full depth when `layers` is None) on the current devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from expert_t5x import optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
  model = _model(case, layers, scan)
  lengths = {"encoder_input_tokens": case.inputs, "decoder_input_tokens": case.targets}
  shapes = {k: (case.batch, v) for k, v in lengths.items()}
  variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  axes = partitioning.params_logical_axes(variables)
  flat_model = _model(case, layers, False)  # experts are laid out per block, whatever the base
  flat_vars = jax.eval_shape(
      lambda: flat_model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  axes_all = {**partitioning.params_logical_axes(flat_vars), **axes}
  rules = partitioning.standard_logical_axis_rules(
      parameter_partitioning_dims=2 if mesh_spec.fsdp else 1)
  part = partitioning.PjitPartitioner(num_partitions=mesh_spec.model, logical_axis_rules=rules)
  base_sh = part.sharding_for(partitioning.logical_axes_tree(variables["params"], axes))
  base = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, model.base_dtype_jnp, sharding=sh),
      variables["params"], base_sh)
  i32 = jnp.int32
  if case.kind == "score":
    return _lower_score(case, model, part, base, flat_vars["params"])
  micro = case.microbatches if layers is None else None
  batch = case.batch if layers is None or not case.microbatches else case.batch // case.microbatches
  tr = trainer.Trainer(model, part, optimizers.create_learning_rate_scheduler("constant", 1e-4, 0),
                       num_microbatches=micro, num_experts=case.num_experts)
  trainable = base if case.kind == "full" else _abstract_expert(case, model, flat_vars["params"])
  if case.kind == "full":
    trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), trainable)
  tr.compile(trainable, base_sh, axes_all)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       tr.abstract_state, tr.state_sharding)
  prefix = () if case.num_experts is None else (case.num_experts,)
  bsh = tr.batch_sharding()
  feats = {"encoder_input_tokens": case.inputs, "decoder_input_tokens": case.targets,
           "decoder_target_tokens": case.targets}
  data = {k: jax.ShapeDtypeStruct(prefix + (batch, v), i32, sharding=bsh) for k, v in feats.items()}
  data["decoder_loss_weights"] = jax.ShapeDtypeStruct(prefix + (batch, case.targets), jnp.float32,
                                                      sharding=bsh)
  keys = jax.ShapeDtypeStruct(prefix + (2,), jnp.uint32)
  budget = jax.ShapeDtypeStruct(prefix, i32)
  full_base = None if case.kind == "full" else base
  return tr._step_fn.lower(full_base, state, data, keys, budget)  # pylint: disable=protected-access


def _lower_score(case: Case, model, part, base, flat_base):
  """Rank classification of `case.choices` choices per input, base alone or K stacked experts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax.linen import partitioning as nn_partitioning  # pylint: disable=g-import-not-at-top
  bsh = part.data_sharding
  stacked = case.num_experts is not None
  expert = index = None
  if stacked:
    expert = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=part.replicated),
        _abstract_expert(case, model, flat_base))
    index = jax.ShapeDtypeStruct((case.batch,), jnp.int32, sharding=bsh)
  inputs = jax.ShapeDtypeStruct((case.batch, case.inputs), jnp.int32, sharding=bsh)
  choices = jax.ShapeDtypeStruct((case.batch, case.choices, case.targets), jnp.int32, sharding=bsh)

  def score(b, e, x, c, ix):
    return model.score_choices(b, x, c, expert=e, expert_index=ix)
  with jax.set_mesh(part.mesh), nn_partitioning.axis_rules(part.rules):
    return jax.jit(score, out_shardings=bsh).lower(base, expert, inputs, choices, index)


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8, "s64": 8}


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of each collective's result in an optimised HLO module (per device, per execution)."""
  out = {c: 0 for c in _COLLECTIVES}
  # `name = <result shape(s)> op(...)`; tuple shapes may hold `/*index=N*/` comments.
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(_COLLECTIVES) +
                       r")(-start)?\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      total += size * _DTYPE_BYTES.get(dtype, 4)
    out[m.group(2)] += total
  return out


def _costs(compiled) -> tuple[float, dict[str, int]]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), collective_bytes(compiled.as_text())


def measure(case: Case, mesh_spec: Mesh) -> dict[str, Any]:
  """Memory of the full program, FLOPs and collectives extrapolated from 1- and 2-layer ones."""
  from expert_t5x import flops, network  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  compiled = _lower(case, mesh_spec, None, True).compile()
  mem = compiled.memory_analysis()
  compile_s = time.perf_counter() - start
  row = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
         "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
         "generated_code": mem.generated_code_size_in_bytes}
  row["peak"] = row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
  one, two = (_costs(_lower(case, mesh_spec, n, False).compile()) for n in (1, 2))
  layers = network.get_config(case.size).num_encoder_layers
  reps = case.microbatches or 1
  row["flops_hlo"] = reps * (one[0] + (layers - 1) * (two[0] - one[0]))
  row["collective_bytes"] = {c: reps * (one[1][c] + (layers - 1) * (two[1][c] - one[1][c]))
                             for c in _COLLECTIVES}
  model = _model(case, None, False)
  expert_config = None if case.kind == "score" and not case.num_experts else model.expert_config
  row["flops_analytic"] = flops.step_flops(
      model.config, {"inputs": case.inputs, "targets": case.targets}, _step_kind(case),
      case.batch * ((case.num_experts or 1) if case.kind != "score" else 1), expert_config,
      num_choices=case.choices) / mesh_spec.devices
  row["compile_s"] = time.perf_counter() - start
  row["compile_full_s"] = compile_s
  return row


def replicated_flops(case: Case, mesh_spec: Mesh) -> float:
  """Per-device FLOPs of the adapters' products that every model shard repeats.

  Adapter weights are replicated (`partitioning.standard_logical_axis_rules`: the `adapter` axis
  is not sharded) and act on activations that are replicated over 'model', so each of the
  `model` shards of a data shard computes them whole; the analytic count divides them by every
  device. LoRA's products are partly split (lora_b follows its base kernel) and are not counted.
  """
  if mesh_spec.model == 1 or case.kind not in ("adapter", "score") or (
      case.kind == "score" and not case.num_experts):
    return 0.0
  from expert_t5x import flops  # pylint: disable=g-import-not-at-top
  model = _model(case, None, False)
  args = (model.config, {"inputs": case.inputs, "targets": case.targets}, _step_kind(case),
          case.batch * ((case.num_experts or 1) if case.kind != "score" else 1))
  extra = (flops.step_flops(*args, model.expert_config, num_choices=case.choices) -
           flops.step_flops(*args, None, num_choices=case.choices))
  return extra * (mesh_spec.model - 1) / mesh_spec.devices


def _step_kind(case: Case) -> str:
  return {"adapter": "frozen_base", "lora": "frozen_base", "full": "full",
          "score": "score"}[case.kind]


def child(names: list[str], meshes: list[str], out: str) -> None:
  """Runs in a subprocess with the fake devices; appends one JSON line per (case, mesh)."""
  cases = {c.name: c for c in CASES}
  by_name = {m.name: m for m in MESHES}
  for mesh_name in meshes:
    for name in names:
      case, mesh_spec = cases[name], by_name[mesh_name]
      try:
        row = measure(case, mesh_spec)
      except Exception as e:  # pylint: disable=broad-except
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      row.update(case=name, mesh=mesh_name, devices=mesh_spec.devices)
      with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
      print(f"{name} on {mesh_name}: " + (row.get("error") or
            f"peak {row['peak'] / GIB:.2f} GiB, {row['compile_s']:.0f}s"), flush=True)


# ----------------------------------------------------------------------------- the parent


def load_cache() -> dict[str, dict]:
  if not os.path.exists(CACHE):
    return {}
  with open(CACHE, encoding="utf-8") as f:
    return json.load(f)


def save_cache(cache: dict[str, dict]) -> None:
  from expert_t5x import file_io  # pylint: disable=g-import-not-at-top (after the sys.path insert)
  file_io.atomic_write_json(CACHE, dict(sorted(cache.items())), indent=1)


def run_missing(cases: list[Case], meshes: list[Mesh], force: bool) -> dict[str, dict]:
  cache = load_cache()
  for devices in sorted({m.devices for m in meshes}):
    group = [m for m in meshes if m.devices == devices]
    todo = {m.name: [c.name for c in cases if force or key(c, m) not in cache] for m in group}
    todo = {m: names for m, names in todo.items() if names}
    for mesh_name, names in todo.items():
      out = os.path.join(HERE, f".scale_{devices}.jsonl")
      if os.path.exists(out):
        os.remove(out)
      env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                 PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
      subprocess.run([sys.executable, __file__, "--child", ",".join(names), "--meshes", mesh_name,
                      "--out", out], env=env, check=False)
      if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
          for line in f:
            row = json.loads(line)
            cache[f"{row['case']}@{row['mesh']}@{row['devices']}"] = row
        os.remove(out)
        save_cache(cache)
  return cache


# Per-device memory of the chips the paper's users have (GiB).
DEVICES = {"TPU v5e 16 GiB": 16.0, "TPU v4 32 GiB": 32.0, "A100/H100 80 GB": 80e9 / GIB,
           "H200 141 GB": 141e9 / GIB}


def _gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def render(cache: dict[str, dict]) -> str:
  """The compiled table, the fits table and the largest stacked K, as markdown."""
  lines = ["| case | mesh (devices) | arguments | outputs | temporaries | peak live (GiB) | "
           "HLO GFLOP/device | analytic | HLO/analytic | HLO/(analytic + replicated adapters) | "
           "collectives GiB (AR/AG/RS/A2A/CP) | compile s |", "|" + "---|" * 12]
  for case in CASES:
    for mesh_spec in MESHES:
      row = cache.get(key(case, mesh_spec))
      if row is None:
        continue
      label = f"{case.name} | {mesh_spec.name} ({mesh_spec.devices})"
      if "error" in row:
        lines.append(f"| {label} | not compiled: {row['error'][:120]} |" + " |" * 9)
        continue
      coll = "/".join(f"{row['collective_bytes'][c] / GIB:.2f}" for c in _COLLECTIVES)
      adjusted = row["flops_analytic"] + replicated_flops(case, mesh_spec)
      lines.append(
          f"| {label} | {_gib(row['arguments'])} | {_gib(row['outputs'])} | "
          f"{_gib(row['temporaries'])} | {_gib(row['peak'])} | {row['flops_hlo'] / 1e9:.0f} | "
          f"{row['flops_analytic'] / 1e9:.0f} | {row['flops_hlo'] / row['flops_analytic']:.3f} | "
          f"{row['flops_hlo'] / adjusted:.3f} | {coll} | {row['compile_s']:.0f} |")
  lines += ["", "Smallest compiled mesh whose per-device peak fits (fewest devices, then least "
            "memory); '-' none of the compiled meshes fits.", "",
            "| case | " + " | ".join(DEVICES) + " |", "|---|" + "---|" * len(DEVICES)]
  for case in CASES:
    rows = [(m, cache.get(key(case, m))) for m in MESHES]
    rows = [(m, r) for m, r in rows if r and "error" not in r]
    if not rows:
      continue
    cells = []
    for cap in DEVICES.values():
      fits = sorted((m.devices, r["peak"], m.name) for m, r in rows if r["peak"] <= cap * GIB)
      cells.append(f"{fits[0][2]} ({fits[0][1] / GIB:.1f})" if fits else "-")
    lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
  lines += ["", largest_k(cache)]
  return "\n".join(lines) + "\n"


def largest_k(cache: dict[str, dict]) -> str:
  """Largest K of stacked XL prompt experts per device: peak(K) = a + b K fitted to the compiled
  K = 8, 32, 64 programs on each mesh (the batch is 8 examples per expert, the paper's)."""
  out = ["| mesh | peak(K) GiB fitted | " + " | ".join(DEVICES) + " |",
         "|---|---|" + "---|" * len(DEVICES)]
  import numpy as np  # pylint: disable=g-import-not-at-top
  for suffix in ("", "_bf16_remat"):
    for mesh_spec in MESHES:
      points = [(k, cache.get(key(c, mesh_spec))) for k, c in
                ((k, next((c for c in CASES if c.name == f"pe_xl_k{k}{suffix}"), None))
                 for k in (8, 32, 64)) if c is not None]
      points = [(k, r["peak"] / GIB) for k, r in points if r and "error" not in r]
      if len(points) < 2:
        continue
      b, a = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
      cells = [str(max(0, int((cap - a) // b))) if b > 0 else "?" for cap in DEVICES.values()]
      out.append(f"| {mesh_spec.name} ({mesh_spec.devices}){' bf16+remat' if suffix else ''} | "
                 f"{a:.2f} + {b:.3f} K | " + " | ".join(cells) + " |")
  return "\n".join(out)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="",
                      help="comma-separated case names (a trailing * selects by prefix)")
  parser.add_argument("--meshes", default="", help="comma-separated mesh names, e.g. 8x1,4x2")
  parser.add_argument("--force", action="store_true", help="recompile cached entries")
  parser.add_argument("--report", action="store_true", help="only print the tables from the cache")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child is not None:
    child(args.child.split(","), args.meshes.split(","), args.out)
    return
  prefixes = [p for p in args.only.split(",") if p]
  cases = [c for c in CASES if not prefixes or any(
      c.name == p or (p.endswith("*") and c.name.startswith(p[:-1])) for p in prefixes)]
  meshes = [m for m in MESHES if not args.meshes or m.name in args.meshes.split(",")]
  cache = load_cache() if args.report else run_missing(cases, meshes, args.force)
  text = render(cache)
  print(text)
  with open(REPORT, "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  main(sys.argv[1:])
