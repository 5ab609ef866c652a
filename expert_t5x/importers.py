"""Importers of released experts into Expert format v1: the paper's adapter `.pt` files and PEFT
LoRA.

* Paper adapters (reference/elm_method §3): every trainable tensor saved as
  `adapter_params/<param_name>.pt` (or one state-dict `.pt`), with HF T5 names whose adapter part
  embeds the training-task key, e.g.
  `encoder.block.3.layer.1.adapter_controller.adapters.<task>.down_sampler.weight`. Adapters sit on
  the self-attention output (layer.0) and the MLP output (encoder layer.1, decoder layer.2);
  `down_sampler` maps to `wi`, `up_sampler` to `wo`; HF `[out, in]` weights are transposed to T5X
  `[in, out]` kernels. Trainable layer-norm scales map to T5X's names. Their initialisation is not
  recorded, so `init_seed` is None (merges then use θ as the task vector).
* PEFT LoRA: `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight [r, in]`,
  `lora_B.weight [out, r]`) + `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`,
  `alpha_pattern`). `lora_a = A.T [in, r]`, `lora_b = B.T [r, out]`, so (α/r)·lora_a@lora_b =
  ((α/r)·B@A).T, PEFT's ΔW.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from expert_t5x import expert_format


class ImportError_(ValueError):
  """A released expert that cannot be converted (the message says why and what to do)."""


# HF T5 sub-layer index -> (T5X adapter site, T5X layer-norm name), per stack.
_ADAPTER_SITES = {("encoder", 0): "attention_adapter", ("encoder", 1): "mlp_adapter",
                  ("decoder", 0): "self_attention_adapter", ("decoder", 2): "mlp_adapter"}
_LAYER_NORMS = {("encoder", 0): "pre_attention_layer_norm", ("encoder", 1): "pre_mlp_layer_norm",
                ("decoder", 0): "pre_self_attention_layer_norm",
                ("decoder", 1): "pre_cross_attention_layer_norm",
                ("decoder", 2): "pre_mlp_layer_norm"}
_FINAL_NORMS = {"encoder": "encoder/encoder_norm/scale", "decoder": "decoder/decoder_norm/scale"}
_ADAPTER_RE = re.compile(
    r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.adapter_controller\.adapters\."
    r"(?P<task>.+)\.(down_sampler|up_sampler)\.(weight|bias)$")
_LN_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.layer_norm\.weight$")
_FINAL_RE = re.compile(r"^(encoder|decoder)\.final_layer_norm\.weight$")


def _strip(name: str) -> str:
  for prefix in ("module.", "model."):
    if name.startswith(prefix):
      name = name[len(prefix):]
  return name


def convert_paper_adapter(
    state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Maps a paper adapter state dict (HF names) to T5X expert paths; returns (flat params, info)."""
  flat: dict[str, np.ndarray] = {}
  tasks, bottlenecks, unknown = set(), set(), []
  for raw, value in state.items():
    name, value = _strip(raw), np.asarray(value, np.float32)
    if m := _ADAPTER_RE.match(name):
      stack, block, sub, proj, kind = m.group(1), int(m.group(2)), int(
          m.group(3)), m.group(5), m.group(6)
      site = _ADAPTER_SITES.get((stack, sub))
      if site is None:
        raise ImportError_(
            f"Adapter '{raw}' sits on {stack} sub-layer {sub}, where the paper has none "
            f"(expected self-attention or feed-forward).")
      tasks.add(m.group("task"))
      leaf = "kernel" if kind == "weight" else "bias"
      out = value.T if kind == "weight" else value
      flat[f"{stack}/layers_{block}/{site}/{'wi' if proj == 'down_sampler' else 'wo'}/{leaf}"] = out
      if proj == "down_sampler" and kind == "weight":
        bottlenecks.add(value.shape)
    elif m := _LN_RE.match(name):
      stack, block, sub = m.group(1), int(m.group(2)), int(m.group(3))
      flat[f"{stack}/layers_{block}/{_LAYER_NORMS[(stack, sub)]}/scale"] = value
    elif m := _FINAL_RE.match(name):
      flat[_FINAL_NORMS[m.group(1)]] = value
    else:
      unknown.append(raw)
  if unknown:
    raise ImportError_(
        f"{len(unknown)} tensors are not paper adapter or layer-norm parameters, e.g. "
        f"{unknown[:3]}; expected names like 'encoder.block.0.layer.1.adapter_controller."
        f"adapters.<task>.down_sampler.weight'.")
  if not any("adapter" in k for k in flat):
    raise ImportError_(
        "No adapter tensors found (names containing 'adapter_controller.adapters.').")
  if len(tasks) != 1:
    raise ImportError_(
        f"Adapter tensors embed {len(tasks)} task keys {sorted(tasks)[:4]}; import one "
        f"expert (one task key) at a time.")
  if len(bottlenecks) != 1:
    raise ImportError_(
        f"Adapters have several shapes {sorted(bottlenecks)}; expected one bottleneck size.")
  bottleneck, d_model = next(iter(bottlenecks))
  info = {"task_key": next(iter(tasks)), "d_model": d_model, "bottleneck": bottleneck,
          "reduction_factor": d_model // bottleneck,
          "layer_norms": any(k.endswith("/scale") for k in flat)}
  return dict(sorted(flat.items())), info


