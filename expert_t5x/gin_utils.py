"""Gin flag parsing shared by every gin entry point (`python -m expert_t5x.train`, `.eval`).

T5X's conventions: `--gin_file` (repeatable; later files override earlier ones), `--gin.NAME=VALUE`
(rewritten to `--gin_bindings='NAME = VALUE'`; strings need quotes: `--gin.MODEL_DIR="'/tmp/m'"`),
`--gin_bindings`, `--gin_search_paths`. The shipped gin folder (`gin/` in the source tree, the
package `expert_t5x.gin_configs` when installed) is always on the search path, so
`--gin_file=runs/finetune.gin` and `include 'models/t5_1_1_base.gin'` resolve from anywhere.

Typical entry point::

    def main(argv):
      gin_utils.parse_gin_flags(FLAGS.gin_search_paths, FLAGS.gin_file, FLAGS.gin_bindings)
      ...
    if __name__ == '__main__':
      gin_utils.define_flags()
      gin_utils.run(main)

Public API: `define_flags`, `run`, `rewrite_gin_args`, `shipped_gin_dir`, `default_search_paths`,
`parse_gin_flags`, `missing_required`, `write_operative_config`, `summarize_gin_config`,
`GinParseOnly`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tokenize
from typing import Any, Callable, Optional, Sequence

import gin
from gin import config as gin_config

from expert_t5x import file_io
from expert_t5x import validation

_REQUIRED_SELECTOR = "gin.REQUIRED/gin.constant"
OPERATIVE_CONFIG = "config.gin"


class GinParseOnly(Exception):
  """Raised by entry points after `--gin_parse_only` has parsed and written the config."""


def shipped_gin_dir() -> str:
  """The folder holding the shipped gin files (installed package or source tree)."""
  try:
    spec = importlib.util.find_spec("expert_t5x.gin_configs")
  except (ModuleNotFoundError, ValueError):
    spec = None
  # The spec's search locations are real folders for a regular, namespace or editable package
  # (`importlib.resources.files` gives a MultiplexedPath for a namespace one, not a path).
  for location in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isdir(location):
      return location
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def default_search_paths(user_paths: Sequence[str] = ()) -> list[str]:
  """The shipped gin folder first, so a user's `./runs/` or `./experts/` never shadows our
  `runs/finetune.gin` or `experts/prompt_expert.gin`; then the user's paths and the current
  directory; then the shipped folder's parent (`gin/runs/finetune.gin` from the repository root)."""
  gin_dir = os.path.abspath(shipped_gin_dir())
  paths = [gin_dir] + [p for p in user_paths if p] + [".", os.path.dirname(gin_dir)]
  out = []
  for p in paths:
    if p not in out:
      out.append(p)
  return out


def _resolve_gin_file(path: str, search_paths: Sequence[str]) -> str:
  """A `--gin_file` as an absolute path: absolute or `./`-prefixed paths as given, else the first
  search path (shipped folder first) holding it; unchanged when none does (gin then reports it)."""
  if os.path.isabs(path) or "://" in path:
    return path
  if path.startswith(("./", "../")):
    return os.path.abspath(path)
  for prefix in search_paths:
    candidate = os.path.join(prefix, path)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return path


