"""Input validation shared by the CLI and the gin entry points: one-line errors, two exit codes.

Every check names the flag or file, the value, what is expected and how to fix it, in one line.
`UsageError` (exit 2) is a bad flag or setting: the command line is wrong. `DataError` (exit 1) is
a file that is missing, damaged or of the wrong kind. Both are `ValueError`s, so library code that
already catches `ValueError` keeps working. `report(prog, error)` prints the line; entry points
call it from one top-level handler, and `EXPERT_T5X_TRACEBACK=1` re-raises instead (for bugs).

Where the checks live: beside the typed configs, so the CLI, gin and the Python API share one
declaration. A config's `__post_init__` checks ranges, finiteness, kinds and duplicates (nothing
on disk: a config may describe files of another machine); its `check_paths()` checks the kinds of
its paths and is called by the entry point before anything is loaded or written. Each error names
the field as `label(config, field)` does: the CLI flag that sets it and the config field (which is
what gin binds), e.g. `--batch_size / DatasetConfig.batch_size=0 must be ...`, so the same bad
value gives the same line whichever way it came in. A field's flag is `--<field>` unless the
class's `FLAGS` maps it to another (or to None: no flag). A CLI's own `_validate_args` keeps only
what no config sees (combinations of flags, or inputs of commands without a config).
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

TRACEBACK_ENV = "EXPERT_T5X_TRACEBACK"
USAGE_EXIT = 2
DATA_EXIT = 1


class UsageError(ValueError):
  """A flag or gin setting out of range or of the wrong kind (exit code 2)."""


class DataError(ValueError):
  """A file or directory that is missing, damaged or of the wrong kind (exit code 1)."""


def exit_code(error: BaseException, default: int = DATA_EXIT) -> int:
  """2 for a `UsageError`, 1 for a `DataError`, else `default` (the command's own convention)."""
  if isinstance(error, UsageError):
    return USAGE_EXIT
  return DATA_EXIT if isinstance(error, DataError) else default


def one_line(error: BaseException) -> str:
  """The error's message on one line (a nested library's multi-line text is joined)."""
  text = str(error) or type(error).__name__
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  # gin appends where a configurable raised ("In call to configurable 'train' (<function ...>)").
  text = re.sub(r"\s*In call to configurable '[^']*' \(<[^>]*>\)", "", text)
  return " ".join(part.strip() for part in text.splitlines() if part.strip())


def report(prog: str, error: BaseException, default: int = DATA_EXIT) -> int:
  """Prints `prog: ...` to stderr (or re-raises under EXPERT_T5X_TRACEBACK) -> exit code."""
  if os.environ.get(TRACEBACK_ENV):
    raise error
  print(f"{prog}: {one_line(error)}", file=sys.stderr)
  return exit_code(error, default)


def label(config: Any, field: str) -> str:
  """`--flag / Class.field`: how an error names a config's field (the flag from `FLAGS`)."""
  cls = config if isinstance(config, type) else type(config)
  flags: Mapping[str, Optional[str]] = getattr(cls, "FLAGS", {})
  flag = flags.get(field, f"--{field}")
  return f"{flag} / {cls.__name__}.{field}" if flag else f"{cls.__name__}.{field}"


def is_remote(path: Optional[str]) -> bool:
  """A URL (gs://..., https://...): its kind is checked by whoever reads it."""
  return bool(path) and "://" in str(path)


def positive_int(name: str, value: Any, fix: str = "") -> int:
  """`value` as an int >= 1 (bools and non-integral floats refused)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
      or value < 1:
    raise UsageError(f"{name}={value!r} must be a whole number >= 1{'; ' + fix if fix else ''}.")
  return int(value)


def optional_positive_int(name: str, value: Any, fix: str = "") -> Optional[int]:
  return None if value is None else positive_int(name, value, fix)


def finite(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
           fix: str = "") -> float:
  """`value` as a finite float, optionally within [lo, hi]."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    x = math.nan
  bounds = ""
  if lo is not None or hi is not None:
    bounds = f" in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
  if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
    raise UsageError(f"{name}={value!r} must be a finite number{bounds}"
                     f"{'; ' + fix if fix else ''}.")
  return x


def finite_all(name: str, values: Iterable[Any], fix: str = "") -> list[float]:
  return [finite(name, v, fix=fix) for v in values]


def no_duplicates(name: str, values: Sequence[Any], fix: str = "") -> None:
  seen = set()
  for v in values:
    if v in seen:
      raise UsageError(f"{name} lists {v!r} twice; give each once{'; ' + fix if fix else ''}.")
    seen.add(v)


def non_negative_int(name: str, value: Any, fix: str = "") -> int:
  """`value` as an int >= 0."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
      or value < 0:
    raise UsageError(f"{name}={value!r} must be a whole number >= 0{'; ' + fix if fix else ''}.")
  return int(value)


def one_of(name: str, value: Any, choices: Sequence[Any]) -> Any:
  if value not in choices:
    raise UsageError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}.")
  return value


def non_empty(name: str, values: Sequence[Any], fix: str = "") -> None:
  if not values:
    raise UsageError(f"{name} is empty; give at least one value{'; ' + fix if fix else ''}.")


def _existing(name: str, path: str, what: str, is_kind: Any, other_kind: str) -> str:
  if not os.path.exists(path):
    raise DataError(f"{name} {path!r} does not exist; pass the path of {what}.")
  if not is_kind(path):
    raise DataError(f"{name} {path!r} is {other_kind}; pass the path of {what}.")
  return path


def existing_file(name: str, path: str, what: str = "a file") -> str:
  return _existing(name, path, what, os.path.isfile, "a directory")


def existing_dir(name: str, path: str, what: str = "a directory") -> str:
  return _existing(name, path, what, os.path.isdir, "a file")


def output_file(name: str, path: str, inputs: Iterable[str] = ()) -> str:
  """A file we are about to write: its folder exists, it is not a directory or one of `inputs`."""
  if os.path.isdir(path):
    raise UsageError(f"{name} {path!r} is a directory; pass a file path to write.")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UsageError(f"{name} {path!r}: its folder {parent!r} does not exist; create it first.")
  _not_an_input(name, path, inputs)
  return path


def output_dir(name: str, path: str, inputs: Iterable[str] = ()) -> str:
  """A directory we are about to create or fill: not an existing file, not one of `inputs`."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"{name} {path!r} is a file; pass a directory path.")
  _not_an_input(name, path, inputs)
  return path


def _not_an_input(name: str, path: str, inputs: Iterable[str]) -> None:
  real = os.path.realpath(path)
  for other in inputs:
    if other and os.path.realpath(other) == real:
      raise UsageError(f"{name} {path!r} is also an input; write the output somewhere else.")
