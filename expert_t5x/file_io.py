"""Small file helpers shared by every module that writes results durably: hashing, fsync,
atomic replacement and JSON Lines reading. Standard library only (no TensorFlow, no JAX)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from typing import Any, Callable, IO


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
  """fsyncs a file or a directory (a directory's fsync makes renames inside it durable)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def creation_mode(directory: bool, group_shared: bool = False) -> int:
  """The mode a plain `open`/`mkdir` would give under the process umask (`mkstemp` and `mkdtemp`
  use 0600/0700 instead, which hid library files from a team); `group_shared` adds group
  read/write (and, for folders, setgid so new files keep the library's group)."""
  umask = os.umask(0)
  os.umask(umask)
  mode = (0o777 if directory else 0o666) & ~umask
  if group_shared:
    mode |= (0o2770 if directory else 0o660)
  return mode


def temp_dir_prefix(stem: str) -> str:
  """`stem` + this writer's host and pid: a later run can tell a killed writer's leftovers (pid gone)
  from a live concurrent writer's folder."""
  return f"{stem}{socket.gethostname()}-{os.getpid()}-"


def remove_dead_temp_dirs(parent: str, stem: str) -> list[str]:
  """Removes `parent/stem<host>-<pid>-*` folders of writers on this host that no longer run."""
  host = socket.gethostname()
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for name in names:
    rest = name[len(stem):] if name.startswith(stem) else ""
    head, sep, tail = rest.partition(f"{host}-")
    pid = tail.split("-", 1)[0]
    if not sep or head or not pid.isdigit() or _alive(int(pid)):
      continue
    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    removed.append(name)
  return removed


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None],
                 mode: str = "w") -> None:
  """Writes through `write(file)` to a temporary file beside `path`, fsyncs it, then renames it
  over `path` and fsyncs the directory: readers see the old file or the new one, never a part."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
  text = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
  try:
    with os.fdopen(fd, mode, **text) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fsync_path(directory)


def read_jsonl(path: str | os.PathLike[str], error_cls: type[Exception] = ValueError,
               hint: str = "") -> list[dict[str, Any]]:
  """Reads a JSON Lines file (blank lines skipped); a bad line raises `error_cls` naming it."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise error_cls(f"'{os.fspath(path)}' line {line_no} is not valid JSON ({e})"
                          f"{'; ' + hint if hint else ''}.") from e
  return rows


def read_json_or_empty(path: str | os.PathLike[str], damaged_note: str) -> Any:
  """A JSON file's value, or {} when it is absent or damaged (damage logged with `damaged_note`):
  for bookkeeping files whose loss only costs a recomputation."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError):
    logging.warning("%s is damaged; %s", os.fspath(path), damaged_note)
    return {}
