"""Expert library on disk: immutable entries, a derived manifest, and a contamination guard.

Over 600 lines: the disk protocol, object-store copy and guard share one format (CLI: library_cli).

A library is a directory:

  library.json            # created once by `init`: schema version and (optionally) the pinned base
  entries/<id>.json       # one immutable file per expert, written temp -> fsync -> link (no
  clobber) experts/<id>/           # the expert's Expert-format-v1 directory (copied in by `add`)
  manifest.json           # derived from entries/ (rebuilt under an flock); a cache, never the truth
  embeddings/...          # retrieval embedding cache (see `retrieval.py`)

Concurrency on POSIX filesystems: an `add` writes only files whose names it owns (a temporary expert
copy renamed to `experts/<id>`, then an entry linked to `entries/<id>.json`, which fails if the id
exists), so two processes adding experts at once lose nothing and a crash at any point leaves either
no entry or a complete one; the base and duplicate checks run again under the writers' exclusive
`flock` just before the link. Readers list `entries/` and ignore temporary files (and never lock).
The manifest is rebuilt under the same `flock`. Object stores (`gs://`, `s3://`; TensorFlow's file
systems) have neither rename nor
flock: a library there is single-writer. It is used through a local working copy (under the cache
directory) that follows the POSIX protocol and uploads what it writes, expert files before the entry
that names them; reads download entries eagerly and expert files when first needed.

The contamination guard decides which experts may serve an evaluation task: `zero_shot` excludes
experts whose provenance shares the normalised (dataset, subset) with the task, `seen` excludes
nothing (the paper's seen-task RoE), `off` disables the check. The mode is recorded in every
retrieval result. `zero_shot` also refuses experts of unknown provenance
(`expert_format.UNKNOWN_DATASET`) unless they are allowed explicitly (`--allow-unknown-provenance`,
`allow_unknown_provenance=True`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import filecmp
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from expert_t5x import file_io
from expert_t5x import expert_format
from expert_t5x import validation

LIBRARY_FORMAT = 1
LIBRARY_FILE = "library.json"
MANIFEST_FILE = "manifest.json"
ENTRIES_DIR = "entries"
EXPERTS_DIR = "experts"
EMBEDDINGS_DIR = "embeddings"
LOCK_FILE = ".lock"
GUARD_MODES = ("zero_shot", "seen", "off")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,199}$")

# Test hook: called with a stage name ("after_read", "before_commit") so tests can synchronise two
# writers or simulate a crash at an exact point without sleeps. None in normal use.
fault_hook: Callable[[str], None] | None = None


def _hook(stage: str) -> None:
  if fault_hook is not None:
    fault_hook(stage)


class LibraryError(ValueError):
  """Bad input to a library operation (the message says what to do)."""


# ----------------------------------------------------------------------------
# Small helpers: atomic files, ids, normalisation.
# ----------------------------------------------------------------------------


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def group_shared(directory: str) -> bool:
  """A library folder created with `init --group-shared` carries the setgid bit."""
  try:
    return bool(os.stat(directory).st_mode & 0o2000)
  except OSError:
    return False


def _write_json(path: str, obj: Any, *, clobber: bool = True, stage: str | None = None) -> None:
  """Writes `obj` atomically (`clobber=False`: no clobber, FileExistsError when `path` exists);
  temporary names start with `.tmp-` so that `index --gc` knows them; `stage` names the test hook
  called between the temporary write and the commit."""
  mode = file_io.creation_mode(False, group_shared(os.path.dirname(path))) & 0o777
  with file_io.atomic_path(path, clobber=clobber, prefix=f".tmp-{os.path.basename(path)}-",
                           suffix=".json", file_mode=mode) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
    if stage:
      _hook(stage)


def _rename_expert_dir(expert_id: str, tmp: str, final: str) -> None:
  try:
    os.rename(tmp, final)  # fails if a concurrent writer of the same id won
  except OSError as e:
    raise LibraryError(
        f"Library already has an expert directory '{expert_id}' (added concurrently); "
        f"pass another --name.") from e


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise LibraryError(f"{what} '{path}' is not valid JSON ({e}); it is damaged.") from e


_ENTRY_FIELDS = {"id": str, "path": str, "type": str, "content_hash": str, "num_keys": int,
                 "added_at": str, "base": dict, "provenance": list}


def check_id(expert_id: Any, flag: str = "expert id") -> str:
  """An expert id as the library writes them (no '/', no leading '.'): anything else could name a
  file outside `entries/`."""
  if not isinstance(expert_id, str) or not _ID_RE.match(expert_id):
    raise LibraryError(
        f"{flag} {expert_id!r} is not a valid expert id (letters, digits and ._@+=-, "
        f"not starting with '.' or '-'); see `expert-t5x library list` for the ids.")
  return expert_id


def validate_entry(entry: Any, name: str) -> dict[str, Any]:
  """An entry file's object with the fields readers use, of the right types, else LibraryError."""
  if not isinstance(entry, dict):
    raise LibraryError(f"entries/{name} holds a JSON {type(entry).__name__}, not an object")
  for field, kind in _ENTRY_FIELDS.items():
    if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
      raise LibraryError(f"entries/{name} field '{field}' is {entry.get(field)!r}, expected a "
                         f"{kind.__name__}")
  if entry["id"] != name[:-len(".json")]:
    raise LibraryError(f"entries/{name} records id {entry['id']!r}, not its file name")
  check_id(entry["id"])
  return entry


