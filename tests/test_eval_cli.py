"""End-to-end evaluation entry points on the demo suite with a tiny random base: every output file,
results.json consistent with predictions.jsonl, the anchors plumbing (fabricated expected numbers),
gin files and --help."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from expert_t5x import base_models
from expert_t5x import scoring
from expert_t5x import eval as eval_entry
from expert_t5x import results

import eval_fakes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_VOCAB = 512  # The byte vocabulary of the demo tasks (259 ids) fits in the tiny model's 512.
BASE_FLAGS = ["--model_config", "tiny", "--vocab_size", str(DEMO_VOCAB), "--random_init_seed", "0",
              "--max_examples", "8", "--batch_size", "8", "--bootstrap_samples", "100",
              "--no_progress"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  base = base_models.load_base(model_config="tiny", random_init_seed=0,
                               config_overrides={"vocab_size": DEMO_VOCAB})
  experts = eval_fakes.save_adapter_experts(str(root / "experts"), base.params, base.config,
                                            [1, 2], fingerprint=base.fingerprint)
  out = root / "out"
  rc = eval_entry.cli_main(["--tasks", "demo_heldout", "--output_dir", str(out), "--experts",
                            *experts, *BASE_FLAGS])
  return rc, out, experts


@pytest.mark.tf
def test_cli_on_demo_heldout_writes_consistent_files(demo_run):
  rc, out, _ = demo_run
  assert rc == 0
  for name in (results.PREDICTIONS_FILE, results.RESULTS_FILE, results.CSV_FILE,
               results.MARKDOWN_FILE, results.MATRIX_FILE):
    assert (out / name).is_file(), name
  res = results.read_results(str(out / results.RESULTS_FILE))
  preds = results.read_jsonl(str(out / results.PREDICTIONS_FILE))
  import seqio_tasks  # pylint: disable=g-import-not-at-top
  tasks = seqio_tasks.suite("demo_heldout")
  assert [e["id"] for e in res["entries"]] == ["expert_1", "expert_2"]
  assert len(preds) == 2 * len(tasks) * 8
  for p in preds:
    results.validate_prediction(p)
  # Recompute every prompt accuracy and the overall means from the predictions alone.
  for entry in res["entries"]:
    mine = [p for p in preds if p["expert_ids"] == [entry["id"]]]
    by_ds = {}
    for prompt in entry["prompts"]:
      rows = [p for p in mine if p["task"] == prompt["task"]]
      acc = 100.0 * np.mean([p["pred"] == p["gold"] for p in rows])
      assert prompt["accuracy"] == pytest.approx(acc)
      by_ds.setdefault(seqio_tasks.get_info(prompt["task"]).eval_dataset, []).append(acc)
    assert entry["overall"]["mean"] == pytest.approx(np.mean([np.mean(v) for v in by_ds.values()]))
    assert entry["overall"]["median"] == pytest.approx(
        np.mean([np.median(v) for v in by_ds.values()]))
  acc, expert_ids, prompt_ids = results.read_matrix(str(out / results.MATRIX_FILE))
  assert acc.shape == (2, len(tasks)) and sorted(prompt_ids) == sorted(tasks)
  assert res["protocol"]["scoring"] == "sum" and res["model"]["base"] == "random:tiny:seed=0"
  assert res["environment"]["packages"]["seqio"]
  # Experts evaluated: the paper's PE-config input length by default, recorded.
  assert res["protocol"]["feature_lengths"] == {"inputs": 256, "targets": None}
  assert res["protocol"]["input_length"] == {"tokens": 256, "paper_setting": "pe_256"}


@pytest.mark.tf
def test_cli_base_alone_defaults_to_512_and_a_given_length_wins(tmp_path):
  task = "demo_membership_in_list_score_eval"
  flags = ["--tasks", task, "--model_config", "tiny", "--vocab_size", str(DEMO_VOCAB),
           "--random_init_seed", "0", "--max_examples", "4", "--batch_size", "4",
           "--bootstrap_samples", "0", "--no_progress"]
  assert eval_entry.cli_main([*flags, "--output_dir", str(tmp_path / "a")]) == 0
  res = results.read_results(str(tmp_path / "a" / results.RESULTS_FILE))
  assert res["protocol"]["input_length"] == {"tokens": 512, "paper_setting": "long_512"}
  assert eval_entry.cli_main([*flags, "--output_dir", str(tmp_path / "b"),
                              "--max_input_length", "100"]) == 0
  res = results.read_results(str(tmp_path / "b" / results.RESULTS_FILE))
  assert res["protocol"]["input_length"] == {"tokens": 100, "paper_setting": None}


@pytest.mark.tf
def test_cli_anchors_pass_and_fail_on_fabricated_expectations(demo_run, tmp_path, capsys):
  _, out, experts = demo_run
  base = results.read_results(str(out / results.RESULTS_FILE))["entries"][0]
  # Fabricated expectations from this very run (plumbing only): equal numbers pass...
  good = {"name": "fabricated", "entry": "expert_1", "tolerance": 0.01,
          "datasets": {d["dataset"]: d["mean"] for d in base["datasets"]},
          "overall": base["overall"]["mean"]}
  (tmp_path / "good.json").write_text(json.dumps(good))
  # (Every shard is done: these runs resume and only re-aggregate.)
  rc = eval_entry.cli_main(["--tasks", "demo_heldout", "--output_dir", str(out), "--experts",
                            *experts, "--expected", str(tmp_path / "good.json"), *BASE_FLAGS])
  assert rc == 0 and "PASS" in (out / eval_entry.ANCHORS_FILE).read_text()
  # ... and numbers 10 points off fail with exit status 1.
  bad = dict(good, overall=base["overall"]["mean"] + 10.0)
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  rc = eval_entry.cli_main(["--tasks", "demo_heldout", "--output_dir", str(out), "--experts",
                            *experts, "--expected", str(tmp_path / "bad.json"), *BASE_FLAGS])
  assert rc == 1 and "FAIL" in capsys.readouterr().out


@pytest.mark.tf
def test_cli_errors_are_one_line(tmp_path, capsys):
  rc = eval_entry.cli_main(["--tasks", "demo_nope", "--output_dir", str(tmp_path), *BASE_FLAGS])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("expert-t5x eval: unknown task 'demo_nope'")
  assert len(err.splitlines()) == 1
  rc = eval_entry.cli_main(["--tasks", "demo_heldout", "--output_dir", str(tmp_path),
                            "--model_config", "tiny", "--random_init_seed", "0",
                            "--vocab_size", "64", "--no_progress"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "Vocabulary mismatch" in err and len(err.splitlines()) == 1
  rc = eval_entry.cli_main(["--tasks", "demo_heldout", "--output_dir", str(tmp_path),
                            "--checkpoint_path", str(tmp_path / "missing")])
  assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cli_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as e:
    eval_entry.cli_main(["--help"])
  assert e.value.code == 0 and "--experts_per_pass" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.tf
def test_gin_entry_point_with_anchors_file(tmp_path):
  # The gin entry point as users run it, in its own process; the anchors file is fabricated.
  expected = {"name": "fabricated", "datasets": {}, "overall": {"value": -100.0, "tolerance": 1}}
  (tmp_path / "expected.json").write_text(json.dumps(expected))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "expert_t5x.eval", "--gin_file=runs/eval.gin",
         f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'out'}'", "--gin.CHECKPOINT_PATH=None",
         "--gin.MIXTURE_OR_TASK_NAME='demo_membership_in_list_score_eval'",
         "--gin.MODEL_CONFIG='tiny'", "--gin.RANDOM_INIT_SEED=0",
         f"--gin.CONFIG_OVERRIDES={{'vocab_size': {DEMO_VOCAB}}}", "--gin.MAX_EXAMPLES=8",
         "--gin.BATCH_SIZE=8", "--gin.BOOTSTRAP_SAMPLES=10", "--gin.PROGRESS=False",
         f"--gin.EXPECTED='{tmp_path / 'expected.json'}'"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-2000:]  # The fabricated overall is far off: FAIL.
  assert "FAIL" in (tmp_path / "out" / eval_entry.ANCHORS_FILE).read_text()
  assert (tmp_path / "out" / results.RESULTS_FILE).is_file()
  missing = subprocess.run([sys.executable, "-m", "expert_t5x.eval", "--gin_file=runs/eval.gin"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert missing.returncode == 2
  assert "Required gin settings are unset: CHECKPOINT_PATH, EVAL_OUTPUT_DIR, " in missing.stderr
  helped = subprocess.run([sys.executable, "-m", "expert_t5x.eval", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert helped.returncode == 0


@pytest.mark.tf
def test_shipped_eval_gin_files_parse():
  # Every shipped evaluation gin file parses with its required settings given (gin's own parser).
  import gin  # pylint: disable=g-import-not-at-top
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  gin_utils.configurable(eval_entry.evaluate)  # registered as the gin entry point registers it
  # (Only settings each file uses: a setting no file uses is refused as a misspelling.)
  evals = ["EVAL_OUTPUT_DIR = '/tmp/x'"]
  heldout = evals + ["MIXTURE_OR_TASK_NAME = 'demo_heldout'"]
  for name, extra in (("runs/eval.gin", heldout),
                      ("runs/anchors/t0_3b.gin", evals),
                      ("runs/infer.gin", ["INFER_INPUTS = ['x']",
                                          "INFER_OUTPUT_FILE = '/tmp/x.jsonl'"]),
                      (["runs/eval.gin", "runs/eval_input_pe_256.gin"], heldout),
                      (["runs/eval.gin", "runs/eval_input_long_512.gin"], heldout)):
    bindings = ["CHECKPOINT_PATH = '/ckpt'"] + extra
    try:
      gin_utils.parse_gin_flags([], name if isinstance(name, list) else [name], bindings,
                                finalize=False)
      want = {"runs/eval_input_pe_256.gin": 256, "runs/eval_input_long_512.gin": 512,
              "runs/anchors/t0_3b.gin": 512}.get(name[-1] if isinstance(name, list) else name)
      if want or name == "runs/eval.gin":  # eval.gin: None, the paper's choice per run
        lengths = gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value")
        assert (lengths or {}).get("inputs") == want, (name, lengths)
    finally:
      gin.clear_config()
  assert os.path.isfile(eval_entry._resolve_expected("runs/anchors/t0_3b_expected.json"))


def _fields(config) -> dict:
  """A config's fields, lists as tuples (gin and argparse give lists for tuple fields)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  return {k: tuple(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(config).items()}


