"""Result shards are never trusted when damaged: a resumed evaluation over truncated, garbled,
altered or header-less shards logs one warning per shard and gives a clean run's files."""

import logging
import os
import shutil

import pytest

from expert_t5x import base_models
from expert_t5x import eval_experts
from expert_t5x import evaluation
from expert_t5x import results
from expert_t5x import shards

import eval_fakes


@pytest.fixture(scope="module")
def base():
  return base_models.load_base(model_config="tiny", random_init_seed=0,
                               config_overrides={"vocab_size": eval_fakes.VOCAB_SIZE})


def _run(output_dir, base, **kwargs):
  return evaluation.evaluate(tasks="fake_suite", output_dir=str(output_dir), base=base,
                             batch_size=8, progress=False, task_source=eval_fakes.make_source(n=6),
                             bootstrap_samples=20, **kwargs)


def _truncate(lines):
  return lines[:-2]


def _garble(lines):
  return lines[:2] + [lines[2][:len(lines[2]) // 2]] + lines[3:]


def _alter(lines):  # Still valid JSON, another score: only the records' digest tells.
  return lines[:1] + [lines[1].replace('"choice_scores": [-', '"choice_scores": [-1')] + lines[2:]


def _drop_header(lines):
  return ['{"stats": {}}'] + lines[1:]


def test_damaged_shards_are_recomputed_and_resume_equals_a_clean_run(base, tmp_path, caplog,
                                                                      monkeypatch):
  _run(tmp_path / "clean", base)
  shutil.copytree(tmp_path / "clean", tmp_path / "resumed")
  for name in (results.PREDICTIONS_FILE, results.RESULTS_FILE):
    os.remove(tmp_path / "resumed" / name)
  root = tmp_path / "resumed" / shards.SHARDS_DIR / eval_experts.BASE_ID
  paths = sorted(os.path.join(root, n) for n in os.listdir(root))
  assert len(paths) == 3
  damage = {paths[0]: _truncate, paths[1]: _garble, paths[2]: _alter}
  for path, fn in damage.items():
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    altered = fn(lines)
    assert altered != lines
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(altered) + "\n")
  computed = []
  real_run_shard = shards.run_shard
  monkeypatch.setattr(shards, "run_shard",
                      lambda *a, **k: computed.append(a[1].name) or real_run_shard(*a, **k))
  with caplog.at_level(logging.WARNING):
    _run(tmp_path / "resumed", base)
  assert len(computed) == 3
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 3
  for path, why in zip(paths, ("records where its header implies", "not valid JSON",
                               "do not match their sha256")):
    assert any(path in w and why in w for w in warnings), (path, warnings)
  for name in (results.PREDICTIONS_FILE, results.RESULTS_FILE, results.CSV_FILE):
    assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()

  # An unreadable header line: recomputed too; then every shard is intact and nothing is redone.
  with open(paths[0], encoding="utf-8") as f:
    lines = f.read().splitlines()
  with open(paths[0], "w", encoding="utf-8") as f:
    f.write("\n".join(_drop_header(lines)) + "\n")
  computed.clear()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _run(tmp_path / "resumed", base)
  assert len(computed) == 1
  assert any(paths[0] in r.getMessage() and "header line is unreadable" in r.getMessage()
             for r in caplog.records)
  computed.clear()
  _run(tmp_path / "resumed", base)
  assert not computed
  assert ((tmp_path / "clean" / results.RESULTS_FILE).read_bytes()
          == (tmp_path / "resumed" / results.RESULTS_FILE).read_bytes())