def sanitize_id(name: str) -> str:
  """Turns a display name (`cosmos_qa@no_prompt_text`) into a file-safe expert id."""
  slug = re.sub(r"[^A-Za-z0-9._@+=-]+", "_", name.strip()).strip("_.")
  return slug[:200] or "expert"


def normalize_name(value: str | None) -> str | None:
  """Normalises a dataset or subset name for overlap checks: case, spaces and hyphens; None for
  empty."""
  if value is None:
    return None
  return _normalize_str(str(value))


@functools.lru_cache(
    maxsize=65536)  # The guard checks every entry's provenance for every eval prompt.
def _normalize_str(value: str) -> str | None:
  value = re.sub(r"[\s\-]+", "_", value.strip().lower())
  return None if value in ("", "none", "null") else value


def normalize_dataset(dataset: str | None,
                      subset: str | None = None) -> tuple[str | None, str | None]:
  """Normalised (dataset, subset); `super_glue/rte` is split into ('super_glue', 'rte')."""
  if dataset and "/" in dataset and subset is None:
    dataset, subset = dataset.split("/", 1)
  return normalize_name(dataset), normalize_name(subset)


def default_name(metadata: Mapping[str, Any]) -> str:
  """Display name from provenance: the task of a prompt expert, `<dataset>[_<subset>]` for a dataset
  expert."""
  prov = metadata.get("provenance") or []
  if len(prov) == 1 and prov[0].get("task"):
    return str(prov[0]["task"])
  datasets = {normalize_dataset(p.get("dataset"), p.get("subset")) for p in prov}
  if len(datasets) == 1:
    ds, sub = next(iter(datasets))
    if ds:
      return ds + (f"_{sub}" if sub else "")
  return f"expert-{metadata['content_hash'][:12]}"


def _keys_hash(expert_dir: str) -> str | None:
  path = os.path.join(expert_dir, expert_format.KEYS_FILE)
  return file_io.sha256_file(path) if os.path.isfile(path) else None


def is_url(root: str) -> bool:
  """Whether a library path is an object-store URL (gs://, s3://, ...) rather than a POSIX path."""
  return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", root))


def _working_copy_dir(url: str) -> str:
  """The local working copy of an object-store library: $EXPERT_T5X_CACHE (else ~/.cache/expert_t5x)
  /libraries/<hash of the URL>."""
  cache = os.environ.get("EXPERT_T5X_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "expert_t5x")
  return os.path.join(cache, "libraries", hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])


class _Remote:
  """An object-store library's files, mirrored into a local working copy (single writer)."""

  def __init__(self, url: str):
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top  # only object stores need TF's file systems
    self.gfile, self.url, self.local = gfile, url.rstrip("/"), _working_copy_dir(url)

  def remote(self, rel: str) -> str:
    return f"{self.url}/{rel}"

  def pull(self, rel: str) -> bool:
    """Downloads one file unless the working copy holds the same version (same size and modification
    time: a removed and re-added expert is a new version; file systems without modification times
    always download); False when the remote lacks it."""
    src, dst = self.remote(rel), os.path.join(self.local, rel)
    if not self.gfile.exists(src):
      return False
    stat = self.gfile.stat(src)
    if stat.mtime_nsec and os.path.isfile(dst) and (
        (os.stat(dst).st_size, os.stat(dst).st_mtime_ns) == (stat.length, stat.mtime_nsec)):
      return True
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with file_io.atomic_path(dst) as tmp:  # processes sharing the working copy never share a file
      self.gfile.copy(src, tmp, overwrite=True)
      os.utime(tmp, ns=(stat.mtime_nsec, stat.mtime_nsec))
    return True

  def pull_dir(self, rel: str, *, mirror: bool = False) -> None:
    """Downloads a remote directory's files; `mirror` also drops local files the remote lacks."""
    src = self.remote(rel)
    names = [n.rstrip("/") for n in self.gfile.listdir(src)] if self.gfile.isdir(src) else []
    for name in names:
      self.pull(f"{rel}/{name}")
    local = os.path.join(self.local, rel)
    os.makedirs(local, exist_ok=True)
    if mirror:
      for name in set(os.listdir(local)) - set(names):
        if not name.startswith("."):
          os.unlink(os.path.join(local, name))

  def push(self, rel: str) -> None:
    dst = self.remote(rel)
    self.gfile.makedirs(dst.rsplit("/", 1)[0])
    if self.gfile.exists(
        dst):  # only the manifest is ever rewritten; some file systems append on overwrite
      self.gfile.remove(dst)
    self.gfile.copy(os.path.join(self.local, rel), dst)

  def push_dir(self, rel: str) -> None:
    for name in sorted(os.listdir(os.path.join(self.local, rel))):
      if os.path.isfile(os.path.join(self.local, rel, name)):
        self.push(f"{rel}/{name}")

  def delete(self, rel: str) -> None:
    path = self.remote(rel)
    if self.gfile.isdir(path):
      self.gfile.rmtree(path)
    elif self.gfile.exists(path):
      self.gfile.remove(path)


