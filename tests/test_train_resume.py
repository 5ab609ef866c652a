"""End-to-end `python -m expert_t5x.train` runs: exact resume after SIGKILL, the tiny demo.

Resumption is compared with an independent uninterrupted run of the same command: the exported
expert tensors must be bitwise equal (same program, same shapes, CPU).
"""

import os
import random
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from expert_t5x import expert_format

BASE_ARGS = ["--gin_file=experts/prompt_expert.gin", "--gin_file=runs/tiny_overlay.gin",
             "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2",
             # A high learning rate so 4 steps visibly lower the loss of the random tiny model.
             "--gin.optimizers.create_learning_rate_scheduler.base_learning_rate=3e-2"]


def _start(model_dir, cache, fault=None, extra=(), log=None):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("EXPERT_T5X_FAULT", None)
  if fault:
    env["EXPERT_T5X_FAULT"] = fault
  cmd = [sys.executable, "-m", "expert_t5x.train", *BASE_ARGS, f"--gin.MODEL_DIR='{model_dir}'",
         *extra]
  out = subprocess.PIPE if log is None else log
  return subprocess.Popen(cmd, env=env, stdout=out, stderr=out, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def _expert(model_dir):
  params, meta = expert_format.load_expert(os.path.join(model_dir, "expert"))
  return expert_format.flatten_params(params), meta


@pytest.mark.slow
@pytest.mark.tf
def test_resume_after_kill_is_bitwise_equal(tmp_path):
  cache = tmp_path / "jax_cache"
  dirs = {name: tmp_path / name for name in ("straight", "after_step", "during_save")}
  first = {"straight": _start(dirs["straight"], cache),
           "after_step": _start(dirs["after_step"], cache, "kill_after_step:3"),
           "during_save": _start(dirs["during_save"], cache, "kill_during_save:4")}
  results = {k: _finish(p) for k, p in first.items()}
  rc, out, err = results["straight"]
  assert rc == 0, err[-2000:]
  # The tiny run lowers the training loss and exports keys drawn from what it trained on.
  first_loss, last_loss = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
  assert last_loss < first_loss
  assert results["after_step"][0] == -9 and results["during_save"][0] == -9
  assert os.path.isfile(dirs["straight"] / "base.json")
  assert os.path.isfile(dirs["straight"] / "config.gin")
  # Restart both killed runs with the same command (no fault): they resume on their own from
  # checkpoint_2 (the kill during the final save at step 4 leaves checkpoint_2 intact).
  second = {k: _start(dirs[k], cache) for k in ("after_step", "during_save")}
  for k, proc in second.items():
    rc, out, err = _finish(proc)
    assert rc == 0, err[-2000:]
    assert "Resuming from" in err, err[-2000:]
  want, meta = _expert(dirs["straight"])
  assert meta["training"]["steps"] == 4 and meta["type"] == "adapter"
  keys = expert_format.read_keys(dirs["straight"] / "expert")
  assert 0 < len(keys) <= 4 and all(k["answer_choices"] for k in keys)
  files = {p.name: p.read_bytes() for p in (dirs["straight"] / "expert").iterdir()}
  for k in ("after_step", "during_save"):
    got, _ = _expert(dirs[k])
    assert sorted(got) == sorted(want)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{k}: {name}")
    # The files too: params.safetensors bytes are deterministic and expert.json keeps the first
    # run's first loss and accuracy before training (train_progress.json), so all are equal.
    assert {p.name: p.read_bytes() for p in (dirs[k] / "expert").iterdir()} == files, k


def _names(model_dir):
  """The names in a run directory (checkpoint and export temp dirs appear there)."""
  try:
    return set(os.listdir(model_dir))
  except FileNotFoundError:
    return set()


# Where a kill's delay counts from: the run's start ("any": anywhere in the run), or the first
# checkpoint or expert temp dir in the run directory (inside a save or the export).
TRIGGERS = {"any": None, "save": ".orbax-checkpoint-tmp", "export": ".expert.tmp-"}


def _wait_for(proc, model_dir, name_part):
  while proc.poll() is None and not any(name_part in n for n in _names(model_dir)):
    time.sleep(0.002)  # polls the run's files, not a clock: kills follow the run's progress


def _kill_at(proc, model_dir, kind, delay):
  """SIGKILLs `proc` (just started) `delay` seconds after its TRIGGERS[kind] appears.

  Returns (what the kill hit, or None when the run ended first; seconds from the trigger on).
  """
  if TRIGGERS[kind]:
    _wait_for(proc, model_dir, TRIGGERS[kind])
  triggered = time.monotonic()
  while proc.poll() is None and time.monotonic() < triggered + delay:
    time.sleep(0.002)
  elapsed, names = time.monotonic() - triggered, sorted(_names(model_dir))
  if proc.poll() is not None:
    return None, elapsed
  proc.kill()
  proc.wait()
  present = ", ".join(n for n in names if "tmp" in n) or (names or ["nothing yet"])[-1]
  return f"{kind} +{elapsed:.3f}s ({present})", elapsed


@pytest.mark.slow
@pytest.mark.tf
def test_resume_after_random_kills_is_bitwise_equal(tmp_path):
  # SIGKILLs at seeded random moments: inside a checkpoint save (first, while the run still saves),
  # then anywhere in the run and inside the expert export in random order, resuming each time with
  # the same command. The final expert files equal an uninterrupted run's byte for byte.
  seed = int(os.environ.get("EXPERT_T5X_KILL_SEED", random.SystemRandom().randrange(2 ** 31)))
  rng = random.Random(seed)
  kinds = ["save", *rng.sample(["any", "export"], 2)]
  delays = {"save": rng.uniform(0, 0.4), "export": rng.uniform(0, 0.01)}
  fraction = rng.random()  # of a run's length, for the "any" kill
  cache, straight, killed = tmp_path / "jax_cache", tmp_path / "straight", tmp_path / "killed"
  reference = _start(straight, cache, log=open(tmp_path / "straight.log", "w"))
  started, ended = time.monotonic(), []
  waiter = threading.Thread(target=lambda: ended.append((reference.wait(), time.monotonic())))
  waiter.start()  # the uninterrupted run goes beside the first leg and times itself
  hits, leg = [], 0
  for kind in kinds:
    if kind == "any":
      waiter.join(timeout=600)
      delays["any"] = fraction * (ended[0][1] - started)
    for _ in range(3):  # a run that ends before the moment is rerun with the moment moved earlier
      proc = _start(killed, cache, log=open(tmp_path / f"leg{leg}.log", "w"))
      leg += 1
      hit, elapsed = _kill_at(proc, killed, kind, delays[kind])
      if hit:
        break
      delays[kind] = fraction * elapsed if kind == "any" else delays[kind] / 2
    hits.append(hit or f"{kind}: each run ended first")
  waiter.join(timeout=600)
  assert ended[0][0] == 0, (tmp_path / "straight.log").read_text()[-2000:]
  log = tmp_path / "final.log"
  rc = _start(killed, cache, log=open(log, "w")).wait(timeout=600)
  context = f"seed {seed} (rerun with EXPERT_T5X_KILL_SEED={seed}); kills: {hits}"
  print(context)
  assert rc == 0, f"{context}\n{log.read_text()[-2000:]}"
  want = {p.name: p.read_bytes() for p in (straight / "expert").iterdir()}
  got = {p.name: p.read_bytes() for p in (killed / "expert").iterdir()}
  assert sorted(want) == ["expert.json", "keys.jsonl", "params.safetensors"], context
  assert sorted(got) == sorted(want), context
  for name in want:
    assert got[name] == want[name], f"{name} differs; {context}"
  # No killed save's or export's temporary folder outlives the final run.
  leftovers = [n for n in _names(killed) if ("tmp" in n or ".old-" in n) and (killed / n).is_dir()]
  assert not leftovers, f"{leftovers} left in the run directory; {context}"


@pytest.mark.slow
@pytest.mark.tf
def test_demo_beats_chance(tmp_path):
  # The README's first command, run as written (relative MODEL_DIR) from a directory that holds a
  # user's runs/, experts/ and gin/ folders: `python -m` puts it on sys.path, and none of them may
  # be taken for the shipped gin folders.
  for name in ("runs", "experts", "gin"):
    (tmp_path / name).mkdir()
  (tmp_path / "experts" / "prompt_expert.gin").write_text("THIS_IS_NOT_OURS = 1\n")
  cmd = [sys.executable, "-m", "expert_t5x.train", "--gin_file=demo/local_tiny.gin",
         "--gin.MODEL_DIR='runs/tiny'"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-2000:]
  # The run reports its first and last step's loss and rank-classification accuracy on the task's
  # validation split before and after training; chance is the mean of 1 / (number of choices).
  first_loss, last_loss = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
  accuracy, before, chance = map(float, re.search(
      r"validation: ([\d.]+) \(before training ([\d.]+)\), chance ([\d.]+)", proc.stdout).groups())
  assert last_loss < 0.5 * first_loss, proc.stdout
  assert accuracy > chance + 0.15 and accuracy > before + 0.1, proc.stdout
  # Rerunning the finished run re-exports it: the expert directory is byte-for-byte the same
  # (losses and accuracy before training kept from the first run, not nulled).
  expert_dir = tmp_path / "runs" / "tiny" / "expert"
  files = {p.name: p.read_bytes() for p in expert_dir.iterdir()}
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
  assert again.returncode == 0, again.stderr[-2000:]
  assert {p.name: p.read_bytes() for p in expert_dir.iterdir()} == files
  metrics = expert_format.read_metadata(expert_dir)["metrics"]
  assert metrics["first_loss"] == first_loss or abs(metrics["first_loss"] - first_loss) < 1e-4
  assert metrics["validation_accuracy_before"] is not None
