"""Data locations (the cache directory and the roots each source reads) and loader options.

Every root is resolved at first use, in this order: a value set from Python (`set_path`) or gin
(`seqio_tasks.settings.P3_DIR = "..."` etc.), then an environment variable, then a default under
the cache directory (`$EXPERT_T5X_CACHE`, else `~/.cache/expert_t5x`). Nothing here touches the
file system at import.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Optional

import gin

# name -> (environment variable, default relative to the cache directory or None).
_SETTINGS: dict[str, tuple[str, Optional[str]]] = {
    "P3_DIR": ("EXPERT_T5X_P3_DIR", None),
    "RAW_DIR": ("EXPERT_T5X_RAW_DIR", None),
    "PROMPTSOURCE_DIR": ("EXPERT_T5X_PROMPTSOURCE_DIR", "promptsource/templates"),
    "BIGBENCH_DIR": ("EXPERT_T5X_BIGBENCH_DIR", "bigbench"),
    "CONTINUAL_DIR": ("EXPERT_T5X_CONTINUAL_DIR", "continual"),
    "COMPOSITIONAL_DIR": ("EXPERT_T5X_COMPOSITIONAL_DIR", "compositional"),
}
# Loader options (not paths): name -> (environment variable, default, allowed values).
_OPTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # BIG-bench examples with several top-scored choices: keep the first in JSON order (BIG-bench's
    # own gold rule), skip them (counted) or raise.
    "BIGBENCH_MULTIPLE_GOLD": ("EXPERT_T5X_BIGBENCH_MULTIPLE_GOLD", "first",
                               ("first", "skip", "error")),
}
_OVERRIDES: dict[str, Optional[str]] = {}


def cache_dir() -> str:
  """`$EXPERT_T5X_CACHE`, else `~/.cache/expert_t5x`."""
  return os.environ.get("EXPERT_T5X_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "expert_t5x")


def set_path(name: str, value: Optional[str]) -> None:
  """Sets (or with None, clears) a root, e.g. `set_path("P3_DIR", "/data/p3")`."""
  if name not in _SETTINGS:
    raise KeyError(f"unknown setting {name!r}; expected one of {sorted(_SETTINGS)}.")
  _OVERRIDES[name] = None if value is None else os.fspath(value)


def set_option(name: str, value: Optional[str]) -> None:
  """Sets (or with None, clears) a loader option, e.g. `set_option("BIGBENCH_MULTIPLE_GOLD",
  "skip")`."""
  if name not in _OPTIONS:
    raise KeyError(f"unknown option {name!r}; expected one of {sorted(_OPTIONS)}.")
  _OVERRIDES[name] = None if value is None else _checked(name, value, "set_option")


def _checked(name: str, value: str, where: str) -> str:
  allowed = _OPTIONS[name][2]
  if value not in allowed:
    raise ValueError(f"{name} = {value!r} (from {where}) is not one of {allowed}.")
  return value


def get_option(name: str) -> str:
  """The resolved loader option `name`: Python, then gin, then its environment variable, then the
  default."""
  if name not in _OPTIONS:
    raise KeyError(f"unknown option {name!r}; expected one of {sorted(_OPTIONS)}.")
  env, default, _ = _OPTIONS[name]
  if _OVERRIDES.get(name):
    return _OVERRIDES[name]
  from_gin = _gin_settings().get(name)
  if from_gin:
    return _checked(name, from_gin, f"gin seqio_tasks.settings.{name}")
  if os.environ.get(env):
    return _checked(name, os.environ[env], f"${env}")
  return default


class GinModule(types.ModuleType):
  """A module that gin can bind as a configurable of the same dotted name.

  `seqio_tasks.settings.P3_DIR = ...` names the module `seqio_tasks.settings` itself: in a
  `dynamic_registration` gin file (upstream T5X's style) gin resolves `seqio_tasks.settings` to
  the module object and looks for a configurable registered for that very object. Registering the
  module (made callable by this class, with the settings as parameters) makes the binding work
  in both gin styles and in `--gin.` flags.
  """


def register_gin_module(module_name: str, cls: type, name: str) -> Any:
  """Makes module `module_name` an instance of `cls` (a `GinModule` whose `__call__` takes the
  settings) and registers it as gin configurable `seqio_tasks.<name>`; returns gin's wrapper."""
  module = sys.modules[module_name]
  module.__class__ = cls
  return gin.external_configurable(module, name, module="seqio_tasks")


class _GinSettings(GinModule):
  """Gin's view of the roots and options: bind `seqio_tasks.settings.<NAME> = "..."` in a gin
  file."""

  def __call__(self, P3_DIR=None, RAW_DIR=None, PROMPTSOURCE_DIR=None, BIGBENCH_DIR=None,  # pylint: disable=invalid-name
               CONTINUAL_DIR=None, COMPOSITIONAL_DIR=None,
               BIGBENCH_MULTIPLE_GOLD=None) -> dict[str, Optional[str]]:
    return dict(P3_DIR=P3_DIR, RAW_DIR=RAW_DIR, PROMPTSOURCE_DIR=PROMPTSOURCE_DIR,
                BIGBENCH_DIR=BIGBENCH_DIR, CONTINUAL_DIR=CONTINUAL_DIR,
                COMPOSITIONAL_DIR=COMPOSITIONAL_DIR, BIGBENCH_MULTIPLE_GOLD=BIGBENCH_MULTIPLE_GOLD)


_gin_settings = register_gin_module(__name__, _GinSettings, "settings")


def get_path(name: str) -> Optional[str]:
  """The resolved root `name` (None when it has no default and is not set)."""
  if name not in _SETTINGS:
    raise KeyError(f"unknown setting {name!r}; expected one of {sorted(_SETTINGS)}.")
  if _OVERRIDES.get(name):
    return _OVERRIDES[name]
  from_gin = _gin_settings().get(name)
  if from_gin:
    return os.fspath(from_gin)
  env, default = _SETTINGS[name]
  if os.environ.get(env):
    return os.environ[env]
  return os.path.join(cache_dir(), default) if default else None


def env_var(name: str) -> str:
  """The environment variable that sets root or option `name`."""
  return (_SETTINGS.get(name) or _OPTIONS[name])[0]


def get_roots(name: str) -> list[str]:
  """A root that may list several directories separated by `os.pathsep`."""
  value = get_path(name)
  return [p for p in value.split(os.pathsep) if p] if value else []