def load_pt_state(path: str) -> dict[str, np.ndarray]:
  """Reads a `.pt` state dict, or a directory of per-parameter `<name>.pt` tensors (needs torch)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError_("Reading .pt files needs PyTorch (pip install 'expert_t5x[parity]').") from e
  def load(p):
    try:
      return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  (torch raises many types for bad files)
      raise ValueError(
          f"'{p}' is not a PyTorch state dict of the paper's adapters "
          f"({type(e).__name__}); pass the expert's adapter .pt file or directory.") from None
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.pt")))
    if not files:
      raise ImportError_(f"'{path}' has no .pt files; pass the expert's adapter_params directory.")
    return {os.path.basename(f)[:-len(".pt")]: load(f).float().numpy() for f in files}
  state = load(path)
  if not isinstance(state, Mapping):
    raise ImportError_(f"'{path}' holds a {type(state).__name__}, expected a state dict.")
  return {k: v.float().numpy() for k, v in state.items()}


def _infer_provenance(path: str) -> dict[str, Any]:
  # The paper's layout: expert_weights/<dataset>/<prompt>/adapter_params[/<name>.pt].
  parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
  if "adapter_params" in parts:
    i = parts.index("adapter_params")
    if i >= 2:
      return {"dataset": parts[i - 2], "prompt": parts[i - 1]}
  return {}


def import_paper_adapter(path: str, output_dir: str, *, base_fingerprint: str | None,
                         base_config_name: str | None = None,
                         provenance: Mapping[str, Any] | None = None,
                         keys: Sequence[Mapping[str, Any]] | None = None,
                         overwrite: bool = False) -> str:
  """Converts a paper adapter (`adapter_params/` directory or a `.pt` state dict); returns the
  content hash."""
  flat, info = convert_paper_adapter(load_pt_state(path))
  prov = {"task": None, "dataset": None, "subset": None, "prompt": None, "role": "train"}
  prov.update(_infer_provenance(path))
  prov.update({k: v for k, v in (provenance or {}).items() if v is not None})
  if prov["task"] is None and prov["dataset"] and prov["prompt"]:
    prov["task"] = f"{prov['dataset']}_{prov['prompt']}"
  config = {"kind": "adapter", "reduction_factor": info["reduction_factor"], "zero_init_up": False,
            "train_layer_norms": info["layer_norms"], "init_seed": None}
  meta = expert_format.build_metadata("adapter",
                                      config,
                                      base_fingerprint=base_fingerprint,
                                      base_config_name=base_config_name,
                                      provenance=[prov],
                                      training={
                                          "imported_from": "elm_adapter_pt",
                                          "source": os.path.basename(path), "init_seed": None,
                                          "non_linearity": "gelu_new", **info
                                      })
  return expert_format.save_expert(output_dir, flat, meta, keys, overwrite=overwrite)


# ----------------------------------------------------------------------------
# PEFT LoRA.
# ----------------------------------------------------------------------------

_PEFT_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_HF_MODULES = [
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])$"),
     "encoder/layers_{}/attention/{}"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])$"),
     "decoder/layers_{}/self_attention/{}"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])$"),
     "decoder/layers_{}/encoder_decoder_attention/{}"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wi|wo)$"),
     "encoder/layers_{}/mlp/{}"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi_0|wi_1|wi|wo)$"),
     "decoder/layers_{}/mlp/{}"),
]
_PROJ = {"q": "query", "k": "key", "v": "value", "o": "out"}


def hf_module_to_t5x(module: str) -> str:
  """`encoder.block.3.layer.0.SelfAttention.q` -> `encoder/layers_3/attention/query`."""
  if module == "lm_head":
    return "decoder/logits_dense"
  for pattern, template in _HF_MODULES:
    if m := pattern.match(module):
      return template.format(m.group(1), _PROJ.get(m.group(2), m.group(2)))
  raise ImportError_(
      f"LoRA module '{module}' is not a T5 attention/MLP/lm_head Linear; expected names like "
      f"'encoder.block.0.layer.0.SelfAttention.q'.")


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
  """A PEFT per-module override (alpha_pattern): the first pattern, in file order, that matches the
  whole module name or a dotted suffix of it ('k' matches '...SelfAttention.k', not
  '...block...q')."""
  for pattern, value in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return value
  return None


def convert_peft_lora(
    state: Mapping[str, np.ndarray],
    adapter_config: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Maps PEFT LoRA tensors to `<module>/lora_a [in, r]`, `<module>/lora_b [r, out]`; returns (flat,
  config)."""
  if adapter_config.get("peft_type", "LORA") != "LORA":
    raise ImportError_(
        f"adapter_config.json has peft_type {adapter_config.get('peft_type')!r}; only LORA "
        f"adapters can be imported.")
  if adapter_config.get("rank_pattern"):
    raise ImportError_(
        "adapter_config.json sets rank_pattern (per-module ranks); expert_t5x LoRA experts have "
        "one rank. Re-save the adapter with a single r.")
  if adapter_config.get("use_dora"):
    raise ImportError_("DoRA adapters (use_dora) are not LoRA deltas; they cannot be imported.")
  rank = int(adapter_config["r"])
  alpha = float(adapter_config.get("lora_alpha", rank))
  base_scale = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank
  alpha_pattern = adapter_config.get("alpha_pattern") or {}
  factors: dict[str, dict[str, np.ndarray]] = {}
  for name, value in state.items():
    m = _PEFT_RE.match(name)
    if m is None:
      raise ImportError_(f"Tensor '{name}' is not a LoRA factor (…lora_A.weight / …lora_B.weight); "
                         f"modules_to_save and bias training cannot be imported.")
    factors.setdefault(m.group("module"), {})[m.group("ab")] = np.asarray(value, np.float32)
  flat, sites = {}, set()
  for module, ab in sorted(factors.items()):
    if set(ab) != {"A", "B"}:
      raise ImportError_(
          f"LoRA module '{module}' has only lora_{''.join(ab)}; both A and B are needed.")
    scale = base_scale
    a = _pattern_value(alpha_pattern, module)
    if a is not None:
      scale = float(a) / (math.sqrt(rank) if adapter_config.get("use_rslora") else rank)
    path = hf_module_to_t5x(module)
    # Fold the PEFT scale into B so that the stored expert has scale 1 (alpha = rank).
    flat[f"{path}/lora_a"] = ab["A"].T
    flat[f"{path}/lora_b"] = (scale * ab["B"].astype(np.float64)).T.astype(np.float32)
    sites.add(re.sub(r"layers_\d+", r"layers_\\d+", path))
  targets = [f"^{s}$" for s in sorted(sites)]
  config = {
      "kind": "lora", "rank": rank, "alpha": float(rank), "dropout_rate": 0.0, "targets": targets,
      "init_seed": None
  }
  return flat, config


