"""The T5X bridge against upstream T5X itself (`../shared/third_party/python` beside the
repository, or $EXPERT_T5X_UPSTREAM_T5X; skipped when `import t5x` fails there).

One module-scoped run shared by the tests: our command writes a tiny T5X base checkpoint, upstream
`python -m t5x.train --gin_file=t5x/demo_adapter_expert.gin` trains 2 steps, stops (the
interruption), and a second invocation resumes to step 4. Compared with upstream: the restored
base leaves (bitwise), `t5x.eval`'s per-row scores against `expert-t5x eval` of the imported
expert, and every gin/t5x file parsed by gin with upstream's modules.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = Path(os.environ.get("EXPERT_T5X_UPSTREAM_T5X",
                               REPO.parent / "shared" / "third_party" / "python"))
STEPS = 4
EXAMPLES = 24  # scored by both evaluators


def _upstream_importable() -> bool:
  # In this process (no second TensorFlow start-up); the runs themselves are subprocesses.
  if not UPSTREAM.is_dir():
    return False
  sys.path.insert(0, str(UPSTREAM))
  try:
    import t5x  # pylint: disable=unused-import  # noqa: F401
    return True
  except Exception:  # pylint: disable=broad-except
    return False
  finally:
    sys.path.remove(str(UPSTREAM))


pytestmark = pytest.mark.skipif(not _upstream_importable(),
                                reason=f"upstream t5x not importable from {UPSTREAM}")


def _env():
  return dict(os.environ, PYTHONPATH=f"{UPSTREAM}{os.pathsep}{REPO}", JAX_PLATFORMS="cpu",
              CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")


def _t5x(module, args, cwd):
  proc = subprocess.run([sys.executable, "-m", module, f"--gin_search_paths={REPO / 'gin'}"] + args,
                        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def _target(step_dir):
  from expert_t5x import checkpoint_importer
  from flax import traverse_util
  return traverse_util.flatten_dict(checkpoint_importer.load_t5x_checkpoint(step_dir), sep="/")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from expert_t5x import t5x_io
  root = tmp_path_factory.mktemp("t5x")
  base_dir, model_dir = root / "base", root / "run"
  assert t5x_io.t5x_checkpoint_main(["--model_config", "tiny", "--random_init_seed", "0",
                                     "--output", str(base_dir)]) == 0
  args = ["--gin_file=t5x/demo_adapter_expert.gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.INITIAL_CHECKPOINT_PATH='{base_dir / 'checkpoint_0'}'",
          f"--gin.optax.linear_schedule.transition_steps={STEPS}",
          "--gin.utils.SaveCheckpointConfig.period=2", "--gin.EVAL_PERIOD=2",
          "--gin.utils.SaveCheckpointConfig.keep=None"]
  _t5x("t5x.train", args + ["--gin.TRAIN_STEPS=2"], root)  # Stops at step 2 ...
  resumed = _t5x("t5x.train", args + [f"--gin.TRAIN_STEPS={STEPS}"], root)  # ... and resumes.
  return {"root": root, "base": base_dir / "checkpoint_0", "model_dir": model_dir,
          "resume_log": resumed}


def test_train_resumes_and_trains_only_the_expert(run):
  model_dir = run["model_dir"]
  steps = sorted(int(p.rsplit("_", 1)[1]) for p in glob.glob(f"{model_dir}/checkpoint_*"))
  assert steps == [0, 2, STEPS]
  assert "checkpoint_2" in run["resume_log"]  # Restored from the interrupted run's checkpoint.
  base = _target(run["base"])
  mid, last = _target(model_dir / "checkpoint_2"), _target(model_dir / f"checkpoint_{STEPS}")
  for k, v in base.items():
    if k.endswith("/scale"):  # An adapter expert's layer-norm scales are trained in place.
      assert not np.array_equal(last[k], v), k
    else:
      np.testing.assert_array_equal(last[k], v, err_msg=k)
  expert_keys = [k for k in last if k.startswith("expert/")]
  assert expert_keys and all(k not in base for k in expert_keys)
  assert any(not np.array_equal(last[k], mid[k]) for k in expert_keys)


def test_imported_expert_scores_equal_upstream_eval(run):
  from expert_t5x import eval as eval_lib
  from expert_t5x import expert_format
  from expert_t5x import importers
  root, model_dir = run["root"], run["model_dir"]
  expert_dir = root / "expert"
  assert importers.import_main(["t5x", str(model_dir), "--output", str(expert_dir),
                                "--num-keys", "4"]) == 0
  meta = expert_format.read_metadata(expert_dir)
  assert meta["provenance"][0]["task"] == "demo_sentiment_review"
  assert meta["training"]["steps"] == STEPS and meta["config"]["reduction_factor"] == 8
  keys = expert_format.read_keys(expert_dir)
  assert len(keys) == 4 and all(k["task"] == "demo_sentiment_review" for k in keys)

  task = "demo_sentiment_review_score_eval"
  _t5x("t5x.eval", ["--gin_file=t5x/eval.gin", "--gin_file=t5x/demo_model.gin",
                    f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
                    f"--gin.CHECKPOINT_PATH='{model_dir / f'checkpoint_{STEPS}'}'",
                    f"--gin.EVAL_OUTPUT_DIR='{root / 'upstream_eval'}'",
                    f"--gin.seqio.Evaluator.num_examples={2 * EXAMPLES}"], root)  # 2 choices each
  rows = [json.loads(l) for l in
          open(root / "upstream_eval" / "inference_eval" / f"{task}-{STEPS:06d}.jsonl")]
  upstream = {tuple(r["input"]["idx"]): r["score"] for r in rows}

  assert eval_lib.cli_main(["--tasks", task, "--output_dir", str(root / "ours"),
                            "--checkpoint_path", str(run["base"]), "--experts", str(expert_dir),
                            "--max_examples", str(EXAMPLES), "--no_progress",
                            "--bootstrap_samples", "0"]) == 0
  ours = {}
  for line in open(root / "ours" / "predictions.jsonl"):
    p = json.loads(line)
    for j, s in enumerate(p["choice_scores"]):
      ours[(p["example_id"], j)] = s
  assert sorted(ours) == sorted(upstream) and len(ours) == 2 * EXAMPLES
  np.testing.assert_allclose([ours[k] for k in sorted(ours)],
                             [upstream[k] for k in sorted(ours)], rtol=0, atol=1e-4)


def test_every_gin_file_parses_under_upstream(tmp_path):
  # In a subprocess: the files import `__main__` as train/eval script, as t5x.train does.
  code = r"""
