# Library module of the launchers (not run directly); see `python -m launch.tpu_vm --help`.
"""Shared helpers of the launchers: gin flags, shell quoting, dry-run command runner, task names.

Nothing here imports TensorFlow, seqio or JAX: launchers must answer `--help` and `--dry_run`
instantly on a laptop that has none of them installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, TextIO

from expert_t5x import file_io

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MODULE = "expert_t5x.train"
# The trainer's flags for an explicit multi-process setup (T5X's names).
COORDINATOR_FLAGS = ("--coordinator_address", "--process_count", "--process_index")


class LaunchError(ValueError):
  """Bad launcher input; the message names the input and how to fix it."""


# ----------------------------------------------------------------------------
# Gin flags.
# ----------------------------------------------------------------------------


def gin_literal(value: Any) -> str:
  """A Python value as a gin literal: strings double-quoted, dicts/tuples as Python literals.

  Double quotes keep shell quoting to one readable level: `'--gin.MODEL_DIR="/runs/m"'`.
  """
  if isinstance(value, str):
    return json.dumps(value)  # a JSON string is also a Python (so gin) string literal
  if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, Mapping):
    return "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
  if isinstance(value, (list, tuple)):
    items = ", ".join(gin_literal(v) for v in value)
    return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
  raise LaunchError(
      f"Cannot write {value!r} ({type(value).__name__}) as a gin value; use a string, "
      f"number, bool, None, list, tuple or dict.")


def gin_flag(name: str, value: Any) -> str:
  """`--gin.NAME=LITERAL`, T5X's command-line binding (strings come out quoted)."""
  return f"--gin.{name}={gin_literal(value)}"


def parse_gin_override(arg: str) -> tuple[str, str]:
  """'--gin.NAME=VALUE' or 'NAME=VALUE' -> (NAME, VALUE) with VALUE kept verbatim (already gin)."""
  body = arg[len("--gin."):] if arg.startswith("--gin.") else arg
  name, sep, value = body.partition("=")
  if not sep or not name or not name.replace(".", "").replace("/", "").replace("_", "").isalnum():
    raise LaunchError(f"Gin override {arg!r} is not NAME=VALUE; write e.g. --gin.BATCH_SIZE=8 or "
                      f"--gin.MODEL_DIR=\"'/tmp/m'\" (strings quoted).")
  return name, value


# ----------------------------------------------------------------------------
# Shell text.
# ----------------------------------------------------------------------------


def shell_join(argv: Sequence[str]) -> str:
  """One shell-safe command line."""
  return " ".join(shlex.quote(str(a)) for a in argv)


def shell_lines(argv: Sequence[str], indent: str = "  ", raw_tail: Sequence[str] = ()) -> str:
  """A long command split over lines with backslashes: the program (up to its first `--flag`) on
  the first line, then one flag per line; `raw_tail` words are appended unquoted (e.g. "$1")."""
  quoted = [shlex.quote(str(a)) for a in argv]
  first = next((i for i, q in enumerate(quoted) if q.lstrip("'").startswith("--")), len(quoted))
  lines = [" ".join(quoted[:first])] + [indent + q for q in quoted[first:]]
  lines += [indent + w for w in raw_tail]
  return " \\\n".join(lines)


# ----------------------------------------------------------------------------
# Running commands (or printing them in a dry run).
# ----------------------------------------------------------------------------


class Runner:
  """Runs commands, or only prints them when `dry_run`; keeps what it ran for the caller.

  Every command is echoed first as `+ <command>`, so a real run's log shows the same text a dry
  run prints.
  """

  def __init__(self, dry_run: bool, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.commands: list[str] = []

  def echo(self, text: str) -> None:
    """Prints `+ text` (and keeps it)."""
    self.commands.append(text)
    print(f"+ {text}", file=self.out, flush=True)

  def run(self, argv: Sequence[str], *, check: bool = True, capture: bool = False,
          dry_value: str = "") -> str:
    """Runs `argv`; returns its stdout when `capture` (`dry_value` in a dry run)."""
    self.echo(shell_join(argv))
    if self.dry_run:
      return dry_value
    result = subprocess.run(list(argv), check=False, text=True,
                            stdout=subprocess.PIPE if capture else None)
    if check and result.returncode != 0:
      raise LaunchError(f"Command failed with exit status {result.returncode}: {shell_join(argv)}")
    return (result.stdout or "").strip() if capture else ""

  def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
    """Writes a generated file (a dry run prints it instead)."""
    self.echo(f"cat > {shlex.quote(path)} <<'EOF'")
    if self.dry_run:
      print(text + "EOF", file=self.out, flush=True)
      return
    file_io.atomic_write_text(path, text, file_mode=mode)

  def run_parallel(self, commands: Sequence[Sequence[str]]) -> None:
    """Starts every command at once and waits for all (one per TPU worker); fails if any fails."""
    for argv in commands:
      self.echo(shell_join(argv) + " &")
    if self.dry_run:
      print("+ wait", file=self.out, flush=True)
      return
    procs = [subprocess.Popen(list(argv)) for argv in commands]
    codes = [p.wait() for p in procs]
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
      raise LaunchError(f"Commands {failed} (of {len(commands)}) failed with exit statuses "
                        f"{[codes[i] for i in failed]}; see their output above.")


# ----------------------------------------------------------------------------
# Task names and the paper's grid, without importing seqio_tasks (which imports TensorFlow).
# ----------------------------------------------------------------------------


def _seqio_tasks_dir() -> str:
  # find_spec on a top-level package locates it without executing its __init__ (which registers
  # every task with seqio and so imports TensorFlow).
  spec = importlib.util.find_spec("seqio_tasks")
  if spec is None or not spec.submodule_search_locations:
    local = os.path.join(REPO_ROOT, "seqio_tasks")
    if os.path.isdir(local):
      return local
    raise LaunchError(
        "Package seqio_tasks is not installed; run `pip install -e .` in the repository.")
  return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=1)
def task_names() -> ModuleType:
  """`seqio_tasks/names.py` loaded on its own: t-zero's `task_clean`, `prompt_task_name`, suffixes.

  Only its pure functions are used here; its grid readers import the package (and TensorFlow).
  """
  path = os.path.join(_seqio_tasks_dir(), "names.py")
  spec = importlib.util.spec_from_file_location("_launch_seqio_task_names", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


def read_seqio_data(filename: str) -> Any:
  """A JSON file of seqio_tasks' package data (e.g. the paper's 296-prompt grid)."""
  with open(os.path.join(_seqio_tasks_dir(), "data", filename), encoding="utf-8") as f:
    return json.load(f)