# ----------------------------------------------------------------------------
# The library.
# ----------------------------------------------------------------------------


class Library:
  """An expert library directory (see the module docstring for the layout).

  Usage:
    lib = Library.init('lib', base_fingerprint=fp)
    entry = lib.add('runs/cosmos_qa_pe/expert')
    for e in lib.entries(): print(e['id'], e['num_keys'])
  """

  def __init__(self, root: str | os.PathLike[str], *, strict: bool = False):
    root = os.fspath(root)
    self.strict = strict  # refuse (rather than skip with a warning) damaged entries
    self._warned: set[str] = set()
    self.url, self.remote, found = root, None, True
    if is_url(root):
      self.remote = _Remote(root)
      found = self.remote.pull(LIBRARY_FILE)
      if found:
        self.remote.pull_dir(ENTRIES_DIR, mirror=True)
        self.remote.pull(MANIFEST_FILE)
        for sub in (EXPERTS_DIR, EMBEDDINGS_DIR):
          os.makedirs(os.path.join(self.remote.local, sub), exist_ok=True)
    self.root = os.path.abspath(self.remote.local if self.remote else root)
    path = os.path.join(self.root, LIBRARY_FILE)
    if not found or not os.path.isfile(path):
      raise LibraryError(
          f"'{root}' is not an expert library ({LIBRARY_FILE} is missing); create one with "
          f"`expert-t5x library init {root}`.")
    self.info = _read_json(path, "Library file")
    if not isinstance(self.info, dict):
      raise LibraryError(f"Library file '{path}' holds a JSON {type(self.info).__name__}, not an "
                         f"object; it is damaged: restore it or `expert-t5x library init` anew.")
    if self.info.get("format") != LIBRARY_FORMAT:
      raise LibraryError(
          f"Library '{root}' has format {self.info.get('format')!r}; this version reads "
          f"format {LIBRARY_FORMAT}.")

  # -- creation ---------------------------------------------------------------

  @classmethod
  def init(cls, root: str | os.PathLike[str], *, base_fingerprint: str | None = None,
           base_config_name: str | None = None, exist_ok: bool = False,
           group_shared: bool = False) -> Library:
    """Creates an empty library. Without a base fingerprint, the first added expert pins the base.
    `group_shared`: folders get group rwx and setgid, so every file written later is group
    read/write (whatever the writer's umask) and keeps the folder's group."""
    root = os.fspath(root)
    if is_url(root):
      return cls._init_remote(root, base_fingerprint, base_config_name, exist_ok)
    path = os.path.join(root, LIBRARY_FILE)
    if os.path.exists(path):
      if exist_ok:
        return cls(root)
      raise LibraryError(
          f"Library '{root}' already exists; use it as is or choose a new directory.")
    if os.path.isdir(root) and os.listdir(root):
      raise LibraryError(
          f"'{root}' is a non-empty directory that is not a library; choose an empty or "
          f"new directory.")
    for sub in (ENTRIES_DIR, EXPERTS_DIR, EMBEDDINGS_DIR):
      os.makedirs(os.path.join(root, sub), exist_ok=True)
    if group_shared:
      for folder in (root,
                     *(os.path.join(root, s) for s in (ENTRIES_DIR, EXPERTS_DIR, EMBEDDINGS_DIR))):
        os.chmod(folder, file_io.creation_mode(True, True))
    info = {"format": LIBRARY_FORMAT, "created": _now(),
            "base": {"fingerprint": base_fingerprint, "config_name": base_config_name}}
    try:
      _write_json(path, info, clobber=False)  # a concurrent init of the same root loses cleanly
    except FileExistsError:
      if not exist_ok:
        raise LibraryError(f"Library '{root}' was created concurrently; use it as is.") from None
    lib = cls(root)
    lib.rebuild_index()
    return lib

  @classmethod
  def _init_remote(cls, url: str, base_fingerprint: str | None, base_config_name: str | None,
                   exist_ok: bool) -> Library:
    remote = _Remote(url)
    if remote.gfile.exists(remote.remote(LIBRARY_FILE)):
      if exist_ok:
        return cls(url)
      raise LibraryError(f"Library '{url}' already exists; use it as is or choose a new location.")
    shutil.rmtree(remote.local,
                  ignore_errors=True)  # a stale working copy of an earlier library there
    cls.init(remote.local, base_fingerprint=base_fingerprint, base_config_name=base_config_name)
    remote.push(MANIFEST_FILE)
    remote.push(LIBRARY_FILE)  # last: the library exists once library.json does
    return cls(url)

  # -- reading ----------------------------------------------------------------

  def _entries_dir(self) -> str:
    return os.path.join(self.root, ENTRIES_DIR)

  def entries(
      self,
      *,
      with_damaged: bool = False) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[str]]:
    """All entries sorted by id (the library's expert order). Damaged entry files are skipped.

    Args:
      with_damaged: also return the list of damaged entry file names.
    """
    good, damaged = [], []
    for name in sorted(os.listdir(self._entries_dir())):
      if name.startswith(".") or not name.endswith(".json"):
        continue  # temporary files of writers in progress or crashed
      try:
        entry = validate_entry(_read_json(os.path.join(self._entries_dir(), name), "Entry"), name)
        self.resolve_path(entry)
        good.append(entry)
      except (LibraryError, OSError, UnicodeDecodeError) as e:
        damaged.append(name)
        self._damaged(name, e)
    good.sort(key=lambda e: e["id"])
    return (good, damaged) if with_damaged else good

  def _damaged(self, name: str, error: BaseException) -> None:
    why = validation.one_line(error)
    if self.strict:
      raise LibraryError(f"Damaged entry entries/{name} in '{self.root}' ({why}); refused under "
                         f"--strict: run `expert-t5x library check {self.url}` for the fix.")
    if name not in self._warned:
      self._warned.add(name)
      print(f"warning: skipped damaged library entry entries/{name} ({why}); see `expert-t5x "
            f"library check {self.url}`.", file=sys.stderr)

  def resolve_path(self, entry: Mapping[str, Any]) -> str:
    """The entry's expert directory, refused when a relative path leaves `experts/` (`../x` in a
    tampered entry would let `remove` delete, and readers read, outside the library). Absolute
    paths are `--no-copy` references: read, never deleted."""
    path = entry["path"]
    if os.path.isabs(path):
      return path
    inside = os.path.realpath(os.path.join(self.root, EXPERTS_DIR))
    full = os.path.realpath(os.path.join(self.root, path))
    if os.path.dirname(full) != inside:
      raise LibraryError(
          f"entry '{entry.get('id')}' path {path!r} leaves {EXPERTS_DIR}/ of the "
          f"library; the entry was tampered with: remove entries/{entry.get('id')}.json")
    return full

  def ids(self) -> list[str]:
    return [e["id"] for e in self.entries()]

  def get(self, expert_id: str) -> dict[str, Any]:
    """The entry of one expert; a clear error naming known ids if absent."""
    check_id(expert_id)
    path = os.path.join(self._entries_dir(), f"{expert_id}.json")
    if not os.path.isfile(path):
      known = self.ids()
      raise LibraryError(
          f"No expert '{expert_id}' in library '{self.root}'; it has {len(known)} experts" +
          (f", e.g. {known[:5]}" if known else "") + " (see `expert-t5x library list`).")
    try:
      entry = validate_entry(_read_json(path, "Entry"), f"{expert_id}.json")
    except UnicodeDecodeError as e:
      raise LibraryError(f"Entry '{path}' is not UTF-8 text ({e}); it is damaged.") from None
    self.resolve_path(entry)
    return entry

  def expert_dir(self, expert_id: str) -> str:
    """Absolute path of an expert's Expert-format directory (object stores: downloaded first)."""
    entry = self.get(expert_id)
    full = self.resolve_path(entry)
    if self.remote is not None and not os.path.isabs(entry["path"]):
      self.remote.pull_dir(entry["path"], mirror=True)
    return full

  def keys(self, expert_id: str) -> list[dict[str, Any]]:
    """The expert's retrieval keys (`keys.jsonl`), in file order."""
    entry = self.get(expert_id)
    path = entry["path"]
    if self.remote is not None and not os.path.isabs(path):
      self.remote.pull(f"{path}/{expert_format.KEYS_FILE}")  # only the keys, not the weights
      keys = expert_format.read_keys(self.resolve_path(entry))
    else:
      keys = expert_format.read_keys(self.expert_dir(expert_id))
    self._check_keys_hash(entry)
    return keys

  def _check_keys_hash(self, entry: Mapping[str, Any]) -> None:
    recorded = entry.get("keys_hash")
    if recorded and _keys_hash(self.resolve_path(entry)) != recorded:
      raise LibraryError(f"Expert '{entry['id']}' keys.jsonl does not match the sha256 its entry "
                         f"records; it is damaged: remove the expert and add it again.")

  def base_fingerprint(self) -> str | None:
    """The pinned base: from library.json, else from the earliest-added entry."""
    pinned = (self.info.get("base") or {}).get("fingerprint")
    if pinned:
      return pinned
    entries = sorted(self.entries(), key=lambda e: (e["added_at"], e["id"]))
    return entries[0]["base"]["fingerprint"] if entries else None

  def verify(self, expert_id: str) -> None:
    """Recomputes an expert's content hash and compares it with its entry."""
    entry = self.get(expert_id)
    with expert_format.ExpertReader(self.expert_dir(expert_id)) as reader:
      reader.verify()
    if reader.metadata["content_hash"] != entry["content_hash"]:
      raise LibraryError(
          f"Expert '{expert_id}' on disk has content hash {reader.metadata['content_hash']} "
          f"but its entry records {entry['content_hash']}; remove and add it again.")
    self._check_keys_hash(entry)

  def check(self) -> list[str]:
    """Every problem found (damaged entries, paths leaving the library, missing or damaged experts
    and keys), each with its fix; [] when the library is sound."""
    problems = []
    saved, self.strict = self.strict, False
    self._warned.update(os.listdir(self._entries_dir()))  # reported below, not warned
    try:
      entries, damaged = self.entries(with_damaged=True)
    finally:
      self.strict = saved
    for name in damaged:
      try:
        entry = validate_entry(_read_json(os.path.join(self._entries_dir(), name), "Entry"), name)
        self.resolve_path(entry)
      except (LibraryError, OSError, UnicodeDecodeError) as e:
        problems.append(
            f"entries/{name}: {validation.one_line(e)}; fix: restore it from a backup or "
            f"delete it and add the expert again")
    used = {os.path.normpath(e["path"]) for e in entries}
    for name in sorted(os.listdir(os.path.join(self.root, EXPERTS_DIR))):
      if os.path.join(EXPERTS_DIR, name) not in used and f"{name}.json" not in damaged:
        problems.append(f"{EXPERTS_DIR}/{name}: no entry names it (an interrupted add or remove); "
                        f"fix: `expert-t5x library index --gc {self.url}`")
    for entry in entries:
      try:
        self.verify(entry["id"])
      except (LibraryError, ValueError, OSError, KeyError) as e:
        problems.append(
            f"expert '{entry['id']}': {validation.one_line(e)}; fix: `expert-t5x library "
            f"remove {self.url} {entry['id']}` and add it again")
    return problems

  # -- writing ----------------------------------------------------------------

  def add(self, expert_dir: str | os.PathLike[str], *, name: str | None = None, copy: bool = True,
          verify: bool = True) -> dict[str, Any]:
    """Adds an Expert-format-v1 directory; never changes existing experts or their keys.

    Args:
      expert_dir: the expert to add.
      name: display name; the id is its file-safe form (default: from provenance).
      copy: copy the expert into the library (default) rather than referencing its absolute path.
      verify: recompute the content hash before adding, so a damaged file is refused.

    Returns:
      The new entry.
    """
    expert_dir = os.path.abspath(os.fspath(expert_dir))
    if not expert_format.is_expert_dir(expert_dir):
      raise LibraryError(
          f"'{expert_dir}' is not an expert directory (expected {expert_format.PARAMS_FILE} "
          f"and {expert_format.METADATA_FILE}); write experts with the trainer or "
          f"`expert-t5x import`.")
    if self.remote is not None and not copy:
      raise LibraryError(
          f"'{self.url}' is on an object store, which holds copies of its experts; add "
          f"'{expert_dir}' without --no-copy.")
    try:
      reader = expert_format.ExpertReader(expert_dir)
      if verify:
        reader.verify()
    except Exception as e:  # safetensors raises its own types for damaged files
      raise LibraryError(f"Cannot add '{expert_dir}': {e}") from e
    meta = reader.metadata
    display = name or default_name(meta)
    expert_id = sanitize_id(display)
    existing = self.entries()
    _hook("after_read")
    self._check_compatible(meta, expert_id, existing)

    rel = expert_dir
    if copy:
      rel = os.path.join(EXPERTS_DIR, expert_id)
      self._copy_expert(expert_dir, expert_id, meta["content_hash"])
    entry = {
        "format": LIBRARY_FORMAT, "id": expert_id, "name": display, "path": rel, "added_at": _now(),
        "type": meta["type"], "content_hash": meta["content_hash"], "config": meta["config"],
        "base": meta["base"], "provenance": meta["provenance"], "metrics": meta.get("metrics", {}),
        "merge": meta.get("merge"), "keys_hash": _keys_hash(expert_dir),
        "num_keys": len(expert_format.read_keys(expert_dir, missing_ok=True)),
    }
    with self._locked():
      # Checked again under the writers' lock: concurrent adds pass the check above together (one
      # expert under two names, or first experts of two bases); the later one fails here.
      try:
        self._check_compatible(meta, expert_id, self.entries())
      except LibraryError:
        if copy and not any(e["path"] == rel for e in self.entries()):
          shutil.rmtree(os.path.join(self.root, rel), ignore_errors=True)
        raise
      if copy and not os.path.isdir(os.path.join(self.root, rel)):  # reused, then removed meanwhile
        raise LibraryError(
            f"'{rel}' was removed by a concurrent `remove` while adding '{expert_id}'; "
            f"add it again.")
      self._commit_entry(entry)
    if self.remote is not None:  # the expert's files before the entry that names them
      self.remote.delete(rel)  # files a crashed add of this id may have left
      self.remote.push_dir(rel)
      self.remote.push(f"{ENTRIES_DIR}/{expert_id}.json")
    self.rebuild_index()
    return entry

  def _check_compatible(self, meta: Mapping[str, Any], expert_id: str,
                        existing: Sequence[Mapping[str, Any]]) -> None:
    fingerprint = meta["base"].get("fingerprint")
    if not fingerprint:
      raise LibraryError(
          f"Expert '{expert_id}' records no base fingerprint; set base.fingerprint (importers "
          f"take --base-fingerprint) so the library can check it was trained on its base.")
    pinned = self.base_fingerprint()
    if pinned and fingerprint != pinned:
      raise LibraryError(
          f"Expert '{expert_id}' was trained on base {fingerprint[:16]}..., but this library's "
          f"base is {pinned[:16]}...; add it to a library of that base instead.")
    for e in existing:
      if e["id"] == expert_id:
        raise LibraryError(
            f"Library already has an expert '{expert_id}'; pass another --name or remove "
            f"the old one first.")
      if e["content_hash"] == meta["content_hash"]:
        raise LibraryError(
            f"Expert '{expert_id}' is identical (same content hash) to '{e['id']}' already in "
            f"the library.")

  def _copy_expert(self, src: str, expert_id: str, content_hash: str) -> None:
    experts = os.path.join(self.root, EXPERTS_DIR)
    final = os.path.join(experts, expert_id)
    if os.path.isdir(final):
      # Left by a crash between copy and entry commit: reuse it only if it is the same expert.
      # Every file byte-equal to the source (not only expert.json: its tensors may be damaged).
      names = sorted(f for f in os.listdir(src) if os.path.isfile(os.path.join(src, f)))
      try:
        same = (expert_format.read_metadata(final)["content_hash"] == content_hash and
                sorted(os.listdir(final)) == names and
                all(filecmp.cmp(os.path.join(src, f), os.path.join(final, f), shallow=False)
                    for f in names))
      except Exception:  # damaged leftovers are not ours to judge further
        same = False
      if same:
        return
      raise LibraryError(
          f"'{final}' exists without a matching entry (left by an interrupted add?); run "
          f"`expert-t5x library index --gc {self.root}` to remove orphans, then add again.")
    shared = group_shared(experts)
    with file_io.atomic_directory(final, stem=f".tmp-{expert_id}-", dir_mode=file_io.creation_mode(
        True, shared), commit=functools.partial(_rename_expert_dir, expert_id)) as tmp:
      for fname in sorted(os.listdir(src)):
        if os.path.isfile(os.path.join(src, fname)):
          shutil.copyfile(os.path.join(src, fname), os.path.join(tmp, fname))
          os.chmod(os.path.join(tmp, fname), file_io.creation_mode(False, shared))

  def _commit_entry(self, entry: Mapping[str, Any]) -> None:
    try:
      _write_json(os.path.join(self._entries_dir(), f"{entry['id']}.json"), entry, clobber=False,
                  stage="before_commit")
    except FileExistsError:
      raise LibraryError(
          f"Library already has an expert '{entry['id']}' (added concurrently); pass another "
          f"--name.") from None

  def remove(self, expert_id: str) -> dict[str, Any]:
    """Removes an expert (entry first, so readers never see an entry without its files)."""
    with self._locked():  # an add of the same id waits: it must not reuse files being deleted
      entry = self.get(expert_id)
      if self.remote is not None:
        self.remote.delete(f"{ENTRIES_DIR}/{expert_id}.json")
        self.remote.delete(entry["path"])
      os.unlink(os.path.join(self._entries_dir(), f"{expert_id}.json"))
      file_io.fsync_path(self._entries_dir())
      if not os.path.isabs(entry["path"]):  # resolve_path (in get) kept it inside experts/
        shutil.rmtree(self.resolve_path(entry), ignore_errors=True)
    self.rebuild_index()
    return entry

  def rebuild_index(self, *, gc: bool = False) -> dict[str, Any]:
    """Rebuilds manifest.json from entries/ under an exclusive flock; optionally removes orphans.

    Args:
      gc: also delete copied expert directories that have no entry and temporary files of crashed
      writers
        (only when no other writer is running).
    """
    with self._locked():
      entries, damaged = self.entries(with_damaged=True)
      removed = self._gc(entries) if gc else []
      manifest = {
          "format": LIBRARY_FORMAT, "updated": _now(), "base_fingerprint": self.base_fingerprint(),
          "num_experts": len(entries), "num_keys": sum(e["num_keys"] for e in entries),
          "experts": [{k: e[k] for k in ("id", "name", "type", "content_hash", "num_keys", "path")}
                      for e in entries],
          "damaged_entries": damaged, "removed_orphans": removed,
      }
      _write_json(os.path.join(self.root, MANIFEST_FILE), manifest)
    if self.remote is not None:
      self.remote.push(MANIFEST_FILE)
    return manifest

  @contextlib.contextmanager
  def _locked(self) -> Iterator[None]:
    """The writers' exclusive flock (entry commits and index rebuilds; readers never take it)."""
    path = os.path.join(self.root, LOCK_FILE)
    with open(path, "a+") as lock:
      if group_shared(self.root) and os.stat(path).st_uid == os.getuid():
        os.chmod(path, file_io.creation_mode(False, True) & 0o777)  # other members take it too
      fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

  def _gc(self, entries: Sequence[Mapping[str, Any]]) -> list[str]:
    used = {os.path.normpath(e["path"]) for e in entries}  # validated: inside experts/ or absolute
    removed = []
    for sub in (EXPERTS_DIR, ENTRIES_DIR):
      for name in os.listdir(os.path.join(self.root, sub)):
        rel = os.path.join(sub, name)
        orphan = name.startswith(".tmp-") or (sub == EXPERTS_DIR and
                                              os.path.normpath(rel) not in used)
        if orphan:
          path = os.path.join(self.root, rel)
          shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
          removed.append(rel)
    return sorted(removed)

  def manifest(self) -> dict[str, Any]:
    return _read_json(os.path.join(self.root, MANIFEST_FILE), "Manifest")

  # -- contamination guard ----------------------------------------------------

  def guard(self, dataset: str | None, subset: str | None = None, mode: str = "zero_shot",
            entries: Sequence[Mapping[str, Any]] | None = None, *,
            allow_unknown_provenance: bool = False) -> GuardResult:
    """Which experts may serve an eval task of (dataset, subset) under `mode` (see
    `apply_guard`)."""
    return apply_guard(self.entries() if entries is None else entries, dataset, subset, mode,
                       allow_unknown_provenance=allow_unknown_provenance)

  def report_overlaps(self, evals: Iterable[tuple[str | None, str | None]], *,
                      allow_unknown_provenance: bool = False) -> list[dict[str, Any]]:
    """For each eval (dataset, subset): the overlapping experts and what each guard mode
    excludes."""
    entries = self.entries()
    report = []
    for dataset, subset in evals:
      overlapping = [e["id"] for e in entries if overlaps(e, dataset, subset)]
      report.append({
          "dataset": dataset,
          "subset": subset,
          "overlapping": overlapping,
          "excluded": {
              m: [
                  x["id"]
                  for x in apply_guard(entries,
                                       dataset,
                                       subset,
                                       m,
                                       allow_unknown_provenance=allow_unknown_provenance).excluded
              ] for m in GUARD_MODES
          },
      })
    return report


