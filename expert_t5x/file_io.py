"""Small file helpers shared by every module that writes results durably: hashing, fsync,
atomic writing of files and folders (the one place that does temp -> fsync -> rename) and JSON
Lines reading. Standard library only (no TensorFlow, no JAX)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from typing import Any, Callable, IO, Iterator


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
  """`stem` + this writer's host and pid: a later run can tell a killed writer's leftovers (pid
  gone)
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, clobber: bool = True, prefix: str | None = None,
                suffix: str = "", file_mode: int | None = None) -> Iterator[str]:
  """Yields a unique temporary name beside `path` (an empty file) for the caller to write; on
  success chmods it (`file_mode`, default: what a plain `open` gives under the umask), fsyncs it,
  renames it over `path` (`clobber=False`: links it, raising FileExistsError when `path` exists)
  and fsyncs the directory; on failure removes it. Readers see the old file or the new one, never a
  part, and concurrent writers never share a temporary name."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  stem = "." + os.path.basename(path) + "." if prefix is None else prefix
  fd, tmp = tempfile.mkstemp(prefix=stem, suffix=suffix, dir=directory)
  os.close(fd)
  renamed = False
  try:
    yield tmp
    os.chmod(tmp, (creation_mode(False) if file_mode is None else file_mode) & 0o7777)
    fsync_path(tmp)
    if clobber:
      os.replace(tmp, path)
      renamed = True  # the name is free again: another writer's mkstemp may take it
    else:
      os.link(tmp, path)  # atomic and never overwrites
  finally:
    if not renamed and os.path.lexists(tmp):
      os.remove(tmp)
  fsync_path(directory)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None],
                 mode: str = "w", **options: Any) -> None:
  """Writes through `write(file)` with `atomic_path` (`options` are its keywords)."""
  text = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
  with atomic_path(path, **options) as tmp:
    with open(tmp, mode, **text) as f:
      write(f)


def atomic_write_text(path: str | os.PathLike[str], text: str, **options: Any) -> None:
  """Writes `text` (UTF-8) atomically (see `atomic_path`)."""
  atomic_write(path, lambda f: f.write(text), **options)


def atomic_write_json(path: str | os.PathLike[str],
                      obj: Any,
                      *,
                      options: dict[str, Any] | None = None,
                      **dump: Any) -> None:
  """Writes `json.dump(obj, **dump)` atomically; `options` are `atomic_path`'s keywords."""
  atomic_write(path, lambda f: json.dump(obj, f, **dump), **(options or {}))


def _fsync_tree(root: str) -> None:
  """fsyncs every file and folder under `root` (folders after their contents)."""
  for folder, _, files in os.walk(root, topdown=False):
    for name in files:
      if not os.path.islink(os.path.join(folder, name)):
        fsync_path(os.path.join(folder, name))
    fsync_path(folder)


def rename_new_dir(tmp: str, path: str) -> None:
  """Renames folder `tmp` to `path`; fails (OSError) when `path` exists and is not empty."""
  os.rename(tmp, path)


def swap_dir(tmp: str, path: str) -> None:
  """Moves folder `tmp` to `path`, replacing an existing `path`: folders cannot be swapped
  atomically, so the old one is first renamed aside (into a unique folder, never partially
  overwritten) and deleted once the new one is in place."""
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return
  trash = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
  os.rename(path, os.path.join(trash, "old"))
  os.rename(tmp, path)
  shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, stem: str | None = None,
                     dir_mode: int | None = None,
                     commit: Callable[[str, str], None] = rename_new_dir) -> Iterator[str]:
  """Yields a fresh unique folder beside `path` for the caller to fill; on success fsyncs
  everything in it, moves it to `path` with `commit(tmp, path)` (default: a rename that fails
  when `path` exists; `swap_dir` replaces) and fsyncs the parent; on failure removes it.

  The folder is named `stem` (default `.<name>.tmp-`) + host + pid, so leftovers of killed
  writers are removed here while a live concurrent writer's folder is kept; it gets `dir_mode`
  (default: what a plain `mkdir` gives under the umask, not mkdtemp's 0700)."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  stem = f".{os.path.basename(path)}.tmp-" if stem is None else stem
  remove_dead_temp_dirs(parent, stem)
  tmp = tempfile.mkdtemp(prefix=temp_dir_prefix(stem), dir=parent)
  try:
    os.chmod(tmp, creation_mode(directory=True) if dir_mode is None else dir_mode)
    yield tmp
    _fsync_tree(tmp)
    commit(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  fsync_path(parent)


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
