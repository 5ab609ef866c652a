"""Training checkpoints: orbax in T5X's layout, exact resume, base pinning, preemption and faults.

Layout (what upstream T5X writes with orbax): `MODEL_DIR/checkpoint_<step>/state/...` holding

    {'target': trainable params, 'state': {'step', 'param_states': optimizer state},
     'rng': dropout seed keys, 'data': {'seed', 'batches_consumed'}}

For a frozen-base run `target` is the expert only, and `MODEL_DIR/base.json` records the base
checkpoint and its fingerprint; restoring against another base is refused. For full fine-tuning
`target` is the whole parameter tree (upstream T5X can restore it params-only).

Saves are asynchronous and always waited for before the next save, a restore or exit; a crash
mid-save leaves the previous checkpoint intact (orbax commits a step by renaming its directory).
Once a save is durable, the sha256 of each of its files goes to `MODEL_DIR/checkpoint_digests.json`;
`restore_newest_intact` checks them (and that every restored float is finite), moves a damaged
checkpoint to `MODEL_DIR/damaged_checkpoints/` and falls back to the next older one, saying which
and why. Orbax itself stores no checksums, so a flipped bit would otherwise restore as garbage.
`EXPERT_T5X_FAULT=kill_after_step:N` / `kill_during_save:N` (tests only) sends SIGKILL at that
point so resumption can be tested against an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import hashlib
import shutil
import signal
import sys
from typing import Any, Optional

import jax
import numpy as np

from expert_t5x import file_io
from expert_t5x import validation

BASE_JSON = "base.json"
DIGESTS_JSON = "checkpoint_digests.json"
DAMAGED_DIR = "damaged_checkpoints"
FAULT_ENV = "EXPERT_T5X_FAULT"
CHECKPOINT_PREFIX = "checkpoint"
STATE_ITEM = "state"


@dataclasses.dataclass
class SaveCheckpointConfig:
  """T5X's save settings: `period` in steps (None: only at the end), `keep` newest (None: all)."""
  period: Optional[int] = None
  keep: Optional[int] = None
  dtype: str = "float32"
  async_save: bool = True

  def check(self) -> None:
    """Settings out of range, named by their gin macros (`train` calls it before writing)."""
    validation.optional_positive_int("CHECKPOINT_PERIOD", self.period,
                                     "use None to save only at the end")
    validation.optional_positive_int("CHECKPOINTS_TO_KEEP", self.keep, "use None to keep all")


@dataclasses.dataclass
class RestoreCheckpointConfig:
  """Where the base comes from (`path`: an HF T5 directory or a T5X checkpoint; None: random init
  for tests and demos). Resuming from `MODEL_DIR` is automatic."""
  path: Optional[str] = None
  dtype: str = "float32"


@dataclasses.dataclass
class CheckpointConfig:
  save: Optional[SaveCheckpointConfig] = None
  restore: Optional[RestoreCheckpointConfig] = None


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


class FaultHook:
  """Test-only fault injection from `EXPERT_T5X_FAULT` (`kill_after_step:N`,
  `kill_during_save:N`)."""

  def __init__(self, spec: Optional[str]):
    self.kind, self.step = None, None
    if spec:
      kind, _, step = spec.partition(":")
      if kind not in ("kill_after_step", "kill_during_save") or not step.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r} must be kill_after_step:N or kill_during_save:N.")
      self.kind, self.step = kind, int(step)

  @classmethod
  def from_env(cls) -> "FaultHook":
    return cls(os.environ.get(FAULT_ENV))

  def _kill(self, where: str) -> None:
    logging.warning("%s: SIGKILL %s", FAULT_ENV, where)
    os.kill(os.getpid(), signal.SIGKILL)

  def after_step(self, step: int, wait_for_saves=None) -> None:
    """Kills after `step`, once pending saves are durable (what 'after step N' promises)."""
    if self.kind == "kill_after_step" and step == self.step:
      if wait_for_saves is not None:
        wait_for_saves()
      self._kill(f"after step {step}")

  def during_save(self, step: int) -> None:
    if self.kind == "kill_during_save" and step == self.step:
      self._kill(f"while saving step {step}")


