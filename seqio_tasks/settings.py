"""Data locations: the cache directory and the roots each source reads, as settings.

Every root is resolved at first use, in this order: a value set from Python (`set_path`) or gin
(`seqio_tasks.settings.P3_DIR = "..."` etc.), then an environment variable, then a default under
the cache directory (`$EXPERT_T5X_CACHE`, else `~/.cache/expert_t5x`). Nothing here touches the
file system at import.
"""

from __future__ import annotations

import os
from typing import Optional

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


@gin.configurable("settings", module="seqio_tasks")
def _gin_settings(P3_DIR=None, RAW_DIR=None, PROMPTSOURCE_DIR=None, BIGBENCH_DIR=None,  # pylint: disable=invalid-name
                  CONTINUAL_DIR=None, COMPOSITIONAL_DIR=None) -> dict[str, Optional[str]]:
  """Gin's view of the roots: bind `seqio_tasks.settings.<NAME> = "..."` in a gin file."""
  return dict(P3_DIR=P3_DIR, RAW_DIR=RAW_DIR, PROMPTSOURCE_DIR=PROMPTSOURCE_DIR,
              BIGBENCH_DIR=BIGBENCH_DIR, CONTINUAL_DIR=CONTINUAL_DIR,
              COMPOSITIONAL_DIR=COMPOSITIONAL_DIR)


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
  """The environment variable that sets root `name`."""
  return _SETTINGS[name][0]


def get_roots(name: str) -> list[str]:
  """A root that may list several directories separated by `os.pathsep`."""
  value = get_path(name)
  return [p for p in value.split(os.pathsep) if p] if value else []
