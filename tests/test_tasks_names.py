"""Names and registration of the paper's grid, checked against the reference grid files.

Expected names are computed here with t-zero's rule written out independently
(`re.sub(r"[^\\w\\d\\._]+", "_", ...)`), from the JSON grid files shipped as package data.
"""

import importlib.resources
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tf

import seqio  # noqa: E402

import seqio_tasks  # noqa: E402
from seqio_tasks import names, vocab  # noqa: E402


def _data(name):
  return json.loads(importlib.resources.files("seqio_tasks").joinpath("data", name).read_text())


def _clean(text):
  return re.sub(r"[^\w\d\._]+", "_", text)


def _expected_train():
  return [_clean(f"{e['dataset']}_{e['subset']}_{p}" if e["subset"] else f"{e['dataset']}_{p}")
          for e in _data("t0_train_296.json") for p in e["prompts"]]


def _expected_heldout():
  out = []
  for e in _data("t0_heldout_113.json"):
    for p in e["prompts"]:
      if e["hf_dataset"] == "anli":
        out.append(_clean(f"anli_{p}") + "_" + e["split_or_config"].split("_")[1])
      elif e["hf_subset"]:
        out.append(_clean(f"{e['hf_dataset']}_{e['hf_subset']}_{p}"))
      else:
        out.append(_clean(f"{e['hf_dataset']}_{p}"))
  return out


def test_t_zero_names_of_known_prompts():
  assert names.prompt_task_name("anli", None, "guaranteed/possible/impossible", "r2") == (
      "anli_guaranteed_possible_impossible_r2")
  assert names.prompt_task_name("story_cloze", "2016", "Answer Given options") == (
      "story_cloze_2016_Answer_Given_options")
  assert names.prompt_task_name("super_glue", "wsc.fixed", "p is/are r") == (
      "super_glue_wsc.fixed_p_is_are_r")
  assert names.prompt_task_name("super_glue", "copa", "C1 or C2? premise, so/because…") == (
      "super_glue_copa_C1_or_C2_premise_so_because_")


def test_grid_sizes_and_names_match_the_reference_files():
  train, heldout = _expected_train(), _expected_heldout()
  assert len(train) == 296 and len(set(train)) == 296
  assert len(heldout) == 113 and len(set(heldout)) == 113
  assert [s.task for s in names.train_prompts()] == train
  assert [s.task for s in names.heldout_prompts()] == heldout
  assert len(names.train_datasets()) == 36 and len(names.bigbench_tasks()) == 13
  registered = set(seqio.TaskRegistry.names())
  assert set(train + heldout) <= registered
  assert {t + "_score_eval" for t in heldout} <= registered
  assert seqio_tasks.suite("t0_eval_score_eval") == [t + "_score_eval" for t in heldout]
  assert seqio_tasks.suite("t0_train") == train
  for spec in names.train_prompts():
    assert (spec.task + "_score_eval" in registered) == spec.answer_choices
  for ds, sub in names.train_datasets():
    prefix = _clean(f"{ds}_{sub}" if sub else ds)
    assert {prefix + "_all_prompts", prefix + "_random_prompt"} <= registered
  bench = _data("bigbench_13.json")
  assert seqio_tasks.suite("bigbench_13") == [f"bigbench_{t}" for t in bench]


def test_provenance_side_registry():
  info = seqio_tasks.get_info("anli_can_we_infer_r3_score_eval")
  assert (info.dataset, info.prompt, info.role, info.eval_dataset, info.base_task) == (
      "anli", "can we infer", "heldout", "anli_r3", "anli_can_we_infer_r3")
  assert dict(zip(info.splits, ("train", "validation", "test"))) and info.original_task is True
  assert names.heldout_prompts()[10].split_map["validation"] == "dev_r1"
  xsum = seqio_tasks.get_info("xsum_DOC_boils_down_to_simple_idea_that")
  assert (xsum.role, xsum.has_choices, xsum.provenance()["subset"]) == ("train", False, None)
  assert seqio_tasks.get_info("glue_mrpc_all_prompts").prompts[0].startswith("glue_mrpc_")


def test_unknown_task_suggests_closest_names():
  with pytest.raises(KeyError, match="super_glue_cb_can_we_infer"):
    seqio_tasks.get_info("super_glue_cb_can_we_infr")
  with pytest.raises(KeyError, match="t0_train"):
    seqio_tasks.suite("t0_trian")


def test_import_reads_no_user_file_and_registers_without_templates(tmp_path):
  """A fresh interpreter imports and registers with every data setting pointing nowhere."""
  env = dict(os.environ, EXPERT_T5X_CACHE=str(tmp_path / "absent"),
             EXPERT_T5X_VOCAB=str(tmp_path / "absent.model"), HOME=str(tmp_path / "home"))
  # Both counts from the fresh interpreter: this process's registries also hold what earlier tests
  # registered (the demo pipeline's tasks), so comparing with them depends on the test order.
  code = ("import seqio, seqio_tasks; print(len(seqio.TaskRegistry.names()), "
          "len(seqio_tasks.provenance.task_names()))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  registered, with_provenance = map(int, out.stdout.split()[-2:])
  assert registered == with_provenance > 100
  assert not (tmp_path / "absent").exists()  # The cache directory was never touched.


def test_lazy_vocabulary_resolution(tmp_path, monkeypatch):
  import gin
  monkeypatch.delenv("EXPERT_T5X_VOCAB", raising=False)
  vocab.set_vocabulary_path(None)
  with pytest.raises(ValueError, match=r"seqio_tasks\.vocab\.VOCABULARY_PATH.*EXPERT_T5X_VOCAB.*"
                     r"spiece\.model"):
    vocab.T5_VOCABULARY.vocab_size  # pylint: disable=pointless-statement
  monkeypatch.setenv("EXPERT_T5X_VOCAB", str(tmp_path / "missing.model"))
  with pytest.raises(FileNotFoundError, match="missing.model"):
    vocab.T5_VOCABULARY.encode("x")
  import sentencepiece as spm
  model = tmp_path / "ckpt" / "spiece.model"
  model.parent.mkdir()
  with open(model, "wb") as f:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 20), model_writer=f,
                                   vocab_size=20, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False)
  # gin binding wins over the environment; a checkpoint directory resolves to its spiece.model.
  gin.clear_config()
  gin.parse_config(f"seqio_tasks.vocab.VOCABULARY_PATH = '{model.parent}'")
  try:
    vocab.T5_VOCABULARY.reset()
    assert vocab.T5_VOCABULARY.path == str(model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert list(vocab.T5_VOCABULARY.encode("hello world")) == sp.encode("hello world")
    assert vocab.T5_VOCABULARY.vocab_size == sp.get_piece_size() + vocab.DEFAULT_EXTRA_IDS
    assert vocab.T5_VOCABULARY.eos_id == 1
    import hashlib
    assert vocab.vocabulary_fingerprint(vocab.T5_VOCABULARY) == (
        "spm:" + hashlib.sha256(model.read_bytes()).hexdigest())
  finally:
    gin.clear_config()
    vocab.T5_VOCABULARY.reset()