class GuardResult:
  """Experts allowed and excluded by the contamination guard, plus the mode (recorded in
  results)."""

  def __init__(self, mode: str, allowed: list[str], excluded: list[dict[str, Any]],
               allow_unknown_provenance: bool = False):
    self.mode = mode
    self.allowed = allowed
    self.excluded = excluded
    self.allow_unknown_provenance = allow_unknown_provenance

  def to_json(self) -> dict[str, Any]:
    # Copies: a retriever shares one verdict among all prompts of a dataset.
    out = {"mode": self.mode, "num_allowed": len(self.allowed),
           "excluded": [dict(e) for e in self.excluded]}
    if self.allow_unknown_provenance:  # recorded only when used: default results stay as they were
      out["allow_unknown_provenance"] = True
    return out


def overlaps(entry: Mapping[str, Any], dataset: str | None, subset: str | None) -> bool:
  """True if any provenance item of `entry` has the normalised (dataset, subset) of the eval
  task."""
  target = normalize_dataset(dataset, subset)
  return any(normalize_dataset(p.get("dataset"), p.get("subset")) == target
             for p in entry.get("provenance") or [])


def unknown_provenance(entry: Mapping[str, Any]) -> bool:
  """True if any provenance item of `entry` records that its source is unknown."""
  return any(
      p.get("dataset") == expert_format.UNKNOWN_DATASET for p in entry.get("provenance") or [])