def import_peft_lora(directory: str, output_dir: str, *, base_fingerprint: str | None,
                     base_config_name: str | None = None,
                     provenance: Mapping[str, Any] | None = None,
                     keys: Sequence[Mapping[str, Any]] | None = None,
                     overwrite: bool = False) -> str:
  """Converts a PEFT LoRA directory (`adapter_model.safetensors` + `adapter_config.json`); returns
  the hash."""
  from safetensors.numpy import load_file
  weights = os.path.join(directory, "adapter_model.safetensors")
  cfg_path = os.path.join(directory, "adapter_config.json")
  for p in (weights, cfg_path):
    if not os.path.isfile(p):
      raise ImportError_(f"'{directory}' is not a PEFT adapter: {os.path.basename(p)} is missing.")
  with open(cfg_path, encoding="utf-8") as f:
    adapter_config = json.load(f)
  flat, config = convert_peft_lora(load_file(weights), adapter_config)
  prov = {"task": None, "dataset": None, "subset": None, "prompt": None, "role": "train"}
  prov.update({k: v for k, v in (provenance or {}).items() if v is not None})
  meta = expert_format.build_metadata(
      "lora",
      config,
      base_fingerprint=base_fingerprint,
      base_config_name=base_config_name,
      provenance=[prov],
      training={
          "imported_from": "peft_lora", "peft_config": adapter_config, "init_seed": None,
          "base_model_name_or_path": adapter_config.get("base_model_name_or_path")
      })
  return expert_format.save_expert(output_dir, flat, meta, keys, overwrite=overwrite)


