"""The `expert-t5x library` command: init, add, list, check, show, remove, index, report-overlaps.

Each subcommand is a thin wrapper over `library.Library`; errors are one line (exit 2 for bad
usage, 1 for bad data).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from expert_t5x import library
from expert_t5x import validation



def add_allow_unknown_provenance(parser: argparse.ArgumentParser) -> None:
  """The one flag that admits experts of unknown provenance under the zero_shot guard."""
  parser.add_argument(
      "--allow-unknown-provenance",
      action="store_true",
      help="zero_shot guard: admit experts whose training data is unknown (they may "
      "have been trained on the eval dataset; refused by default)")

def _print_json(obj: Any) -> None:
  print(json.dumps(obj, indent=2, sort_keys=True))


def _cmd_init(args: argparse.Namespace) -> int:
  if args.base_fingerprint is not None and not re.fullmatch(r"[0-9a-f]{64}", args.base_fingerprint):
    raise validation.UsageError(
        f"--base-fingerprint {args.base_fingerprint!r} is not a sha256 hex "
        f"digest (64 characters 0-9a-f); copy it from an expert's expert.json "
        f"base.fingerprint.")
  if not library.is_url(args.library):
    validation.output_dir("library", args.library)
  lib = library.Library.init(args.library, base_fingerprint=args.base_fingerprint,
                             base_config_name=args.base_config,
                     group_shared=args.group_shared)
  print(f"Created library {lib.url}" +
        (f" (base {args.base_fingerprint})" if args
         .base_fingerprint else " (the first added expert pins the base)"))
  return 0


def _cmd_add(args: argparse.Namespace) -> int:
  lib = library.Library(args.library, strict=args.strict)
  if args.name and len(args.experts) > 1:
    raise library.LibraryError(
        "--name applies to one expert; add experts one at a time to name them.")
  for path in args.experts:
    entry = lib.add(path, name=args.name, copy=not args.no_copy, verify=not args.no_verify)
    print(
        f"added {entry['id']} ({entry['type']}, {entry['num_keys']} keys, "
        f"{entry['content_hash'][:12]})"
    )
  return 0


def _cmd_list(args: argparse.Namespace) -> int:
  lib = library.Library(args.library, strict=args.strict)
  entries, damaged = lib.entries(with_damaged=True)
  if args.json:
    _print_json({"experts": entries, "damaged_entries": damaged})
    return 0
  for e in entries:
    datasets = sorted({f"{p.get('dataset')}" + (f"/{p['subset']}" if p.get("subset") else "")
                       for p in e["provenance"]})
    print(
        f"{e['id']}\t{e['type']}\t{e['num_keys']} "
        f"keys\t{e['content_hash'][:12]}\t{','.join(datasets)}"
    )
  for name in damaged:
    print(f"warning: damaged entry file entries/{name} skipped", file=sys.stderr)
  print(f"{len(entries)} experts", file=sys.stderr)
  return 0


def _cmd_check(args: argparse.Namespace) -> int:
  lib = library.Library(args.library, strict=args.strict)
  problems = lib.check()
  for line in problems:
    print(line)
  print(f"{len(problems)} problem(s)" if problems else "no problems", file=sys.stderr)
  return 1 if problems else 0


def _cmd_show(args: argparse.Namespace) -> int:
  lib = library.Library(args.library, strict=args.strict)
  entry = lib.get(args.id)
  if args.verify:
    lib.verify(args.id)
    entry = dict(entry, verified=True)
  _print_json(entry)
  return 0


def _cmd_remove(args: argparse.Namespace) -> int:
  entry = library.Library(args.library, strict=args.strict).remove(args.id)
  print(f"removed {entry['id']}")
  return 0


def _cmd_index(args: argparse.Namespace) -> int:
  manifest = library.Library(args.library, strict=args.strict).rebuild_index(gc=args.gc)
  print(f"manifest: {manifest['num_experts']} experts, {manifest['num_keys']} keys" +
        (f", removed {len(manifest['removed_orphans'])} orphans" if args.gc else "") +
        (f", {len(manifest['damaged_entries'])} damaged entries"
         if manifest["damaged_entries"] else ""))
  return 0


def _cmd_report_overlaps(args: argparse.Namespace) -> int:
  evals = [library.parse_eval_spec(s) for s in args.eval or []]
  for path in args.eval_suite or []:
    evals += library.load_eval_suite(path)
  if not evals:
    raise library.LibraryError(
        "report-overlaps needs --eval DATASET[:SUBSET] or --eval-suite FILE.json.")
  report = library.Library(args.library, strict=args.strict).report_overlaps(
      evals, allow_unknown_provenance=args.allow_unknown_provenance)
  if args.json:
    _print_json(report)
    return 0
  for row in report:
    name = row["dataset"] + (f"/{row['subset']}" if row["subset"] else "")
    print(f"{name}: {len(row['overlapping'])} overlapping experts"
          + (f" ({', '.join(row['overlapping'])})" if row["overlapping"] else "")
          + "; excluded " + ", ".join(f"{m}={len(v)}" for m, v in row["excluded"].items()))
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="expert-t5x library",
                                   description="Manage an expert library.")
  parser.add_argument("--strict", action="store_true",
                      help="refuse a damaged entry instead of skipping it with a warning")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("check",
                     help="verify every entry, expert and key file; print each problem and its fix")
  p.add_argument("library")
  p.set_defaults(fn=_cmd_check)
  p = sub.add_parser("init", help="create an empty library")
  p.add_argument("library")
  p.add_argument("--base-fingerprint",
                 help="pin the base model (default: the first added expert's base)")
  p.add_argument("--base-config", help="base config name to record (e.g. xl)")
  p.add_argument("--group-shared", action="store_true",
                 help="for a team: folders group-writable with setgid, files group read/write "
                      "(default: modes follow your umask)")
  p.set_defaults(fn=_cmd_init)
  p = sub.add_parser("add", help="add Expert-format directories (copied into the library)")
  p.add_argument("library")
  p.add_argument("experts", nargs="+")
  p.add_argument("--name", help="display name (default: from provenance)")
  p.add_argument("--no-copy",
                 action="store_true",
                 help="reference the expert in place (absolute path)")
  p.add_argument("--no-verify", action="store_true", help="skip recomputing the content hash")
  p.set_defaults(fn=_cmd_add)
  p = sub.add_parser("list", help="list experts")
  p.add_argument("library")
  p.add_argument("--json", action="store_true")
  p.set_defaults(fn=_cmd_list)
  p = sub.add_parser("show", help="show one expert's entry")
  p.add_argument("library")
  p.add_argument("id")
  p.add_argument("--verify", action="store_true", help="recompute and check the content hash")
  p.set_defaults(fn=_cmd_show)
  p = sub.add_parser("remove", help="remove one expert")
  p.add_argument("library")
  p.add_argument("id")
  p.set_defaults(fn=_cmd_remove)
  p = sub.add_parser("index", help="rebuild manifest.json (under a lock)")
  p.add_argument("library")
  p.add_argument("--gc",
                 action="store_true",
                 help="also delete orphans left by interrupted writers")
  p.set_defaults(fn=_cmd_index)
  p = sub.add_parser("report-overlaps",
                     help="experts whose training data overlaps eval tasks, per guard mode")
  p.add_argument("library")
  p.add_argument("--eval", action="append", help="eval dataset as DATASET[:SUBSET]; repeatable")
  p.add_argument("--eval-suite",
                 action="append",
                 help="JSON list of {hf_dataset|dataset, hf_subset|subset}")
  p.add_argument("--json", action="store_true")
  add_allow_unknown_provenance(p)
  p.set_defaults(fn=_cmd_report_overlaps)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `expert-t5x library`."""
  args = _parser().parse_args(argv)
  writes = (_cmd_init, _cmd_add, _cmd_remove, _cmd_index)
  if library.is_url(getattr(args, "library", "") or "") and args.fn in writes:
    print(
        f"expert-t5x library: '{args.library}' is on an object store (no atomic rename or flock): "
        f"it is single-writer, so run no other writer on it at the same time.",
        file=sys.stderr)
  try:
    return args.fn(args)
  except (library.LibraryError, OSError, ValueError) as e:
    return validation.report("expert-t5x library", e)


if __name__ == "__main__":
  sys.exit(main())
