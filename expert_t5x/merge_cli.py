"""The `expert-t5x merge` command: picks the inputs (directories, library ids, a retrieval file or a
recipe) and the method from flags, then calls `merging.merge_expert_dirs`.

The method choices, parameter names and defaults come from `merging.METHOD_CONFIGS`. A rerun of a
recipe (`--recipe`) merges beside the output and replaces it only if it reproduced the recipe's
output hash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from expert_t5x import expert_format
from expert_t5x import merging
from expert_t5x import validation


def _load_base(path: str | None, need_init: bool, metas: Sequence[Mapping[str, Any]]):
  if path is None:
    return None, None
  from expert_t5x import base_models  # heavy; only when --base is given
  ckpt = base_models.read_base_checkpoint(path)
  return ckpt.params, (merging.adapter_init_params(metas, ckpt.params, ckpt.config)
                       if need_init else None)


def _resolve_inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
  if args.recipe:
    recipe = merging.read_recipe(args.recipe)
    wanted = [i["content_hash"] for i in recipe["inputs"]]
    pool = _candidate_dirs(args)
    by_hash = {}
    for name, d in pool:
      by_hash.setdefault(expert_format.read_metadata(d)["content_hash"], (name, d))
    missing = [h[:12] for h in wanted if h not in by_hash]
    if missing:
      raise merging.MergeError(f"Recipe inputs {missing} were not found among --experts/--library; "
                               "pass the experts it was made from.")
    return [by_hash[h][1] for h in wanted], [by_hash[h][0] for h in wanted]
  pool = _candidate_dirs(args)
  if args.retrieval:
    ranked = _ranked_from_retrieval(args.retrieval, args.task)
    if args.top_k > len(ranked):
      raise validation.UsageError(
          f"--top-k {args.top_k} exceeds the {len(ranked)} experts ranked in "
          f"{args.retrieval}; pass --top-k {len(ranked)} or less.")
    ids = ranked[:args.top_k]
    lib = _library(args)
    return [lib.expert_dir(i) for i in ids], ids
  if not pool:
    raise merging.MergeError(
        "Nothing to merge: pass --experts DIR..., --library LIB --ids ID..., or "
        "--retrieval FILE.")
  return [d for _, d in pool], [n for n, _ in pool]


def _library(args: argparse.Namespace) -> Any:
  from expert_t5x import library  # pylint: disable=g-import-not-at-top
  if not args.library:
    raise merging.MergeError("--retrieval and --ids need --library.")
  return library.Library(args.library)


def _candidate_dirs(args: argparse.Namespace) -> list[tuple[str, str]]:
  pool = [(d, d) for d in args.experts or []]
  if args.library and (args.ids or args.recipe):
    lib = _library(args)
    pool += [(i, lib.expert_dir(i)) for i in (args.ids or lib.ids())]
  return pool


def _ranked_from_retrieval(path: str, task: str | None) -> list[str]:
  """Ranked expert ids of one task: a retrieval file's candidates (by votes) or an oracle file's
  (`expert-t5x eval --oracle --output`, by accuracy)."""
  validation.existing_file("--retrieval", path, "a retrieval JSON from `expert-t5x retrieve`")
  damaged = validation.DataError(
      f"--retrieval '{path}' is not a retrieval or oracle file (expected "
      "{'results': [{'task', 'candidates': [{'expert', ...}]}]}); pass "
      "the --output of `expert-t5x retrieve` or `eval --oracle`.")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise damaged from None
  if not isinstance(data, dict):
    raise damaged
  results = data.get("results") or data.get("prompts") or [data]
  if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
    raise damaged
  if task is not None:
    results = [r for r in results if r.get("task") == task]
  if len(results) != 1:
    raise merging.MergeError(f"Retrieval file '{path}' has {len(results)} results"
                             + (f" for task {task!r}" if task else "") + "; pick one with --task.")
  candidates = results[0].get("candidates")
  if not isinstance(candidates, list) or not all(
      isinstance(c, dict) and isinstance(c.get("expert"), str) for c in candidates):
    raise damaged
  return [c["expert"] for c in candidates]


def _method_help() -> str:
  return "; ".join(c.__doc__.split("\n")[0].rstrip(".") for c in merging.METHOD_CONFIGS.values())


def _parser() -> argparse.ArgumentParser:
  ties, dare = merging.TIES, merging.DARE  # Their defaults are the help's.
  p = argparse.ArgumentParser(prog="expert-t5x merge",
                              description="Merge experts into a new expert (with recipe).")
  p.add_argument("--method", choices=merging.METHODS, default="uniform", help=_method_help())
  p.add_argument("--experts", nargs="+", help="expert directories")
  p.add_argument("--library", help="expert library (with --ids, --retrieval or --recipe)")
  p.add_argument("--ids", nargs="+", help="library expert ids")
  p.add_argument("--retrieval",
                 help="retrieval JSON from `expert-t5x retrieve` (or an oracle JSON from "
                 "`expert-t5x eval --oracle --output`): merge its top-k candidates")
  p.add_argument("--task", help="which task of the retrieval file")
  p.add_argument("--top-k", type=int, default=3)
  p.add_argument("--recipe",
                 help="re-run a recipe (a recipe JSON or a merged expert's expert.json)")
  p.add_argument(
      "--weights",
      type=float,
      nargs="+",
      help="one finite weight per expert (normalised to sum 1; a negative weight subtracts "
      "that expert: task negation; the sum must stay positive)")
  p.add_argument("--lam",
                 type=float,
                 help=f"λ for task_arithmetic, ties and dare (default {ties.lam}; "
                 "finite; a negative λ negates the task vectors: task negation)")
  p.add_argument("--density", type=float, help=f"TIES density (default {ties.density})")
  p.add_argument("--per-tensor", action="store_true", default=None,
                 help="TIES: trim per tensor instead of per expert")
  p.add_argument("--sign-method", choices=merging.SIGN_METHODS,
                 help=f"TIES (and dare --combine ties) sign election (default {ties.sign_method})")
  p.add_argument("--drop", type=float, help=f"DARE drop probability (default {dare.drop})")
  p.add_argument("--seed", type=int, help=f"DARE mask seed (default {dare.seed})")
  p.add_argument("--combine", choices=merging.DARE_COMBINES,
                 help=f"DARE: combine linearly or TIES-style (default {dare.combine})")
  p.add_argument("--svd-rank", type=int, help="TIES/DARE on LoRA: refactor ΔW to this rank")
  p.add_argument("--base",
                 help="base checkpoint (needed by task_arithmetic/ties/dare on adapter experts)")
  p.add_argument("--adapter-reference", choices=merging.ADAPTER_REFERENCES, default="auto")
  p.add_argument("--output", required=True, help="output expert directory")
  p.add_argument("--recipe-out", help="also write the recipe to this JSON file")
  p.add_argument("--overwrite", action="store_true")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `expert-t5x merge`."""
  args = _parser().parse_args(argv)
  try:
    if args.top_k is not None:
      validation.positive_int("--top-k", args.top_k)
    if args.svd_rank is not None:
      validation.positive_int("--svd-rank", args.svd_rank, "or leave it out to keep LoRA factors")
    dirs, names = _resolve_inputs(args)
    validation.output_dir("--output", args.output, dirs)
    if args.recipe_out:
      validation.output_file("--recipe-out", args.recipe_out)
    method, params, svd_rank, ref = args.method, {}, args.svd_rank, args.adapter_reference
    if args.recipe:
      recipe = merging.read_recipe(args.recipe)
      method, params = recipe["method"], dict(recipe["params"])
      svd_rank = (recipe.get("lora") or {}).get("rank") if (recipe.get("lora") or
                                                            {}).get("output") == "svd" else None
      ref = (recipe.get("reference") or {}).get("adapter", "auto")
    else:
      params = {key: getattr(args, key) for key in merging.PARAM_NAMES
                if getattr(args, key) is not None}
    metas = [expert_format.read_metadata(d) for d in dirs]
    absolute = merging.method_config(method, params).absolute  # (No task vectors, no references.)
    base, init = _load_base(args.base, not absolute and ref != "zero", metas)
    wanted = recipe.get("output_hash") if args.recipe else None
    old_format = bool(args.recipe) and recipe.get("format", 1) < merging.RECIPE_FORMAT
    if wanted and os.path.exists(args.output) and not args.overwrite:
      raise merging.MergeError(f"'{args.output}' exists; pass --overwrite or another --output.")
    # A rerun is checked before it replaces anything: merged beside the output, moved in if
    # reproduced.
    target = f"{args.output.rstrip(os.sep)}.rerun-{os.getpid()}" if wanted else args.output
    recipe = merging.merge_expert_dirs(dirs, target, method, base_params=base, init_params=init,
                               adapter_reference=ref, svd_rank=svd_rank, input_names=names,
                               overwrite=args.overwrite, **params)
    if wanted:
      merging.replace_if_reproduced(
          target, args.output, recipe["output_hash"], wanted, args.recipe,
          " (the recipe is of an earlier format, whose merges may differ bitwise)"
          if old_format else "")
  except (merging.MergeError, ValueError, OSError, KeyError, TypeError, AttributeError) as e:
    # (KeyError/TypeError/AttributeError: a recipe JSON missing fields or of the wrong types.)
    return validation.report("expert-t5x merge", e)
  if args.recipe_out:
    merging.write_recipe(args.recipe_out, recipe)
  print(f"merged {len(dirs)} experts ({method}) -> {args.output} [{recipe['output_type']}, "
        f"{recipe['output_hash'][:12]}]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