import glob, os, sys, gin, __main__
import t5x.train, t5x.eval, t5x.models
from expert_t5x import t5x_compat
__main__.train, __main__.evaluate = t5x.train.train, t5x.eval.evaluate
gin.add_config_file_search_path(sys.argv[1])
gin.add_config_file_search_path(os.path.dirname(os.path.dirname(t5x.__file__)))
required = ["MODEL_DIR='/m'", "MIXTURE_OR_TASK_NAME='demo_sentiment_review'",
            "INITIAL_CHECKPOINT_PATH='/c'", "TRAIN_STEPS=10", "CHECKPOINT_PATH='/c'",
            "EVAL_OUTPUT_DIR='/e'", "MIXTURE_OR_TASK_MODULE=None"]
def resolve(ref):
  while ref.scoped_selector.endswith("gin.macro"):
    ref = gin.query_parameter(ref.scoped_selector + ".value")
  return ref
for path in sorted(glob.glob(os.path.join(sys.argv[1], "t5x", "*.gin"))):
  gin.clear_config()
  name = os.path.relpath(path, sys.argv[1])
  # expert_model.gin is included by the others, which set the macros it uses.
  bindings = required if "expert_model" not in name else [
      "MIXTURE_OR_TASK_NAME='x'", "EXPERT=None", "OPTIMIZER=None", "DROPOUT_RATE=0.0",
      "Z_LOSS=0.0", "LABEL_SMOOTHING=0.0", "LOSS_NORMALIZING_FACTOR=None",
      "ACTIVATION_DTYPE='float32'"]
  gin.parse_config_files_and_bindings([name], bindings, finalize_config=True)
  if "expert_model" in name or "demo_model" in name:
    continue
  script = "evaluate" if name == "t5x/eval.gin" else "train"
  model = resolve(gin.query_parameter(f"{script}.model"))
  assert model.configurable.wrapped is t5x.models.EncoderDecoderModel, name
  module = resolve(gin.query_parameter("t5x.models.EncoderDecoderModel.module"))
  assert module.configurable.wrapped is t5x_compat.ExpertTransformer, name
  if script == "train" and "dataset_expert.gin" not in name:
    # One schedule: the rate T5X logs is the one AdamW uses.
    assert (gin.query_parameter("t5x.trainer.Trainer.learning_rate_fn").scoped_selector ==
            gin.query_parameter("optax.adamw.learning_rate").scoped_selector ==
            "LEARNING_RATE_SCHEDULE/gin.macro"), name
  print("parsed", name)

