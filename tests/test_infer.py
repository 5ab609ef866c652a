"""`expert_t5x.infer` on free inputs with a tiny random base: scores equal the evaluator's
rank-classification scores, an expert changes them, predictions equal the evaluator's decodes."""

import json

import numpy as np
import pytest

from expert_t5x import evaluation
from expert_t5x import infer
from expert_t5x import results

import eval_fakes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer")
  base, expert = eval_fakes.tiny_base_and_adapter(str(root), 4)
  return base, expert, root


def _infer(**kwargs):
  return infer.infer(model_config="tiny", random_init_seed=0,
                     config_overrides={"vocab_size": eval_fakes.VOCAB_SIZE},
                     vocabulary=eval_fakes.CharVocabulary(), batch_size=8, **kwargs)


def test_score_mode_equals_the_evaluator(setup, tmp_path):
  base, expert, _ = setup
  source = eval_fakes.make_source()
  examples = source.examples("qa_q1", "validation", None)
  rows = [{"inputs": ex["inputs"], "answer_choices": ex["answer_choices"]} for ex in examples]
  path = tmp_path / "in.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  # Independent path: the evaluator's predictions for the same examples.
  evaluation.evaluate(tasks="qa_q1", output_dir=str(tmp_path / "ev"), base=base,
                      expert_paths=[expert], batch_size=8, progress=False, task_source=source,
                      bootstrap_samples=0)
  want = results.read_jsonl(str(tmp_path / "ev" / results.PREDICTIONS_FILE))
  got = _infer(input_file=str(path), mode="score", expert_path=expert,
               output_file=str(tmp_path / "out.jsonl"))
  assert results.read_jsonl(str(tmp_path / "out.jsonl")) == got
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["scores"], w["choice_scores"], rtol=1e-5)
    assert g["pred"] == w["pred"]
  plain = _infer(inputs=[rows[0]], mode="score")
  assert np.max(np.abs(np.subtract(plain[0]["scores"], got[0]["scores"]))) > 1e-3


def test_predict_mode_equals_the_evaluator_decodes(setup, tmp_path):
  base, _, _ = setup
  source = eval_fakes.make_source(n=3, generation=True)
  evaluation.evaluate(tasks="copy_c", output_dir=str(tmp_path / "ev"), base=base, batch_size=8,
                      progress=False, task_source=source, bootstrap_samples=0,
                      generation_max_length=6)
  want = results.read_jsonl(str(tmp_path / "ev" / results.PREDICTIONS_FILE))
  texts = [ex["inputs"] for ex in source.examples("copy_c", "validation", None)]
  (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
  got = _infer(input_file=str(tmp_path / "in.txt"), mode="predict", max_decode_length=6)
  assert [g["prediction"] for g in got] == [w["pred"] for w in want]


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="mode must be one of"):
    _infer(inputs=["x"], mode="rank")
  with pytest.raises(ValueError, match="No inputs"):
    _infer(inputs=[])
  with pytest.raises(ValueError, match="neither 'answer_choices' nor 'targets'"):
    _infer(inputs=["x"], mode="score")
  (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match="line 1: expected a JSON object with an 'inputs'"):
    infer.read_inputs(str(tmp_path / "bad.jsonl"))


def test_cli_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as e:
    infer.cli_main(["--help"])
  assert e.value.code == 0 and "--mode" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.tf
def test_gin_entry_point(tmp_path):
  # `python -m expert_t5x.infer --gin_file=runs/infer.gin` in its own process, as users run it.
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "expert_t5x.infer", "--gin_file=runs/infer.gin",
         "--gin.CHECKPOINT_PATH=None", "--gin.MODEL_CONFIG='tiny'", "--gin.RANDOM_INIT_SEED=0",
         "--gin.CONFIG_OVERRIDES={'vocab_size': 512}", "--gin.VOCABULARY_PATH='bytes'",
         "--gin.INFER_INPUTS=['Is this short or long: a cat']", "--gin.MAX_DECODE_LENGTH=4",
         f"--gin.INFER_OUTPUT_FILE='{out}'"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = results.read_jsonl(str(out))
  assert len(records) == 1 and set(records[0]) == {"inputs", "prediction"}


def test_gin_macros_default_to_the_signature():
  # Each default is declared once, in `infer`'s signature: runs/infer.gin's macros repeat them.
  import inspect  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  gin_utils.configurable(infer.infer)  # registered as the gin entry point registers it
  try:
    gin_utils.parse_gin_flags([], ["runs/infer.gin"], ["CHECKPOINT_PATH = '/ckpt'",
                                                       "INFER_OUTPUT_FILE = '/tmp/x.jsonl'"],
                              finalize=False)
    signature = inspect.signature(infer.infer).parameters
    checked = []
    for name, param in signature.items():
      try:
        value = gin.query_parameter(f"expert_t5x.infer.infer.{name}")
      except ValueError:
        continue  # not bound in the gin file
      while getattr(value, "scoped_selector", "").endswith("gin.macro"):
        value = gin.query_parameter(value.scoped_selector + ".value")
      if name in ("checkpoint_path", "output_file", "partitioner"):
        continue
      if isinstance(value, list):  # gin's list for a tuple default
        value = tuple(value)
      assert value == param.default, name
      checked.append(name)
  finally:
    gin.clear_config()
  assert "batch_size" in checked and "max_decode_length" in checked, checked