@pytest.mark.tf
def test_gin_macros_and_flags_default_to_the_config_fields():
  # Each default is declared once, on its config's field: runs/eval_roe.gin (which includes
  # runs/eval.gin) and the flags, given only what is required, build the default configs.
  import gin  # pylint: disable=g-import-not-at-top
  from expert_t5x import gin_utils, partitioning, routed_evaluation as roe  # pylint: disable=g-import-not-at-top
  import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  gin_utils.configurable(eval_entry.evaluate)  # registered as the gin entry point registers it
  want = {"base": eval_entry.BaseConfig(checkpoint_path="/ckpt"),
          "dataset_cfg": eval_entry.DatasetConfig("demo_heldout"),
          "experts": eval_entry.ExpertsConfig(), "scoring": scoring.ScoringOptions(),
          "output_cfg": eval_entry.OutputConfig("/tmp/x"), "routing": roe.RoEConfig(library="/lib")}
  bindings = ["CHECKPOINT_PATH = '/ckpt'", "EVAL_OUTPUT_DIR = '/tmp/x'",
              "MIXTURE_OR_TASK_NAME = 'demo_heldout'", "LIBRARY_PATH = '/lib'"]
  try:
    gin_utils.parse_gin_flags([], ["runs/eval_roe.gin"], bindings, finalize=False)
    for config in want.values():
      assert _fields(gin.get_configurable(type(config))()) == _fields(config), type(config)
    partitioner = gin.get_configurable(partitioning.PjitPartitioner)()
  finally:
    gin.clear_config()
  default = partitioning.PjitPartitioner()
  assert (partitioner.num_partitions, partitioner.rules) == (default.num_partitions, default.rules)
  # The flags: the same configs (no --max_target_length: the targets are not truncated).
  want["base"] = eval_entry.BaseConfig()
  want["dataset_cfg"] = eval_entry.DatasetConfig("demo_heldout",
                                                 task_feature_lengths={"targets": None})
  args = eval_entry._parser().parse_args(["--tasks", "demo_heldout", "--output_dir", "/tmp/x",
                                          "--library", "/lib", "--roe"])
  got = eval_entry.configs_from_args(args)
  assert got.pop("partitioner").num_partitions == default.num_partitions
  assert {k: _fields(v) for k, v in got.items()} == {k: _fields(v) for k, v in want.items()}
