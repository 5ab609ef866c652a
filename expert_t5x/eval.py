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

Writes `predictions.jsonl`, `results.json`, `results.csv`, `results.md` and (several experts)
`matrix.npz` under the output directory; an interrupted run resumes from its shards. With
`expected` (an anchors file, see `gin/runs/anchors/`), also writes `anchors.md` and fails
(exit 1) when a number is outside its tolerance.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Mapping, Optional, Sequence

from expert_t5x import evaluation

ANCHORS_FILE = "anchors.md"


def evaluate(*, mixture_or_task_name: str | Sequence[str], output_dir: str,
             checkpoint_path: Optional[str] = None, model_config: Optional[str] = None,
             random_init_seed: Optional[int] = None,
             config_overrides: Optional[Mapping[str, Any]] = None,
             expert_paths: Sequence[str] = (), expert_list_file: Optional[str] = None,
             expert_names: Optional[Sequence[str]] = None, include_base: Optional[bool] = None,
             split: str = "validation", max_examples: Optional[int] = None, batch_size: int = 32,
             experts_per_pass: int = 8, scoring: str = "sum",
             logit_vocab_limit: Optional[int] = None, gold_not_in_choices: str = "exclude",
             task_feature_lengths: Optional[Mapping[str, Optional[int]]] = None,
             generation_max_length: int = 128, bootstrap_samples: int = 1000, seed: int = 0,
             num_partitions: int = 1, dtype: str = "float32", allow_base_mismatch: bool = False,
             write_predictions: bool = True, progress: bool = True,
             vocabulary_path: Optional[str] = None, expected: Optional[str] = None,
             task_source: Optional[evaluation.TaskSource] = None) -> dict[str, Any]:
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
    scoring: 'sum' (the paper), 'mean' or 'per_char'.
    logit_vocab_limit: e.g. 32100 to normalise over the paper's code's 32100 logits.
    gold_not_in_choices: 'exclude' or 'count_wrong'.
    task_feature_lengths: {'inputs': N, 'targets': M or None}.
    dtype: activation dtype, 'float32' or 'bfloat16'.
    vocabulary_path: the SentencePiece model of the T5 tasks (default: the checkpoint's own
      spiece.model when the vocabulary is not configured otherwise).
    expected: an anchors JSON file to compare with (pass/fail table in anchors.md).
    task_source: tasks (default: the registered seqio_tasks).
  """
  options = evaluation.ScoringOptions(scoring=scoring, logit_vocab_limit=logit_vocab_limit,
                                      gold_not_in_choices=gold_not_in_choices)
  paths = list(expert_paths or [])
  if expert_list_file:
    paths += evaluation.read_expert_list(expert_list_file)
  base = evaluation.load_base(checkpoint_path, model_config, random_init_seed, dtype,
                              config_overrides)
  _configure_vocabulary(vocabulary_path, checkpoint_path, task_source)
  results = evaluation.evaluate(
      tasks=mixture_or_task_name, output_dir=output_dir, base=base, expert_paths=paths,
      expert_names=expert_names, include_base=include_base, split=split,
      max_examples=max_examples, batch_size=batch_size, experts_per_pass=experts_per_pass,
      options=options, feature_lengths=task_feature_lengths,
      generation_max_length=generation_max_length, bootstrap_samples=bootstrap_samples,
      seed=seed, num_partitions=num_partitions, allow_base_mismatch=allow_base_mismatch,
      write_predictions=write_predictions, progress=progress, task_source=task_source)
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
  from expert_t5x import checkpoints  # pylint: disable=g-import-not-at-top
  from seqio_tasks import vocab  # pylint: disable=g-import-not-at-top
  if vocabulary_path:
    vocab.set_vocabulary_path(vocabulary_path)
    return
  configured = vocab.VOCABULARY_PATH or os.environ.get(vocab.VOCAB_ENV)
  found = checkpoints.find_vocab(checkpoint_path) if checkpoint_path else None
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
  gin_utils.define_flags()
  try:
    gin_utils.run(main, argv)
  except SystemExit as e:
    return int(e.code or 0)
  return 0


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
  pr.add_argument("--max_examples", type=int, help="first N examples of each task")
  pr.add_argument("--scoring", default="sum", choices=("sum", "mean", "per_char"))
  pr.add_argument("--logit_vocab_limit", type=int, help="e.g. 32100 (the paper's code)")
  pr.add_argument("--gold_not_in_choices", default="exclude", choices=("exclude", "count_wrong"))
  pr.add_argument("--max_input_length", type=int, default=512)
  pr.add_argument("--max_target_length", type=int, help="truncate choices/targets (default: no)")
  pr.add_argument("--generation_max_length", type=int, default=128)
  pr.add_argument("--bootstrap_samples", type=int, default=1000)
  pr.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  pr.add_argument("--expected", help="anchors JSON to compare with (exit 1 when outside tolerance)")
  rt = p.add_argument_group("runtime")
  rt.add_argument("--batch_size", type=int, default=32)
  rt.add_argument("--num_partitions", type=int, default=1)
  rt.add_argument("--no_predictions", action="store_true", help="skip predictions.jsonl")
  rt.add_argument("--no_progress", action="store_true")
  return p


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """`expert-t5x eval ...` (argparse flags; `--gin_file` switches to the gin entry point)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a.startswith("--gin_file") for a in argv):
    return gin_main(["expert-t5x eval"] + argv)
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    results = evaluate(
        mixture_or_task_name=args.tasks, output_dir=args.output_dir,
        checkpoint_path=args.checkpoint_path, model_config=args.model_config,
        random_init_seed=args.random_init_seed,
        config_overrides={"vocab_size": args.vocab_size} if args.vocab_size else None,
        expert_paths=args.experts, expert_list_file=args.expert_list,
        expert_names=args.expert_names, include_base=True if args.include_base else None,
        split=args.split, max_examples=args.max_examples, batch_size=args.batch_size,
        experts_per_pass=args.experts_per_pass, scoring=args.scoring,
        logit_vocab_limit=args.logit_vocab_limit, gold_not_in_choices=args.gold_not_in_choices,
        task_feature_lengths={"inputs": args.max_input_length, "targets": args.max_target_length},
        generation_max_length=args.generation_max_length,
        bootstrap_samples=args.bootstrap_samples, seed=args.seed,
        num_partitions=args.num_partitions, dtype=args.dtype,
        allow_base_mismatch=args.allow_base_mismatch, write_predictions=not args.no_predictions,
        progress=not args.no_progress, vocabulary_path=args.vocabulary_path,
        expected=args.expected)
  except (ValueError, KeyError, FileNotFoundError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"expert-t5x eval: {message}", file=sys.stderr)
    return 2
  print(open(os.path.join(args.output_dir, "results.md"), encoding="utf-8").read())
  if results.get("anchors"):
    print(results["anchors"]["markdown"])
    return 0 if results["anchors"]["passed"] else 1
  return 0


if __name__ == "__main__":
  # Run the canonical module's main so that gin binds `expert_t5x.eval.evaluate` (the gin files
  # import it by that name), not a second copy living in __main__.
  from expert_t5x import eval as _eval_module  # pylint: disable=g-import-not-at-top,redefined-builtin
  sys.exit(_eval_module.gin_main(sys.argv))