def _parse_without_sys_path(files: Sequence[str], bindings: Sequence[str],
                            search_paths: Sequence[str]) -> None:
  """gin's parse with our search paths only: gin's default '' prefix (the current directory) and its
  `sys.path` package reader are left out, because `python -m` puts the current directory on
  `sys.path` and a user's `./runs/` folder would be imported as the package holding
  `runs/finetune.gin` (a namespace package without a file: TypeError inside gin)."""
  from gin import resource_reader  # pylint: disable=g-import-not-at-top
  prefixes = gin_config._LOCATION_PREFIXES  # pylint: disable=protected-access
  readers = gin_config._FILE_READERS  # pylint: disable=protected-access
  saved_prefixes, saved_readers = list(prefixes), list(readers)
  prefixes[:] = list(search_paths)
  readers[:] = [r for r in readers if r[0] is not resource_reader.system_path_reader]
  try:
    gin.parse_config_files_and_bindings([_resolve_gin_file(f, search_paths) for f in files],
                                        list(bindings), finalize_config=False)
  finally:
    prefixes[:], readers[:] = saved_prefixes, saved_readers


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE` (T5X's shorthand)."""
  out = []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise ValueError(f"Gin flag {arg!r} has no value; write --gin.{name}=VALUE "
                         "(quote strings: --gin.MODEL_DIR=\"'/tmp/model'\").")
      arg = f"--gin_bindings={name} = {value}"
    out.append(arg)
  return out


def _macro_references(value, out: set[str]) -> None:
  selector = getattr(value, "_scoped_selector", None)
  if isinstance(selector, str) and selector.endswith("/gin.macro"):
    out.add(selector[:-len("/gin.macro")])
  if isinstance(value, dict):
    for v in value.values():
      _macro_references(v, out)
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _macro_references(v, out)


def unreferenced_macros(bindings: Sequence[str]) -> list[str]:
  """Macros set by `bindings` (`NAME = VALUE`, no dot) that no parsed binding refers to as `%NAME`:
  a misspelled `--gin.TRAIN_STEP=5` would otherwise train with the default silently."""
  referenced: set[str] = set()
  for params in gin_config._CONFIG.values():  # pylint: disable=protected-access
    for value in params.values():
      _macro_references(value, referenced)
  names = []
  for binding in bindings:
    name = binding.partition("=")[0].strip()
    if name.isidentifier() and name not in referenced and name not in names:
      names.append(name)
  return names


def missing_required() -> list[str]:
  """Names of every binding still set to `%gin.REQUIRED` (macros by their bare name)."""
  missing = []
  for (scope, selector), params in gin_config._CONFIG.items():  # pylint: disable=protected-access
    for param, value in params.items():
      if getattr(value, "_scoped_selector", None) != _REQUIRED_SELECTOR:
        continue
      if selector == "gin.macro":
        missing.append(scope)
      else:
        missing.append(f"{scope + '/' if scope else ''}{selector}.{param}")
  return sorted(missing)


def parse_gin_flags(gin_search_paths: Sequence[str], gin_files: Sequence[str],
                    gin_bindings: Sequence[str], *, finalize: bool = True) -> None:
  """Parses gin files then bindings; reports every unset `%gin.REQUIRED` in one error.

  Args:
    gin_search_paths: extra folders to resolve gin files and `include`s (before the defaults).
    gin_files: files in order; later ones override earlier ones.
    gin_bindings: `NAME = VALUE` strings applied after the files.
    finalize: lock the config (as T5X does).

  Raises:
    ValueError: no gin file given, a file not found, or required macros left unset.
  """
  if not gin_files:
    raise validation.UsageError("No --gin_file given; pass one, e.g. --gin_file=runs/finetune.gin "
                     "(see gin/runs/ for the shipped run configs).")
  gin.clear_config()
  search_paths = default_search_paths(gin_search_paths)
  # gin logs an error line for every search path that lacks a file; only a file found nowhere
  # matters, and that raises.
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)
  try:
    _parse_without_sys_path(gin_files, gin_bindings, search_paths)
  except IOError as e:
    raise validation.UsageError(f"Gin file not found ({e}); searched {search_paths}; "
                     "pass --gin_search_paths=DIR for your own configs.") from None
  except (SyntaxError, tokenize.TokenError) as e:
    where = f"{e.filename}:{e.lineno}" if isinstance(e, SyntaxError) and e.filename else (
        f"the binding {e.text.strip()!r}" if getattr(e, "text", None) else "a binding")
    text = str(e.args[0] if e.args else e).splitlines()[0]
    raise validation.UsageError(
        f"Gin syntax error in {where} ({text}); gin values are Python literals, "
        "@configurables or %MACROS (strings quoted: 'text'); fix that line.") from None
  finally:
    root.setLevel(level)
  unused = unreferenced_macros(gin_bindings)
  if unused:
    raise validation.UsageError(
        f"Unknown gin setting(s) {', '.join(unused)}: no config file uses them; check "
        "the spelling against the macros of the gin files (e.g. TRAIN_STEPS, BATCH_SIZE, "
        "MODEL_DIR).")
  missing = missing_required()
  if missing:
    flags = " ".join(f"--gin.{m}=..." for m in missing)
    raise validation.UsageError(
        f"Required gin settings are unset: {', '.join(missing)}; set them, e.g. {flags}")
  if finalize:
    gin.finalize()


def summarize_gin_config() -> str:
  """The operative config (what was actually used) if anything ran, else the parsed config."""
  operative = gin.operative_config_str()
  return operative if operative.strip() else gin.config_str()


def write_operative_config(model_dir: str, filename: str = OPERATIVE_CONFIG) -> str:
  """Writes the gin config to `model_dir/filename` (atomically) and returns its path."""
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, filename)
  file_io.atomic_write_text(path, summarize_gin_config())
  return path


def define_flags() -> None:
  """Defines T5X's gin flags plus `--gin_parse_only` on absl's FLAGS (idempotent)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "gin_file" in flags.FLAGS:
    return
  flags.DEFINE_multi_string("gin_file", None, "Gin files to parse, in order (later ones win).")
  flags.DEFINE_multi_string("gin_bindings", [],
                            "Gin bindings 'NAME = VALUE' (or --gin.NAME=VALUE).")
  flags.DEFINE_list("gin_search_paths", ["."],
                    "Folders to resolve gin files and includes (the shipped gin folder is added).")
  flags.DEFINE_bool(
      "gin_parse_only", False,
      "Parse the gin config, report unset required settings, write the config and exit.")


def run(main: Callable[[list[str]], None], argv: Optional[Sequence[str]] = None) -> None:
  """`absl.app.run(main)` with `--gin.X=` rewriting; `--help` exits 0 (absl's exits 1)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.is_parsed():
    # A second run in one process (the CLI called twice) starts from the defaults: absl would
    # otherwise extend multi-valued flags such as --gin_bindings with the first run's values.
    flags.FLAGS.unparse_flags()
  argv = rewrite_gin_args(list(sys.argv if argv is None else argv))
  wants_help = any(a in ("--help", "-h", "--helpfull", "--helpshort", "-?") for a in argv[1:])
  if not any(a.startswith(("--verbosity", "-v=", "--v=")) for a in argv[1:]):
    # orbax logs dozens of INFO lines per checkpoint, drowning the progress bar; --verbosity=0
    # brings them back.
    argv.insert(1, "--verbosity=-1")
  try:
    app.run(main, argv=argv)
  except SystemExit as e:
    if wants_help and e.code == 1:
      raise SystemExit(0) from None
    raise


def run_for_exit_code(main: Callable[[list[str]], None],
                      argv: Optional[Sequence[str]] = None) -> int:
  """`run(main, argv)` for callers that want the exit code instead of SystemExit (the CLI)."""
  define_flags()
  try:
    run(main, argv)
  except SystemExit as e:
    return int(e.code or 0)
  return 0


_CONFIGURABLES: dict[Callable[..., Any], Callable[..., Any]] = {}


def configurable(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`gin.configurable(fn)`, registered once per process (gin refuses a second registration)."""
  if fn not in _CONFIGURABLES:
    _CONFIGURABLES[fn] = gin.configurable(fn)
  return _CONFIGURABLES[fn]


def call_configured(fn: Callable[..., Any], prog: str) -> Optional[Any]:
  """The gin entry points' body (`python -m expert_t5x.eval` / `.infer`): parses absl's gin flags
  and calls `fn` with the bound settings. Under `--gin_parse_only` prints the config and returns
  None. A bad setting is one line naming it and exit 2 (usage) or 1 (data)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  # seqio and seqio_tasks declare gin configurables, which must exist before the config is parsed
  # and locked.
  import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  configured = configurable(fn)
  try:
    parse_gin_flags(flags.FLAGS.gin_search_paths, flags.FLAGS.gin_file, flags.FLAGS.gin_bindings)
    if flags.FLAGS.gin_parse_only:
      print(summarize_gin_config())
      return None
    return configured()
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise SystemExit(validation.report(prog, e, default=2)) from None
