"""End-to-end `python -m expert_t5x.train` runs: exact resume after SIGKILL, the tiny demo, and the
retrieval keys recorded during training.

Resumption is compared with an independent uninterrupted run of the same command: the exported
expert tensors must be bitwise equal (same program, same shapes, CPU). Recorded keys are compared
with the keys of the batches replayed and sorted by rank.
"""

import functools
import json
import os
import random
import re
import subprocess
import sys
import threading
import shutil
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


def test_key_recorder_equals_choose_keys():
  from expert_t5x import train_data  # pylint: disable=g-import-not-at-top
  rng = random.Random(0)
  for trial in range(40):
    # Few distinct keys (many duplicates) or many; some negative, as int64 hashes are.
    pool = [rng.randrange(-2 ** 63, 2 ** 63) for _ in range(rng.choice([3, 30, 300]))]
    stream = [rng.choice(pool) for _ in range(rng.randrange(0, 400))]
    num_keys, seed = rng.choice([0, 1, 4, 25, 1000]), rng.randrange(5)
    recorder = train_data.KeyRecorder(num_keys, seed)
    at = 0
    while at < len(stream):  # in batches, restarted from its own keys now and then (a resume)
      size = rng.randrange(1, 9)
      recorder.add(np.asarray(stream[at:at + size], np.int64))
      at += size
      if rng.random() < 0.2:
        recorder = train_data.KeyRecorder(num_keys, seed, recorder.keys())
    assert recorder.keys() == train_data.choose_keys(stream, num_keys, seed), trial
  assert train_data.KeyRecorder(2, 0, [5, 5, 5]).keys() == [5]


class _Interrupted(Exception):
  pass


class _StopAfter:
  """A fault hook that ends the run (in process) after `step`, once its saves are written."""
  kind = None

  def __init__(self, step):
    self.step = step

  def after_step(self, step, wait_for_saves=None):
    if step == self.step:
      wait_for_saves()
      raise _Interrupted(step)

  def during_save(self, step):
    del step


STACKED_TASKS = ["demo_sentiment_review", "demo_topic_about"]
BUDGETS = [2, 5]  # the first expert stops after 2 of the program's 5 steps
NUM_KEYS = 5  # more than the 4 examples the first expert sees in its 2 batches of 2


def _train_stacked(model_dir):
  from expert_t5x import checkpoints as tc  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from expert_t5x import experts, models, network, optimizers, train, train_data, trainer
  model = models.EncoderDecoderModel(
      network.Transformer(network.get_config("tiny")), optimizer_def=optimizers.AdamW(),
      expert_config=experts.AdapterConfig(reduction_factor=4))
  train.train(model=model,
              train_dataset_cfg=train_data.DatasetConfig(STACKED_TASKS,
                                                         {"inputs": 32, "targets": 8},
                                                         batch_size=2),
              model_dir=str(model_dir), total_steps=BUDGETS, num_retrieval_keys=NUM_KEYS,
              key_seed=3,
              trainer_cls=functools.partial(trainer.Trainer,
                                            learning_rate_fn=lambda step, total: 1e-3),
              checkpoint_cfg=tc.CheckpointConfig(save=tc.SaveCheckpointConfig(period=2, keep=2)),
              eval_before_and_after=False, summarize_config_fn=None, show_progress=False)


def _keys_files(model_dir):
  return {t: (model_dir / "experts" / t / "keys.jsonl").read_bytes() for t in STACKED_TASKS}


@pytest.mark.tf
def test_recorded_keys_equal_replay_and_survive_resume(tmp_path, monkeypatch):
  # (An uninterrupted run exporting the same keys.jsonl as a resumed one: the SIGKILL tests above.)
  from expert_t5x import checkpoints, train, train_data  # pylint: disable=g-import-not-at-top
  killed, legacy = tmp_path / "killed", tmp_path / "legacy"
  # Interrupted after step 3 (checkpoint_2 saved), then resumed.
  monkeypatch.setattr(checkpoints.FaultHook, "from_env", classmethod(lambda cls: _StopAfter(3)))
  with pytest.raises(_Interrupted):
    _train_stacked(killed)
  monkeypatch.undo()
  shutil.copytree(killed, legacy)
  _train_stacked(killed)
  got = _keys_files(killed)
  # The keys the replay at export gave: each expert's own batches replayed, sorted by rank.
  for task, budget in zip(STACKED_TASKS, BUDGETS):
    cfg = train_data.DatasetConfig(task, {"inputs": 32, "targets": 8}, batch_size=2)
    seen = train._seen_keys(cfg, None, budget, (0, 1))  # pylint: disable=protected-access
    records = train_data.lookup_examples(cfg, train_data.choose_keys(seen, NUM_KEYS, 3), task)
    assert expert_format.read_keys(killed / "experts" / task) == records, task
  # The first expert's keys are all 4 examples of its own 2 batches, none of the later steps'.
  assert len(got[STACKED_TASKS[0]].splitlines()) == 4
  assert len(got[STACKED_TASKS[1]].splitlines()) == NUM_KEYS
  # A checkpoint from before keys were recorded: its consumed batches are replayed on resume.
  progress_path = legacy / train.PROGRESS_JSON
  progress = json.loads(progress_path.read_text())
  assert progress.pop(train.KEYS_PROGRESS)["step"] == 2
  progress_path.write_text(json.dumps(progress))
  _train_stacked(legacy)
  assert _keys_files(legacy) == got
