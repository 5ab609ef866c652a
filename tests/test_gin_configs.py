"""Every shipped gin combination parses through `python -m expert_t5x.train --gin_parse_only`.

Each combination runs in its own interpreter (gin files written T5X's way bind `__main__.train`,
which exists only under `python -m`); the processes run concurrently to share the import cost.
"""

import os
import subprocess
import sys

import pytest

from expert_t5x import gin_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = os.path.join(ROOT, "gin")
REQUIRED = ["--gin.MODEL_DIR='{d}'", "--gin.INITIAL_CHECKPOINT_PATH='/ckpt'"]
EXPERT_GINS = sorted(f"experts/{f}" for f in os.listdir(os.path.join(GIN, "experts")))
PARTITIONING_GINS = sorted(
    f"partitioning/{f}" for f in os.listdir(os.path.join(GIN, "partitioning")))
MODEL_GINS = sorted(f"models/{f}" for f in os.listdir(os.path.join(GIN, "models")))
MEMORY_GINS = sorted(f"memory/{f}" for f in os.listdir(os.path.join(GIN, "memory")))


def _combinations():
  combos = []
  for expert in EXPERT_GINS:
    extra = [] if "multitask" in expert else ["--gin.MIXTURE_OR_TASK_NAME='demo_sentiment_review'"]
    combos.append(([expert], extra))
  combos.append((["demo/local_tiny.gin"], []))
  combos.append((["experts/prompt_expert.gin", "runs/tiny_overlay.gin"], []))
  combos.append((["experts/lora_expert.gin"] + MEMORY_GINS,
                 ["--gin.MIXTURE_OR_TASK_NAME='demo_sentiment_review'"]))
  combos.append((["runs/finetune.gin"] + MODEL_GINS + PARTITIONING_GINS,
                 ["--gin.MIXTURE_OR_TASK_NAME='t0_train'", "--gin.TRAIN_STEPS=10",
                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}"]))
  return combos


def _cmd(files, extra, model_dir):
  return ([sys.executable, "-m", "expert_t5x.train"] + [f"--gin_file={f}" for f in files] +
          [r.format(d=model_dir) for r in REQUIRED] + extra + ["--gin_parse_only"])


@pytest.mark.tf
def test_every_shipped_gin_combination_parses(tmp_path):
  combos = _combinations()
  procs = []
  for i, (files, extra) in enumerate(combos):
    model_dir = tmp_path / f"m{i}"
    procs.append((files, model_dir, subprocess.Popen(
        _cmd(files, extra, model_dir), cwd=str(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)))
  failures = []
  for files, model_dir, proc in procs:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or not (model_dir / "config.gin").exists():
      failures.append(f"{files}: rc={proc.returncode} {err[-800:]}")
  assert not failures, "\n".join(failures)
  # Every shipped training gin file is covered by some combination.
  covered = {f for files, _ in combos for f in files}
  shipped = {os.path.relpath(os.path.join(d, f), GIN) for d, _, fs in os.walk(GIN) for f in fs
             if f.endswith(".gin")}
  included = {"models/t5_1_1_base.gin"}
  others = ("runs/eval", "runs/infer", "runs/anchors", "t5x/")  # the evaluator's gin files
  missing = sorted(f for f in shipped - covered - included if not f.startswith(others))
  assert not missing, missing


@pytest.mark.tf
def test_missing_required_are_reported_together_and_help_exits_zero(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "expert_t5x.train",
                         "--gin_file=experts/prompt_expert.gin", "--gin_parse_only"],
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2  # a usage error: settings missing
  last = proc.stderr.strip().splitlines()[-1]
  for name in ("INITIAL_CHECKPOINT_PATH", "MIXTURE_OR_TASK_NAME", "MODEL_DIR"):
    assert name in last, last
  help_proc = subprocess.run([sys.executable, "-m", "expert_t5x.train", "--help"],
                             capture_output=True, text=True, timeout=300)
  assert help_proc.returncode == 0 and "gin_file" in help_proc.stdout + help_proc.stderr


def test_rewrite_gin_args_and_search_paths():
  assert gin_utils.rewrite_gin_args(["prog", "--gin.MODEL_DIR='/x'", "--other=1"]) == [
      "prog", "--gin_bindings=MODEL_DIR = '/x'", "--other=1"]
  with pytest.raises(ValueError, match="has no value"):
    gin_utils.rewrite_gin_args(["--gin.MODEL_DIR"])
  assert os.path.isfile(os.path.join(gin_utils.shipped_gin_dir(), "runs", "finetune.gin"))
  with pytest.raises(ValueError, match="No --gin_file"):
    gin_utils.parse_gin_flags([], [], [])
  with pytest.raises(ValueError, match="Gin file not found"):
    gin_utils.parse_gin_flags([], ["does/not/exist.gin"], [])


@pytest.fixture
def main_train(monkeypatch):
  """`__main__.train` as `python -m expert_t5x.train` registers it (the gin files bind it)."""
  import __main__  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from expert_t5x import train  # pylint: disable=g-import-not-at-top
  try:
    wrapped = gin.external_configurable(train.train, "train", module="__main__")
  except ValueError:  # registered by an earlier test in this process
    wrapped = train.train
  monkeypatch.setattr(__main__, "train", wrapped, raising=False)
  yield
  gin.clear_config()


def test_user_folders_on_sys_path_never_shadow_the_shipped_configs(tmp_path, monkeypatch,
                                                                   main_train):
  # `python -m` puts the working directory first on sys.path; a user's runs/ folder (a namespace
  # package to importlib) made gin's package reader fail with a TypeError, and a user's
  # experts/prompt_expert.gin would have been included in place of ours.
  (tmp_path / "runs" / "tiny").mkdir(parents=True)
  (tmp_path / "experts").mkdir()
  (tmp_path / "experts" / "prompt_expert.gin").write_text("NOT_OURS = 1\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  gin_utils.parse_gin_flags(["."], ["demo/local_tiny.gin"], ["MODEL_DIR = 'runs/tiny'"],
                            finalize=False)
  import gin  # pylint: disable=g-import-not-at-top
  assert gin.query_parameter("TRAIN_STEPS/macro.value") == 300
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  assert ("NOT_OURS", "gin.macro") not in gin_config._CONFIG  # pylint: disable=protected-access
  # A user's own file under a name we do not ship still resolves from the working directory.
  (tmp_path / "runs" / "mine.gin").write_text("include 'demo/local_tiny.gin'\nTRAIN_STEPS = 7\n")
  gin_utils.parse_gin_flags(["."], ["runs/mine.gin"], ["MODEL_DIR = 'runs/tiny'"], finalize=False)
  assert gin.query_parameter("TRAIN_STEPS/macro.value") == 7
  gin.clear_config()


@pytest.mark.parametrize("files,bindings,match", [
    ([], ["TRAIN_STEPZ = 3"], "Unknown gin setting"),
    (["bad.gin"], [], "Gin syntax error in .*bad.gin"),
    ([], ["TRAIN_STEPS = float('nan')"], "Gin syntax error"),
    ([], ["TRAIN_STEPS = (1,"], "Gin syntax error"),
])
def test_gin_input_errors_are_one_line(tmp_path, monkeypatch, main_train, files, bindings, match):
  (tmp_path / "bad.gin").write_text("TRAIN_STEPS = = 3\n")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=match) as info:
    gin_utils.parse_gin_flags(["."], ["demo/local_tiny.gin", *files],
                              ["MODEL_DIR = 'm'", *bindings], finalize=False)
  assert "\n" not in str(info.value)
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