# The paper's settings: each upstream file's values equal our own recipe's (gin/experts/).
import expert_t5x.train
gin.enter_interactive_mode()  # `train_script.train` is ours, then upstream's, in turn.
def settings(path, script_train, pairs):
  gin.clear_config()
  __main__.train = script_train
  gin.parse_config_files_and_bindings([path], required, finalize_config=False)
  return [query(p) for p in pairs]
def query(name):
  value = gin.query_parameter(name if "." in name else name + "/gin.macro.value")
  while getattr(value, "scoped_selector", "").endswith("gin.macro"):
    value = gin.query_parameter(value.scoped_selector + ".value")
  return value
COMMON = ["BATCH_SIZE", "TASK_FEATURE_LENGTHS", "DROPOUT_RATE", "Z_LOSS", "LABEL_SMOOTHING",
          "LOSS_NORMALIZING_FACTOR", "RANDOM_SEED", "ACTIVATION_DTYPE"]
for ours, theirs in [("prompt_expert", "prompt_expert"), ("lora_expert", "lora_expert"),
                     ("dataset_expert_adapter", "dataset_expert_adapter")]:
  expert = ["experts.AdapterConfig.reduction_factor", "experts.AdapterConfig.train_layer_norms"]
  if ours == "lora_expert":
    expert = [f"experts.LoraConfig.{f}" for f in ("rank", "alpha", "targets", "dropout_rate")]
  a = settings(f"experts/{ours}.gin", expert_t5x.train.train, COMMON + expert + [
      "optimizers.AdamW.b1", "optimizers.AdamW.b2", "optimizers.AdamW.eps",
      "optimizers.AdamW.weight_decay", "optimizers.AdamW.global_norm_clip_threshold",
      "optimizers.create_learning_rate_scheduler.base_learning_rate"])
  b = settings(f"t5x/{theirs}.gin", t5x.train.train, COMMON + expert + [
      "optax.adamw.b1", "optax.adamw.b2", "optax.adamw.eps", "optax.adamw.weight_decay",
      "optax.clip_by_global_norm.max_norm", "optax.linear_schedule.init_value"])
  assert a == b, (ours, a, b)
  assert gin.query_parameter("optax.linear_schedule.end_value") == 0.0
fields = ["factored", "multiply_by_parameter_scale", "beta1", "decay_rate", "step_offset",
          "clipping_threshold", "weight_decay_rate", "min_dim_size_to_factor", "epsilon1",
          "global_norm_clip_threshold"]
a = settings("experts/dataset_expert.gin", expert_t5x.train.train, COMMON + [
    f"optimizers.Adafactor.{f}" for f in fields] + [
    "optimizers.create_learning_rate_scheduler.base_learning_rate", "NUM_MICROBATCHES"])
b = settings("t5x/dataset_expert.gin", t5x.train.train, COMMON + [
    f"adafactor.Adafactor.{f}" for f in fields] + [
    "utils.create_learning_rate_scheduler.base_learning_rate",
    "t5x.trainer.Trainer.num_microbatches"])
assert a == b, ("dataset_expert", a, b)
print("settings equal")
"""
  proc = subprocess.run([sys.executable, "-c", code, str(REPO / "gin")], env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  parsed = proc.stdout.split()
  assert parsed.count("parsed") == 6 and "equal" in parsed, proc.stdout