class CheckpointManager:
  """orbax `CheckpointManager` over `MODEL_DIR/checkpoint_<step>/state`."""

  def __init__(self, model_dir: str, keep: Optional[int] = None, async_save: bool = True,
               fault_hook: Optional[FaultHook] = None):
    ocp = _ocp()
    self.model_dir = os.path.abspath(model_dir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix=CHECKPOINT_PREFIX, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.model_dir, options=options,
                                          item_names=(STATE_ITEM,))
    self.fault_hook = fault_hook or FaultHook(None)

    self._undigested: list[int] = []

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.model_dir, f"{CHECKPOINT_PREFIX}_{step}")

  def _file_digests(self, step: int) -> dict[str, str]:
    root = self._step_dir(step)
    out = {}
    for folder, _, files in os.walk(root):
      for name in files:
        path = os.path.join(folder, name)
        h = hashlib.sha256()
        with open(path, "rb") as f:
          for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        out[os.path.relpath(path, root)] = h.hexdigest()
    return out

  def _read_digests(self) -> dict[str, dict[str, str]]:
    data = file_io.read_json_or_empty(os.path.join(self.model_dir, DIGESTS_JSON),
                                      "checkpoints are checked by restoring them only.")
    return data if isinstance(data, dict) else {}

  def _record_digests(self) -> None:
    """Digests of the saves that became durable since the last call (process 0 writes them)."""
    if not self._undigested or jax.process_index() != 0:
      self._undigested = []
      return
    digests = self._read_digests()
    self._manager.reload()
    steps = set(self._manager.all_steps())
    for step in self._undigested:
      if step in steps:
        digests[str(step)] = self._file_digests(step)
    digests = {k: v for k, v in digests.items() if k.isdigit() and int(k) in steps}
    path = os.path.join(self.model_dir, DIGESTS_JSON)
    file_io.atomic_write_json(path, digests, indent=1, sort_keys=True)
    self._undigested = []

  def check_files(self, step: int) -> Optional[str]:
    """Why checkpoint `step`'s files differ from their recorded digests (None: they match, or
    none were recorded: a crash right after the commit)."""
    recorded = self._read_digests().get(str(step))
    if not isinstance(recorded, dict):
      return None
    actual = self._file_digests(step)
    for name, digest in sorted(recorded.items()):
      if name not in actual:
        return f"{name} is missing"
      if actual[name] != digest:
        return f"{name} does not match its recorded sha256"
    return None

  def set_aside(self, step: int) -> str:
    """Moves a damaged checkpoint out of the step list (kept for inspection) and returns where."""
    target = os.path.join(self.model_dir, DAMAGED_DIR, f"{CHECKPOINT_PREFIX}_{step}")
    if os.path.exists(target):
      shutil.rmtree(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(self._step_dir(step), target)
    self._manager.reload()
    return target

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, tree: Any) -> None:
    """Starts an (async) save of `tree` at `step`, after any previous save finished."""
    ocp = _ocp()
    self._manager.wait_until_finished()
    if step in self._manager.all_steps():
      return
    self._record_digests()
    self._manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree)}),
                       force=True)
    self._undigested.append(step)
    self.fault_hook.during_save(step)

  def restore(self, step: int, abstract_tree: Any) -> Any:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_tree`."""
    ocp = _ocp()
    self._manager.wait_until_finished()
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_tree)}))
    return restored[STATE_ITEM]

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._record_digests()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._record_digests()
    self._manager.close()

  def restore_newest_intact(self, abstract_tree: Any) -> tuple[Optional[int], Any]:
    """(step, tree) of the newest checkpoint whose files match their digests, that restores and
    holds only finite floats; damaged newer ones are set aside with a line saying why.

    Returns (None, None) when there is no checkpoint. Raises ValueError when every one is damaged
    (training on from garbage or silently from scratch would both be wrong)."""
    self.wait()
    problems = []
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      why = self.check_files(step)
      tree = None
      if why is None:
        try:
          tree = self.restore(step, abstract_tree)
        except Exception as e:  # pylint: disable=broad-except
          why = f"it does not restore ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      if why is None:
        bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating)
               and not np.all(np.isfinite(np.asarray(x)))]
        if bad:
          why = f"it holds non-finite values in {bad[0]}"
      if why is None:
        if problems:
          print(f"Resuming from the newest intact checkpoint, checkpoint_{step}.", file=sys.stderr,
                flush=True)
        return step, tree
      moved = self.set_aside(step) if jax.process_index() == 0 else self._step_dir(step)
      problems.append(f"checkpoint_{step} ({why})")
      print(f"Warning: checkpoint_{step} in {self.model_dir} is damaged: {why}; moved to "
            f"{moved}.", file=sys.stderr, flush=True)
    if problems:
      raise ValueError(f"Every checkpoint in {self.model_dir} is damaged: {'; '.join(problems)}; "
                       f"they were moved to {DAMAGED_DIR}/. Rerun to train from the start, or "
                       "restore a copy of the run.")
    return None, None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s carrying the target shardings (restore places arrays directly)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ------------------------------------------------------------------------- base pinning


def write_base_json(model_dir: str, base_path: Optional[str], fingerprint: str,
                    config_name: Optional[str] = None) -> None:
  """Records the frozen base this run trains on (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, BASE_JSON)
  file_io.atomic_write_json(
      path, {"path": base_path, "fingerprint": fingerprint, "config_name": config_name}, indent=2)


def check_base_json(model_dir: str, fingerprint: str, base_path: Optional[str]) -> None:
  """Refuses to resume a run whose `base.json` names a different base."""
  path = os.path.join(model_dir, BASE_JSON)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    recorded = None
  if not isinstance(recorded, dict) or not isinstance(recorded.get("fingerprint"), str):
    raise validation.DataError(
        f"'{path}' is damaged (expected {{'path', 'fingerprint', 'config_name'}} of the base this "
        f"run trains on); delete it to resume on INITIAL_CHECKPOINT_PATH={base_path!r} if the "
        "checkpoints were trained on that base, or use a new MODEL_DIR.")
  if recorded.get("fingerprint") != fingerprint:
    raise ValueError(
        f"MODEL_DIR {model_dir!r} holds checkpoints trained on base "
        f"{recorded.get('path')!r} (fingerprint {recorded.get('fingerprint', '')[:12]}), "
        f"but INITIAL_CHECKPOINT_PATH={base_path!r} has fingerprint {fingerprint[:12]}; "
        "use the original base or a new MODEL_DIR.")


class PreemptionHandler:
  """Turns SIGTERM (TPU/GPU preemption) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "PreemptionHandler":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting.")
    self.requested = True

  def __exit__(self, *exc: Any) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
