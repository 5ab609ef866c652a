r"""Zero-shot evaluation entry point (T5X style): a base model, experts or a merge on a suite.

Gin (as T5X's `eval.py`)::

    python -m expert_t5x.eval --gin_file=runs/eval.gin \
      --gin.CHECKPOINT_PATH="'/ckpt/t5-xl-lm-adapt'" \
      --gin.MIXTURE_OR_TASK_NAME="'t0_eval_score_eval'" \
      --gin.EVAL_OUTPUT_DIR="'/tmp/eval'" \
      --gin.EXPERT_PATHS="['/lib/experts/cosmos_qa_pe']"

Command line (same function, argparse flags)::

    expert-t5x eval --checkpoint_path /ckpt/t5-xl-lm-adapt --tasks t0_eval_score_eval \
      --output_dir /tmp/eval --experts /lib/experts/a /lib/experts/b

Retrieval of Experts from a library (`expert_t5x.roe`): each eval prompt retrieves its expert
from its own unlabeled examples (or merges the top-k) and is evaluated with it::

    expert-t5x eval --checkpoint_path /ckpt/t5-xl-lm-adapt --tasks t0_eval_score_eval \
      --output_dir /tmp/roe --library /lib --roe --embedder minilm
    expert-t5x eval ... --library /lib --merge --merge_top_k 1 3 5   # top-k chosen label-free
    expert-t5x eval ... --library /lib --roe --roe_level instance    # or dataset (DE-level)

The oracle (best expert per prompt, uses labels) of an evaluated expert x prompt matrix::

    expert-t5x eval --oracle /tmp/eval/grid          # or .../matrix.npz

Writes `predictions.jsonl`, `results.json`, `results.csv`, `results.md` and (several experts)
`matrix.npz` and its oracle under the output directory; an interrupted run resumes from its
shards. With `expected` (an anchors file, see `gin/runs/anchors/`), also writes `anchors.md` and
fails (exit 1) when a number is outside its tolerance.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Mapping, Optional, Sequence

from expert_t5x import base_models
from expert_t5x import eval_experts
from expert_t5x import eval_tasks
from expert_t5x import evaluation
from expert_t5x import scoring as scoring_lib

ANCHORS_FILE = "anchors.md"


def evaluate(*, mixture_or_task_name: str | Sequence[str], output_dir: str,
             checkpoint_path: Optional[str] = None, model_config: Optional[str] = None,
             random_init_seed: Optional[int] = None,
             config_overrides: Optional[Mapping[str, Any]] = None,
             expert_paths: Sequence[str] = (), expert_list_file: Optional[str] = None,
             expert_names: Optional[Sequence[str]] = None, include_base: Optional[bool] = None,
             split: str = "validation", max_examples: Optional[int] = None,
             example_subset: str = "first", batch_size: int = 32,
             experts_per_pass: int = 8, scoring: str = "sum",
             logit_vocab_limit: Optional[int] = None, gold_not_in_choices: str = "exclude",
             task_feature_lengths: Optional[Mapping[str, Optional[int]]] = None,
             generation_max_length: int = 128, bootstrap_samples: int = 1000, seed: int = 0,
             num_partitions: int = 1, dtype: str = "float32", allow_base_mismatch: bool = False,
             write_predictions: bool = True, progress: bool = True,
             vocabulary_path: Optional[str] = None, expected: Optional[str] = None,
             task_source: Optional[eval_tasks.TaskSource] = None,
             library: Optional[str] = None, roe: bool = False, merge: bool = False,
             roe_level: str = "task", dataset_rule: str = "winner", embedder: str = "minilm",
             minilm_dir: Optional[str] = None,
             retrieval_max_seq_length: int = 256, text_format: str = "label_instance",
             num_queries: int = 32, retrieval_seed: int = 0, votes_per_query: int = 1,
             guard: str = "zero_shot", abstain_threshold: float = 0.0, fallback: str = "base",
             merge_method: str = "uniform", merge_top_k: int | Sequence[int] = 3,
             merge_lam: Optional[float] | Sequence[Optional[float]] = None,
             merge_params: Optional[Mapping[str, Any]] = None, adapter_reference: str = "auto",
             previous_results: Optional[str] = None, bertscore_model: Optional[str] = None,
             bertscore_layers: Optional[int] = None) -> dict[str, Any]:
  """Loads the base and experts, evaluates, writes the result files; returns results.json's object.

  Args:
    mixture_or_task_name: a suite (t0_eval_score_eval, bigbench_13, ct0_continual,
      t0_train_score_eval, demo_heldout), a task, or a list / comma-separated string of them.
    output_dir: the evaluation directory (resumed when it exists).
    checkpoint_path: the base: an HF T5 directory or a T5X checkpoint.
    model_config: a named T5 config; with `random_init_seed` and no checkpoint, random weights.
    random_init_seed: seed of random base weights (plumbing checks and demos only).
    config_overrides: T5Config fields to override (e.g. {'vocab_size': 259} for byte tasks).
    expert_paths: Expert format v1 directories (trained, imported or merged experts).
    expert_list_file: a text file listing more expert directories, one per line.
    expert_names: ids for the experts in results (default: directory names).
    include_base: also evaluate the base alone (default: only when no expert is given).
    split, max_examples, batch_size, experts_per_pass, generation_max_length, bootstrap_samples,
    seed, num_partitions, allow_base_mismatch, write_predictions, progress: see
      `evaluation.evaluate`.
    example_subset: 'first' (the first `max_examples`) or 'paper' (the paper's evaluation subset:
      the first `max_examples`, 300 by default, of torch.randperm with seed 42 over the split,
      after the paper's row slice where it took one; `seqio_tasks.seen_eval`). Recorded.
    scoring: 'sum' (the paper), 'mean' or 'per_char'.
    logit_vocab_limit: e.g. 32100 to normalise over the paper's code's 32100 logits.
    gold_not_in_choices: 'exclude' or 'count_wrong'.
    task_feature_lengths: {'inputs': N, 'targets': M or None}. Without 'inputs' (or None), the
      paper's choice for the run (`evaluation.paper_input_length`): 256, its prompt-expert configs'
      length, when experts are evaluated or retrieved (`expert_paths`, `roe`); else 512 (the base
      alone, merges; T0-3B's). The long-input PEs used 512 (gin `runs/input_length_512.gin`).
    dtype: activation dtype, 'float32' or 'bfloat16'.
    vocabulary_path: the SentencePiece model of the T5 tasks (default: the checkpoint's own
      spiece.model when the vocabulary is not configured otherwise).
    expected: an anchors JSON file to compare with (pass/fail table in anchors.md).
    task_source: tasks (default: the registered seqio_tasks).
    library: an expert library; with `roe` or `merge`, each prompt is evaluated with the
      experts retrieved for it (`expert_t5x.roe`) instead of `expert_paths`.
    roe: evaluate each prompt with its top-voted expert (the paper's RoE).
    roe_level: with roe: 'task' (the vote winner), 'dataset' (its dataset's expert) or 'instance'
      (each example with its own nearest key's expert); `roe.LEVELS`.
    dataset_rule: with roe_level 'dataset': 'winner' (the paper: the dataset of the task-level
      winner) or 'pooled' (the dataset whose prompt experts got the most votes together).
    merge: evaluate each prompt with a merge of its top-k retrieved experts.
    embedder, minilm_dir, retrieval_max_seq_length, text_format, num_queries, retrieval_seed,
    votes_per_query, guard, abstain_threshold, fallback: retrieval settings (`roe.RoEConfig`;
      guard 'zero_shot' for held-out suites, 'seen' for seen-task RoE, or 'off').
    merge_method, merge_top_k, merge_lam, merge_params, adapter_reference: merge settings; several
      top-k or λ values are chosen per prompt label-free (lowest mean choice entropy).
    previous_results: an earlier routed run's results.json: routing changes are reported.
    bertscore_model, bertscore_layers: the BERTScore model directory and layer of the tasks scored
      with it (ct0_target_eval's covid_qa, eli5, empathetic_dialogues, esnli, twitter_top20).
  """
  options = scoring_lib.ScoringOptions(scoring=scoring, logit_vocab_limit=logit_vocab_limit,
                                       gold_not_in_choices=gold_not_in_choices)
  paths = list(expert_paths or [])
  if expert_list_file:
    paths += eval_experts.read_expert_list(expert_list_file)
  if roe or merge:
    if roe and merge:
      raise ValueError("Pass one of roe (--roe) or merge (--merge), not both.")
    if not library:
      raise ValueError("RoE and merge evaluation need an expert library (--library LIB).")
    if paths:
      raise ValueError("RoE and merge evaluation use the library's experts; drop expert_paths "
                       "(--experts / --expert_list).")
  elif library:
    raise ValueError("A library is only used with roe (--roe) or merge (--merge); pass one, or "
                     "evaluate expert directories with --experts.")
  task_feature_lengths = dict(task_feature_lengths or {"targets": None})
  task_feature_lengths.setdefault("inputs", evaluation.paper_input_length(experts=bool(paths) or roe))
  base = base_models.load_base(checkpoint_path, model_config, random_init_seed, dtype,
                               config_overrides)
  _configure_vocabulary(vocabulary_path, checkpoint_path, task_source)
  if task_source is None:
    task_source = eval_tasks.SeqioTaskSource(example_subset)
  elif example_subset != getattr(task_source, "example_subset", "first"):
    raise ValueError(f"example_subset {example_subset!r} applies to the registered tasks; a given "
                     "task_source selects its own examples (pass it the subset, or drop one).")
  if roe or merge:
    from expert_t5x import roe as roe_lib  # pylint: disable=g-import-not-at-top
    config = roe_lib.RoEConfig(
        mode="roe" if roe else "merge", level=roe_level, dataset_rule=dataset_rule,
        embedder=embedder, minilm_dir=minilm_dir,
        max_seq_length=retrieval_max_seq_length, text_format=text_format,
        num_queries=num_queries, seed=retrieval_seed, votes_per_query=votes_per_query,
        guard=guard, abstain_threshold=abstain_threshold, fallback=fallback,
        merge_method=merge_method, merge_top_k=merge_top_k, merge_lam=merge_lam,
        merge_params=dict(merge_params or {}), adapter_reference=adapter_reference)
    results = roe_lib.evaluate(
        library=library, tasks=mixture_or_task_name, output_dir=output_dir, base=base,
        config=config, task_source=task_source, split=split, max_examples=max_examples,
        batch_size=batch_size, options=options, feature_lengths=task_feature_lengths,
        include_base=bool(include_base), num_partitions=num_partitions,
        allow_base_mismatch=allow_base_mismatch, previous_results=previous_results,
        generation_max_length=generation_max_length, bootstrap_samples=bootstrap_samples,
        seed=seed, write_predictions=write_predictions, progress=progress)
    return _finish(results, output_dir, expected)
  results = evaluation.evaluate(
      tasks=mixture_or_task_name, output_dir=output_dir, base=base, expert_paths=paths,
      expert_names=expert_names, include_base=include_base, split=split,
      max_examples=max_examples, batch_size=batch_size, experts_per_pass=experts_per_pass,
      options=options, feature_lengths=task_feature_lengths,
      generation_max_length=generation_max_length, bootstrap_samples=bootstrap_samples,
      seed=seed, num_partitions=num_partitions, allow_base_mismatch=allow_base_mismatch,
      write_predictions=write_predictions, progress=progress, task_source=task_source,
      bertscore_model=bertscore_model, bertscore_layers=bertscore_layers)
  return _finish(results, output_dir, expected)


def _finish(results: dict[str, Any], output_dir: str, expected: Optional[str]) -> dict[str, Any]:
  """Logs each entry's means and compares with an anchors file when given."""
  for entry in results["entries"]:
    logging.info("%s: mean %.2f, median %.2f over %d datasets", entry["id"],
                 entry["overall"]["mean"] or float("nan"),
                 entry["overall"]["median"] or float("nan"), entry["overall"]["num_datasets"])
  results["output_dir"] = output_dir
  if expected:
    from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
    report = results_lib.compare_expected(results, results_lib.read_expected(
        _resolve_expected(expected)))
    results_lib.write_text(os.path.join(output_dir, ANCHORS_FILE), report["markdown"])
    results["anchors"] = report
  return results


def _resolve_expected(path: str) -> str:
  """An anchors file: as given, else relative to the shipped gin folder (runs/anchors/...)."""
  if os.path.isfile(path):
    return path
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  shipped = os.path.join(gin_utils.shipped_gin_dir(), path)
  if os.path.isfile(shipped):
    return shipped
  raise FileNotFoundError(f"Anchors file '{path}' not found (also looked in "
                          f"'{gin_utils.shipped_gin_dir()}'); pass a path to an expected.json.")


def _configure_vocabulary(vocabulary_path: Optional[str], checkpoint_path: Optional[str],
                          task_source: Any) -> None:
  """Points the lazy T5 vocabulary of seqio_tasks at `vocabulary_path` (or the checkpoint's)."""
  if task_source is not None:
    return
  from expert_t5x import checkpoint_importer  # pylint: disable=g-import-not-at-top
  from seqio_tasks import vocab  # pylint: disable=g-import-not-at-top
  if vocabulary_path:
    vocab.set_vocabulary_path(vocabulary_path)
    return
  configured = vocab.VOCABULARY_PATH or os.environ.get(vocab.VOCAB_ENV)
  found = checkpoint_importer.find_vocab(checkpoint_path) if checkpoint_path else None
  if not configured and found:
    vocab.set_vocabulary_path(found)


# ------------------------------------------------------------------------------------- gin


_GIN_EVALUATE = None


def main(argv: Sequence[str]) -> None:
  """absl main for `python -m expert_t5x.eval --gin_file=...`."""
  del argv
  import gin  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import
  # (seqio_tasks declares gin settings, which must exist before the config is parsed and locked.)
  global _GIN_EVALUATE
  if _GIN_EVALUATE is None:
    _GIN_EVALUATE = gin.configurable(evaluate)
  flag_values = flags.FLAGS
  try:
    gin_utils.parse_gin_flags(flag_values.gin_search_paths, flag_values.gin_file,
                              flag_values.gin_bindings)
    if flag_values.gin_parse_only:
      print(gin_utils.summarize_gin_config())
      return
    results = _GIN_EVALUATE()
  except (ValueError, KeyError, FileNotFoundError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"expert_t5x.eval: {message}", file=sys.stderr)
    raise SystemExit(2) from None
  print(open(os.path.join(results["output_dir"], "results.md"), encoding="utf-8").read())
  if results.get("anchors"):
    print(results["anchors"]["markdown"])
    if not results["anchors"]["passed"]:
      raise SystemExit(1)


def gin_main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the gin entry point with `argv` (program name first)."""
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  return gin_utils.run_for_exit_code(main, argv)


# ------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="expert-t5x eval",
      description="Zero-shot rank-classification evaluation of a base model, experts or a merge "
      "(the paper's protocol: summed log-probs incl. EOS, argmax, ties to the lowest index). "
      "With --gin_file, runs the gin entry point instead.")
  p.add_argument("--tasks", required=True,
                 help="suite (t0_eval_score_eval, bigbench_13, ct0_continual, t0_train_score_eval, "
                 "demo_heldout) or comma-separated task names")
  p.add_argument("--output_dir", required=True, help="evaluation directory (resumed if present)")
  base = p.add_argument_group("base model")
  base.add_argument("--checkpoint_path", help="HF T5 directory or T5X checkpoint")
  base.add_argument("--model_config", help="named T5 config (tiny, small, base, large, xl, xxl)")
  base.add_argument("--random_init_seed", type=int,
                    help="random base weights with this seed (plumbing checks only)")
  base.add_argument("--vocab_size", type=int, help="override the config's vocab_size")
  base.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  base.add_argument("--vocabulary_path", help="SentencePiece model of the T5 tasks")
  ex = p.add_argument_group("experts")
  ex.add_argument("--experts", nargs="*", default=[], help="expert directories (or a merge's)")
  ex.add_argument("--expert_list", help="file listing expert directories, one per line")
  ex.add_argument("--expert_names", nargs="*", help="ids for the experts (default: dir names)")
  ex.add_argument("--include_base", action="store_true", help="also evaluate the base alone")
  ex.add_argument("--experts_per_pass", type=int, default=8,
                  help="stacked experts per pass (bounds device memory)")
  ex.add_argument("--allow_base_mismatch", action="store_true",
                  help="evaluate experts trained on another base")
  pr = p.add_argument_group("protocol")
  pr.add_argument("--split", default="validation")
  pr.add_argument("--max_examples", type=int,
                  help="first N examples of each task (with --example_subset paper: N of the "
                       "paper's subset, 300 by default)")
  pr.add_argument("--example_subset", default="first", choices=("first", "paper"),
                  help="first: the first --max_examples; paper: the paper's evaluation subset "
                       "(first 300 of torch.randperm with seed 42, ELM's seen_eval_300)")
  pr.add_argument("--scoring", default="sum", choices=("sum", "mean", "per_char"))
  pr.add_argument("--logit_vocab_limit", type=int, help="e.g. 32100 (the paper's code)")
  pr.add_argument("--gold_not_in_choices", default="exclude", choices=("exclude", "count_wrong"))
  pr.add_argument("--max_input_length", type=int,
                  help="default: the paper's per run, 256 (its PE configs) when evaluating or "
                       "retrieving experts, else 512 (base, merges)")
  pr.add_argument("--max_target_length", type=int, help="truncate choices/targets (default: no)")
  pr.add_argument("--generation_max_length", type=int, default=128)
  pr.add_argument("--bootstrap_samples", type=int, default=1000)
  pr.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  pr.add_argument("--bertscore_model",
                  help="transformers directory of microsoft/deberta-large-mnli (BERTScore tasks)")
  pr.add_argument("--bertscore_layers", type=int, help="its hidden layer (default 18)")
  pr.add_argument("--expected", help="anchors JSON to compare with (exit 1 when outside tolerance)")
  rl = p.add_argument_group("retrieval of experts (with --library)")
  rl.add_argument("--library", help="expert library to retrieve from (with --roe or --merge)")
  rl.add_argument("--roe", action="store_true",
                  help="evaluate each prompt with its top-voted expert (the paper's RoE)")
  rl.add_argument("--merge", action="store_true",
                  help="evaluate each prompt with a merge of its top-k retrieved experts")
  rl.add_argument("--roe_level", default="task", choices=("task", "dataset", "instance"),
                  help="with --roe: the prompt's vote winner (task), its dataset expert (dataset) "
                       "or each example's nearest key's expert (instance)")
  rl.add_argument("--dataset_rule", default="winner", choices=("winner", "pooled"),
                  help="with --roe_level dataset: the vote winner's dataset (the paper) or the "
                       "dataset with the most votes pooled over its prompt experts")
  rl.add_argument("--embedder", default="minilm", choices=("minilm", "t5", "bm25"),
                  help="t5 = the evaluated base's encoder")
  rl.add_argument("--minilm_dir", help="all-MiniLM-L6-v2 sentence-transformers directory")
  rl.add_argument("--retrieval_max_seq_length", type=int, default=256)
  rl.add_argument("--text_format", default="label_instance", help="key/query text format")
  rl.add_argument("--num_queries", type=int, default=32, help="unlabeled queries per prompt (Q)")
  rl.add_argument("--retrieval_seed", type=int, default=0, help="seed of the query permutation")
  rl.add_argument("--votes_per_query", type=int, default=1)
  rl.add_argument("--guard", default="zero_shot", choices=("zero_shot", "seen", "off"),
                  help="contamination guard: zero_shot for held-out suites, seen for seen tasks")
  rl.add_argument("--abstain_threshold", type=float, default=0.0,
                  help="abstain below this vote share and use --fallback")
  rl.add_argument("--fallback", default="base", choices=("base", "merge"))
  rl.add_argument("--merge_method", default="uniform",
                  choices=("uniform", "weighted", "task_arithmetic", "ties", "dare"))
  rl.add_argument("--merge_top_k", type=int, nargs="+", default=[3],
                  help="k; several values are chosen per prompt label-free")
  rl.add_argument("--merge_lam", type=float, nargs="+",
                  help="λ (task_arithmetic, ties, dare); several values are chosen label-free")
  rl.add_argument("--merge_density", type=float, help="TIES density")
  rl.add_argument("--merge_per_tensor", action="store_true",
                  help="TIES: trim per tensor instead of per expert")
  rl.add_argument("--merge_sign_method", choices=("mass", "count"), help="TIES sign election")
  rl.add_argument("--merge_drop", type=float, help="DARE drop probability")
  rl.add_argument("--merge_seed", type=int, help="DARE mask seed")
  rl.add_argument("--merge_combine", choices=("linear", "ties"),
                  help="DARE: combine linearly or TIES-style")
  rl.add_argument("--adapter_reference", default="auto", choices=("auto", "init", "zero"))
  rl.add_argument("--previous_results",
                  help="an earlier --roe/--merge results.json: report routing changes")
  rt = p.add_argument_group("runtime")
  rt.add_argument("--batch_size", type=int, default=32)
  rt.add_argument("--num_partitions", type=int, default=1)
  rt.add_argument("--no_predictions", action="store_true", help="skip predictions.jsonl")
  rt.add_argument("--no_progress", action="store_true")
  return p


def _validate_args(args: argparse.Namespace) -> None:
  """Ranges and path kinds of the flags, before anything is loaded or written."""
  from expert_t5x import validation  # pylint: disable=g-import-not-at-top
  for flag in ("max_examples", "batch_size", "experts_per_pass", "max_input_length",
               "max_target_length", "generation_max_length", "num_partitions", "num_queries",
               "votes_per_query", "retrieval_max_seq_length", "logit_vocab_limit", "vocab_size"):
    if getattr(args, flag, None) is not None:
      validation.positive_int(f"--{flag}", getattr(args, flag))
  if args.bootstrap_samples < 0:
    raise validation.UsageError(f"--bootstrap_samples={args.bootstrap_samples} must be >= 0 (0: no "
                                "confidence intervals).")
  validation.finite("--abstain_threshold", args.abstain_threshold, 0.0, 1.0, "it is a vote share")
  validation.finite_all("--merge_lam", args.merge_lam or [])
  for k in args.merge_top_k or []:
    validation.positive_int("--merge_top_k", k)
  for flag in ("merge_density", "merge_drop"):
    if getattr(args, flag) is not None:
      validation.finite(f"--{flag}", getattr(args, flag), 0.0, 1.0)
  validation.output_dir("--output_dir", args.output_dir, args.experts or [])
  for path in args.experts or []:
    validation.existing_dir("--experts", path, "an expert directory")
  for flag in ("expert_list", "expected", "vocabulary_path"):
    if getattr(args, flag) and "://" not in getattr(args, flag):
      validation.existing_file(f"--{flag}", getattr(args, flag))
  if args.library and "://" not in args.library:
    validation.existing_dir("--library", args.library, "an expert library")


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """`expert-t5x eval ...` (argparse flags; `--gin_file` switches to the gin entry point)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a.startswith("--gin_file") for a in argv):
    return gin_main(["expert-t5x eval"] + argv)
  if any(a == "--oracle" or a.startswith("--oracle=") for a in argv):
    return oracle_main(argv)
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    _validate_args(args)
    results = evaluate(
        mixture_or_task_name=args.tasks, output_dir=args.output_dir,
        checkpoint_path=args.checkpoint_path, model_config=args.model_config,
        random_init_seed=args.random_init_seed,
        config_overrides={"vocab_size": args.vocab_size} if args.vocab_size else None,
        expert_paths=args.experts, expert_list_file=args.expert_list,
        expert_names=args.expert_names, include_base=True if args.include_base else None,
        split=args.split, max_examples=args.max_examples, example_subset=args.example_subset,
        batch_size=args.batch_size,
        experts_per_pass=args.experts_per_pass, scoring=args.scoring,
        logit_vocab_limit=args.logit_vocab_limit, gold_not_in_choices=args.gold_not_in_choices,
        task_feature_lengths=dict({"targets": args.max_target_length}, **(
            {"inputs": args.max_input_length} if args.max_input_length else {})),
        generation_max_length=args.generation_max_length,
        bootstrap_samples=args.bootstrap_samples, seed=args.seed,
        num_partitions=args.num_partitions, dtype=args.dtype,
        allow_base_mismatch=args.allow_base_mismatch, write_predictions=not args.no_predictions,
        progress=not args.no_progress, vocabulary_path=args.vocabulary_path,
        expected=args.expected, library=args.library, roe=args.roe, merge=args.merge,
        roe_level=args.roe_level, dataset_rule=args.dataset_rule,
        embedder=args.embedder, minilm_dir=args.minilm_dir,
        retrieval_max_seq_length=args.retrieval_max_seq_length, text_format=args.text_format,
        num_queries=args.num_queries, retrieval_seed=args.retrieval_seed,
        votes_per_query=args.votes_per_query, guard=args.guard,
        abstain_threshold=args.abstain_threshold, fallback=args.fallback,
        merge_method=args.merge_method, merge_top_k=args.merge_top_k,
        merge_lam=args.merge_lam if args.merge_lam else None,
        merge_params={k: v for k, v in (("density", args.merge_density),
                                        ("per_tensor", args.merge_per_tensor or None),
                                        ("sign_method", args.merge_sign_method),
                                        ("drop", args.merge_drop), ("seed", args.merge_seed),
                                        ("combine", args.merge_combine))
                      if v is not None},
        adapter_reference=args.adapter_reference, previous_results=args.previous_results,
        bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers)
  except (ValueError, KeyError, OSError) as e:
    from expert_t5x import validation  # pylint: disable=g-import-not-at-top
    return validation.report("expert-t5x eval", e, default=2)  # setup errors: 2
  print(open(os.path.join(args.output_dir, "results.md"), encoding="utf-8").read())
  if results.get("anchors"):
    print(results["anchors"]["markdown"])
    return 0 if results["anchors"]["passed"] else 1
  return 0


# ---------------------------------------------------------------------------------- oracle


def oracle(path: str) -> dict[str, Any]:
  """The oracle of an evaluated expert x prompt matrix (an eval directory or its matrix.npz).

  Datasets come from the results.json beside the matrix.
  """
  from expert_t5x import aggregation  # pylint: disable=g-import-not-at-top
  from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
  matrix = os.path.join(path, results_lib.MATRIX_FILE) if os.path.isdir(path) else path
  results_path = os.path.join(os.path.dirname(matrix), results_lib.RESULTS_FILE)
  for needed in (matrix, results_path):
    if not os.path.isfile(needed):
      raise FileNotFoundError(f"'{needed}' not found; --oracle takes the output directory (or "
                              "matrix.npz) of an evaluation of several experts.")
  acc, expert_ids, prompt_ids = results_lib.read_matrix(matrix)
  tasks = results_lib.read_results(results_path)["tasks"]
  out = aggregation.oracle(acc, expert_ids, prompt_ids, {t["name"]: t["dataset"] for t in tasks})
  out["matrix"] = os.path.abspath(matrix)
  return out


def oracle_markdown(result: Mapping[str, Any]) -> str:
  """The oracle as a Markdown table: per prompt its best expert, then the dataset means."""
  def fmt(x):
    return "n/a" if x is None or x != x else f"{x:.2f}"
  lines = ["| prompt | dataset | best expert | accuracy |", "|---|---|---|---:|"]
  lines += [f"| {p['task']} | {p['dataset']} | {p['expert']} | {fmt(p['accuracy'])} |"
            for p in result["prompts"]]
  lines += ["", "| dataset | mean | median |", "|---|---:|---:|"]
  lines += [f"| {d} | {fmt(v['mean'])} | {fmt(v['median'])} |"
            for d, v in result["datasets"].items()]
  lines += ["", f"Oracle over {result['num_experts']} experts (uses labels: an upper bound): mean "
            f"{fmt(result['mean'])}, median {fmt(result['median'])} over "
            f"{result['num_datasets']} datasets.", ""]
  return "\n".join(lines)


def oracle_main(argv: Sequence[str]) -> int:
  """`expert-t5x eval --oracle DIR_OR_MATRIX [--output oracle.json]`."""
  p = argparse.ArgumentParser(prog="expert-t5x eval --oracle",
                              description="Best expert per prompt of an evaluated matrix.npz.")
  p.add_argument("--oracle", required=True, help="eval output directory or its matrix.npz")
  p.add_argument("--output", help="also write the oracle as JSON here")
  args = p.parse_args(argv)
  try:
    result = oracle(args.oracle)
  except (ValueError, KeyError, FileNotFoundError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"expert-t5x eval --oracle: {message}", file=sys.stderr)
    from expert_t5x import validation  # pylint: disable=g-import-not-at-top
    return validation.exit_code(e, default=2)  # a damaged matrix.npz: 1
  if args.output:
    from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
    results_lib.write_json(args.output, result)
  print(oracle_markdown(result))
  return 0


if __name__ == "__main__":
  # Run the canonical module's main so that gin binds `expert_t5x.eval.evaluate` (the gin files
  # import it by that name), not a second copy living in __main__.
  from expert_t5x import eval as _eval_module  # pylint: disable=g-import-not-at-top,redefined-builtin
  sys.exit(_eval_module.gin_main(sys.argv))
