"""`expert-t5x retrieve`: Retrieval of Experts from the command line (library code: `retrieval`).

Reads a JSONL file of unlabeled eval examples, retrieves per task through `retrieval.Retriever`
and writes (or prints) the results JSON that `expert-t5x merge --retrieval` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from expert_t5x import file_io
from expert_t5x import library as library_lib
from expert_t5x import library_cli
from expert_t5x import retrieval
from expert_t5x import validation


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="expert-t5x retrieve",
      description="Retrieval of Experts: pick experts for eval prompts from unlabeled "
      "queries.")
  p.add_argument("--library", required=True)
  p.add_argument(
      "--queries",
      required=True,
      help="JSONL of canonical eval examples (inputs, answer_choices, dataset, subset, prompt, "
           "task); "
      "one retrieval per task")
  p.add_argument("--task", action="append", help="only these tasks of the queries file")
  p.add_argument("--embedder", choices=retrieval.EMBEDDERS, default="minilm")
  p.add_argument("--minilm-dir", help="sentence-transformers directory of all-MiniLM-L6-v2")
  p.add_argument("--base", help="base checkpoint (t5 embedder)")
  p.add_argument("--base-config",
                 default="xl",
                 help="T5 config name if the checkpoint does not record it")
  p.add_argument("--vocab", help="SentencePiece model (t5 embedder)")
  p.add_argument("--max-seq-length", type=int, default=256)
  p.add_argument("--text-format",
                 choices=retrieval.TEXT_FORMATS,
                 default=retrieval.DEFAULT_TEXT_FORMAT)
  p.add_argument("--templates-dir",
                 help="promptsource templates for choice formats (default: the fetched copy)")
  p.add_argument("--num-queries", type=int, default=retrieval.DEFAULT_NUM_QUERIES)
  p.add_argument("--seed", type=int, default=0, help="seed of the query permutation")
  p.add_argument("--votes-per-query", type=int, default=1)
  p.add_argument("--guard", choices=library_lib.GUARD_MODES, default="zero_shot")
  p.add_argument("--abstain-threshold",
                 type=float,
                 default=0.0,
                 help="abstain below this vote share")
  p.add_argument("--fallback", choices=("base", "merge"), default="base")
  p.add_argument(
      "--dataset-rule",
      choices=retrieval.DATASET_RULES,
      default=retrieval.DEFAULT_DATASET_RULE,
      help="dataset-level pick: the winner's dataset (the paper) or votes pooled per dataset")
  p.add_argument("--output", help="write results JSON here (default: stdout)")
  library_cli.add_allow_unknown_provenance(p)
  return p


def _validate_args(args: argparse.Namespace) -> None:
  validation.existing_file("--queries", args.queries, "a JSONL file of unlabeled examples")
  if not library_lib.is_url(args.library):
    validation.existing_dir("--library", args.library, "an expert library")
  validation.positive_int("--num-queries", args.num_queries)
  validation.positive_int("--votes-per-query", args.votes_per_query)
  validation.positive_int("--max-seq-length", args.max_seq_length)
  validation.finite("--abstain-threshold", args.abstain_threshold, 0.0, 1.0, "it is a vote share")
  if args.output:
    validation.output_file("--output", args.output, [args.queries])


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `expert-t5x retrieve`."""
  args = _parser().parse_args(argv)
  try:
    _validate_args(args)
    rows = retrieval.read_jsonl(args.queries)
    validation.non_empty(f"--queries {args.queries}", rows,
                         "give JSONL rows with an 'inputs' field")
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
      by_task.setdefault(str(r.get("task") or f"{r.get('dataset')}@{r.get('prompt')}"),
                         []).append(r)
    tasks = args.task or list(by_task)
    missing = [t for t in tasks if t not in by_task]
    if missing:
      raise retrieval.RetrievalError(
          f"Tasks {missing} are not in '{args.queries}'; it has {sorted(by_task)[:5]}...")
    lookup = retrieval.promptsource_lookup(
        args.templates_dir) if args.text_format.startswith("choice") else None
    embedder = retrieval.make_embedder(args.embedder,
                                       minilm_dir=args.minilm_dir,
                                       max_seq_length=args.max_seq_length,
                                       base_path=args.base,
                                       base_config=args.base_config,
                                       vocab_path=args.vocab)
    retriever = retrieval.Retriever(library_lib.Library(args.library),
                                    embedder,
                                    text_format=args.text_format,
                                    lookup=lookup)
    results = retriever.retrieve_many([by_task[t] for t in tasks],
                                      guard=args.guard,
                                      num_queries=args.num_queries,
                                      seed=args.seed,
                                      votes_per_query=args.votes_per_query,
                                      abstain_threshold=args.abstain_threshold,
                                      fallback=args.fallback,
                                      dataset_rule=args.dataset_rule,
                                      allow_unknown_provenance=args.allow_unknown_provenance)
    for t, res in zip(tasks, results):
      res["task"] = t
      res["prompt"] = by_task[t][0].get("prompt")
  except (retrieval.RetrievalError, library_lib.LibraryError, OSError, ValueError) as e:
    return validation.report("expert-t5x retrieve", e)
  out = {
      "embedder": retriever.embedder.identity, "text_format": args.text_format,
      "guard_mode": args.guard, "dataset_rule": args.dataset_rule, "library": retriever.lib.root,
      "num_keys": len(retriever.keys.texts), "results": results
  }
  text = json.dumps(out, indent=2, sort_keys=True)
  if args.output:
    file_io.atomic_write_text(args.output, text + "\n")
    for r in results:
      print(f"{r['task']}: {r['selected']} ({r['candidates'][0]['votes']}/{r['total_votes']} votes"
            + (", abstained" if r["abstained"] else "") + ")")
  else:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