def apply_guard(entries: Sequence[Mapping[str, Any]], dataset: str | None, subset: str | None,
                mode: str, *, allow_unknown_provenance: bool = False) -> GuardResult:
  """The guard: `zero_shot` excludes experts trained on the eval (dataset, subset); `seen`/`off`
  exclude none.

  Under `zero_shot`, an expert of unknown provenance (it may have been trained on the eval dataset)
  is excluded too, with one warning, unless `allow_unknown_provenance` admits it.

  Args:
    entries: library entries (each with `id` and `provenance`).
    dataset: the eval task's dataset (`super_glue/rte` or with `subset`).
    subset: its subset/config, or None.
    mode: one of GUARD_MODES.
    allow_unknown_provenance: admit experts of unknown provenance under `zero_shot`.
  """
  if mode not in GUARD_MODES:
    raise LibraryError(
        f"Unknown guard mode {mode!r}; expected one of {GUARD_MODES} (zero_shot for held-out "
        f"suites, seen for seen-task RoE, off to disable).")
  if mode == "zero_shot" and normalize_dataset(dataset, subset)[0] is None:
    raise LibraryError(
        "Guard mode zero_shot needs the eval task's dataset; pass it or use --guard off.")
  allowed, excluded, unknown = [], [], []
  for e in entries:
    if mode == "zero_shot" and overlaps(e, dataset, subset):
      excluded.append({"id": e["id"], "reason": f"trained on {normalize_dataset(dataset, subset)}"})
    elif mode == "zero_shot" and not allow_unknown_provenance and unknown_provenance(e):
      excluded.append({"id": e["id"], "reason": "unknown provenance"})
      unknown.append(e["id"])
    else:
      allowed.append(e["id"])
  if unknown:
    logging.warning(
        "Guard zero_shot refuses %d expert(s) of unknown provenance for %s (%s): they may "
        "have been trained on it; pass --allow-unknown-provenance to admit them.", len(unknown),
        normalize_dataset(dataset, subset), ", ".join(unknown[:5]))
  return GuardResult(mode, allowed, excluded, allow_unknown_provenance)