# ----------------------------------------------------------------------------
# CLI: expert-t5x import
# ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="expert-t5x import",
      description="Convert released experts (paper adapter .pt, PEFT LoRA) or an upstream "
      "T5X run (t5x.train with gin/t5x/) to Expert format v1.")
  p.add_argument("kind", choices=("paper-adapter", "peft-lora", "t5x"))
  p.add_argument("source",
                 help="adapter_params directory or .pt state dict; a PEFT adapter directory; "
                 "or a t5x.train MODEL_DIR (its latest checkpoint) / checkpoint_<step>")
  p.add_argument("--output", required=True, help="output expert directory")
  p.add_argument("--base-fingerprint", help="fingerprint of the base the expert was trained on")
  p.add_argument(
      "--base", help="base checkpoint; its fingerprint is computed (instead of --base-fingerprint)")
  p.add_argument("--base-config", help="base config name (e.g. xl)")
  for field in ("task", "dataset", "subset", "prompt"):
    p.add_argument(f"--{field}", help=f"provenance {field}")
  p.add_argument("--keys", help="keys.jsonl to attach (retrieval keys)")
  p.add_argument("--num-keys", type=int, default=100,
                 help="t5x: retrieval keys drawn from the trained task's train split")
  p.add_argument("--key-seed", type=int, default=0, help="t5x: seed of that draw")
  p.add_argument("--overwrite", action="store_true")
  return p


def import_main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `expert-t5x import`."""
  args = _parser().parse_args(argv)
  if args.kind == "t5x":
    return _import_t5x(args)
  try:
    fingerprint = args.base_fingerprint
    if args.base:
      from expert_t5x import checkpoint_importer
      fingerprint = checkpoint_importer.base_fingerprint(args.base)
    if not fingerprint:
      raise ImportError_(
          "Pass --base-fingerprint or --base so the library can check the expert's base.")
    keys = None
    if args.keys:
      with open(args.keys, encoding="utf-8") as f:
        keys = [json.loads(line) for line in f if line.strip()]
    prov = {k: getattr(args, k) for k in ("task", "dataset", "subset", "prompt")}
    fn = import_paper_adapter if args.kind == "paper-adapter" else import_peft_lora
    content_hash = fn(args.source,
                      args.output,
                      base_fingerprint=fingerprint,
                      base_config_name=args.base_config,
                      provenance=prov,
                      keys=keys,
                      overwrite=args.overwrite)
  except (ImportError_, ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"expert-t5x import: {e}", file=sys.stderr)
    return 1
  print(f"imported {args.source} -> {args.output} ({content_hash[:12]})")
  return 0


def _import_t5x(args: argparse.Namespace) -> int:
  """The base, task and expert config come from the run's config.gin (--base / --task override)."""
  from expert_t5x import t5x_io  # pylint: disable=g-import-not-at-top
  try:
    content_hash = t5x_io.import_main(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"expert-t5x import t5x: {e}", file=sys.stderr)
    return 1
  print(f"imported {args.source} -> {args.output} ({content_hash[:12]})")
  return 0


if __name__ == "__main__":
  sys.exit(import_main())