def parse_eval_spec(spec: str) -> tuple[str, str | None]:
  """'super_glue/rte' or 'super_glue:rte' or 'hellaswag' -> (dataset, subset)."""
  for sep in (":", "/"):
    if sep in spec:
      dataset, subset = spec.split(sep, 1)
      return dataset, subset or None
  return spec, None


def load_eval_suite(path: str) -> list[tuple[str, str | None]]:
  """Reads eval (dataset, subset) pairs from a JSON list (objects with hf_dataset/hf_subset or
  dataset/subset)."""
  data = _read_json(path, "Eval suite")
  if not isinstance(data, list):
    raise LibraryError(
        f"Eval suite '{path}' must be a JSON list of objects with dataset/subset fields.")
  pairs = []
  for i, item in enumerate(data):
    dataset = item.get("hf_dataset", item.get("dataset"))
    if not dataset:
      raise LibraryError(f"Eval suite '{path}' item {i} has no 'dataset' or 'hf_dataset' field.")
    pairs.append((dataset, item.get("hf_subset", item.get("subset"))))
  return list(dict.fromkeys(pairs))


def library_main(argv: Sequence[str] | None = None) -> int:
  """`expert-t5x library` (the CLI lives in `library_cli`)."""
  from expert_t5x import library_cli  # pylint: disable=g-import-not-at-top
  return library_cli.main(argv)


if __name__ == "__main__":
  sys.exit(library_main())
