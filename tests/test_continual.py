"""`expert-t5x continual` end to end on generated files, and its pieces.

The run uses the formats a user has: a promptsource templates file and raw JSONL rows for the seen
task (a T0 training prompt), ELM's ct0_data JSON files for the new tasks, a SentencePiece
vocabulary, an HF-format tiny T5 base, a library, and a transformers BERTScore directory. Training
goes through `python -m expert_t5x.train` with the shipped gin files.
"""

import functools
import io
import json

import numpy as np
import pytest

pytestmark = [pytest.mark.tf]

from expert_t5x import continual  # noqa: E402

SEEN = "rotten_tomatoes_Movie_Expressed_Sentiment"
NEW = ["esnli_explain_why"]
RT_TEMPLATES = """
dataset: rotten_tomatoes
templates:
  r1: !Template
    answer_choices: negative ||| positive
    id: r1
    jinja: '{{text}} The sentiment expressed for the movie is ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
    name: Movie Expressed Sentiment
    reference: ''
"""
WORDS = "the a film movie was good bad great dull title news man dog cat sat ran because".split()


def _sentences(n, seed):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) for _ in range(n)]


def test_training_groups_keep_each_experts_settings():
  """One stacked job per set of equal settings; batch sizes and epochs are never mixed."""
  groups = continual.training_groups([
      "wiki_auto_simplification_1", "esnli_explain_why", "haiku_do_nothing",
      "ct0_gigaword_constrain_end_make_a_title", "eli5_generate_a_question_1"])
  assert [(s.batch_size, s.num_epochs, tasks) for s, tasks in groups] == [
      (2, 1, ["wiki_auto_simplification_1"]),
      (8, 1, ["esnli_explain_why", "ct0_gigaword_constrain_end_make_a_title"]),
      (8, 10, ["haiku_do_nothing"]), (4, 2, ["eli5_generate_a_question_1"])]
  command = continual.train_command(["esnli_explain_why"], groups[1][0], "/b", "/m",
                                    ["--gin_file=x.gin", "--gin.TRAIN_STEPS=2"])
  assert command[3:5] == ["--gin_file=experts/prompt_expert.gin", "--gin_file=x.gin"]
  assert "--gin.BATCH_SIZE=8" in command and "--gin.NUM_EPOCHS=1" in command
  assert "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 256}" in command
  assert command[-1] == "--gin.TRAIN_STEPS=2"  # the user's bindings come last and win


def test_target_groups_follow_elm_eval_configs():
  groups = continual.target_groups(["wiki_auto_simplification_1", "esnli_explain_why",
                                    "ct0_gigaword_constrain_end_make_a_title"])
  assert groups[0] == (["wiki_auto_simplification_1"],
                       ["wiki_auto_simplification_1", "wiki_auto_simplification_2",
                        "asset_simplification_1", "asset_simplification_2"])
  assert groups[1] == (["esnli_explain_why"], ["esnli_explain_why"])
  assert groups[2][0] == ["ct0_gigaword_constrain_end_make_a_title"] and len(groups[2][1]) == 6


def test_compare_seen_finds_one_changed_score(tmp_path):
  rows = [{"task": "t", "example_id": i, "choice_scores": [-1.5, -2.25 + i], "pred": 0}
          for i in range(3)]
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert continual.compare_seen(str(tmp_path / "a"), str(tmp_path / "b"))["bitwise_unchanged"]
  rows[1]["choice_scores"][0] = np.nextafter(-1.5, 0.0)  # one ulp
  (tmp_path / "b" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = continual.compare_seen(str(tmp_path / "a"), str(tmp_path / "b"))
  assert not got["bitwise_unchanged"] and got["changed_tasks"] == ["t"]


def _write_elm(path, sources, targets):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"src": sources, "tgt": targets}))


def _spm(path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_sentences(200, 0)), model_writer=model, vocab_size=60, pad_id=0,
      eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False)
  path.write_bytes(model.getvalue())
  return str(path)


def _tiny_base(path):
  import jax  # pylint: disable=g-import-not-at-top
  from expert_t5x import checkpoint_importer, models, network  # pylint: disable=g-import-not-at-top
  config = network.get_config("tiny")  # = gin/models/t5_1_1_tiny.gin, which tiny_overlay.gin uses
  params = models.EncoderDecoderModel(network.Transformer(config)).get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}
  )["params"]
  checkpoint_importer.export_hf_t5(jax.tree.map(np.asarray, params),
                                   config,
                                   str(path),
                                   overwrite=True)
  return str(path)


def _old_library(tmp_path, base):
  """A library with one expert of the seen task, trained here for one step."""
  from expert_t5x import experts, library, models, network, optimizers  # pylint: disable=g-import-not-at-top
  from expert_t5x import train, checkpoints as tc, train_data, trainer  # pylint: disable=g-import-not-at-top
  model = models.EncoderDecoderModel(
      network.Transformer(network.get_config("tiny")), optimizer_def=optimizers.AdamW(),
      expert_config=experts.AdapterConfig(reduction_factor=4))
  run_dir = tmp_path / "old_run"
  train.train(model=model,
              train_dataset_cfg=train_data.DatasetConfig(SEEN, {"inputs": 32, "targets": 8},
                                                         batch_size=2),
              model_dir=str(run_dir),
              total_steps=1,
              num_retrieval_keys=2,
              trainer_cls=functools.partial(trainer.Trainer,
                                            learning_rate_fn=lambda step, total: 1e-3),
              checkpoint_cfg=tc.CheckpointConfig(save=tc.SaveCheckpointConfig(period=None, keep=1),
                                                 restore=tc.RestoreCheckpointConfig(path=base)),
              eval_before_and_after=False,
              summarize_config_fn=None,
              show_progress=False)
  lib = library.Library.init(str(tmp_path / "lib"))
  lib.add(str(run_dir / "expert"), name=SEEN)
  return str(tmp_path / "lib")


@pytest.mark.slow
@pytest.mark.parity
def test_continual_command_end_to_end(tmp_path, monkeypatch, capsys):
  """Seen experts' predictions before and after adding the new expert are bitwise equal; the new
  expert is in the library; its target prompt (e-SNLI) is scored with ROUGE, BLEU and BERTScore
  precision, which equals the metric recomputed from the written predictions."""
  pytest.importorskip("transformers")
  from expert_t5x import cli, library, results  # pylint: disable=g-import-not-at-top
  from seqio_tasks import bertscore, vocab  # pylint: disable=g-import-not-at-top
  from test_tasks_continual import _tiny_bertscore_model  # pylint: disable=g-import-not-at-top
  templates = tmp_path / "templates" / "rotten_tomatoes"
  templates.mkdir(parents=True)
  (templates / "templates.yaml").write_text(RT_TEMPLATES)
  raw = tmp_path / "raw" / "rotten_tomatoes"
  raw.mkdir(parents=True)
  for split, n in (("train", 8), ("validation", 6)):
    rows = [{"text": s, "label": i % 2} for i, s in enumerate(_sentences(n, len(split)))]
    (raw / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  ct0 = tmp_path / "ct0_data"
  _write_elm(ct0 / "eSNLI/eSNLI/explain_why.train.json", _sentences(8, 5), _sentences(8, 6))
  _write_elm(ct0 / "eSNLI/eSNLI/explain_why.test.json", _sentences(5, 7), _sentences(5, 8))
  monkeypatch.setenv("EXPERT_T5X_PROMPTSOURCE_DIR", str(tmp_path / "templates"))
  monkeypatch.setenv("EXPERT_T5X_RAW_DIR", str(tmp_path / "raw"))
  monkeypatch.setenv("EXPERT_T5X_CONTINUAL_DIR", str(ct0))
  monkeypatch.setenv("EXPERT_T5X_VOCAB", _spm(tmp_path / "spiece.model"))
  vocab.T5_VOCABULARY.reset()
  try:
    base = _tiny_base(tmp_path / "base")
    lib_dir = _old_library(tmp_path, base)
    scorer = _tiny_bertscore_model(tmp_path / "bertscore")
    out = tmp_path / "out"
    code = cli.main(["continual", "--library", lib_dir, "--base", base, "--tasks", ",".join(NEW),
                     "--output", str(out), "--seen_max_examples", "4", "--target_max_examples", "3",
                     "--generation_max_length", "5", "--batch_size", "4",
                     "--bertscore_model", scorer, "--bertscore_layers", "2",
                     "--gin_file=runs/tiny_overlay.gin", "--gin.TRAIN_STEPS=2",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                     "--gin.experts.AdapterConfig.reduction_factor=4"])
  finally:
    vocab.T5_VOCABULARY.reset()
  assert code == 0
  report = json.loads((out / continual.REPORT_FILE).read_text())
  assert report["seen_routes"] == {SEEN + "_score_eval": SEEN}
  seen = report["seen"]
  assert seen["bitwise_unchanged"] and seen["old_experts_unchanged"]
  assert seen["num_records"] == 4 and seen["num_tasks"] == 1
  assert sorted(library.Library(lib_dir).ids()) == sorted([SEEN] + NEW)
  assert len(report["target"]) == 1
  esnli = next(t for t in report["target"] if t["task"] == "esnli_explain_why")
  assert esnli["num_examples"] == 3 and set(esnli["metrics"]) >= {"rougeL", "bleu",
                                                                  "bertscore_precision"}
  records = [r for r in results.read_jsonl(str(out / "target" / "group_0" / "predictions.jsonl"))]
  assert len(records) == 3
  want = bertscore.bertscore_precision([r["gold"] for r in records], [r["pred"] for r in records],
                                       scorer, num_layers=2)
  assert esnli["metrics"]["bertscore_precision"] == pytest.approx(want["bertscore_precision"])
  # The target split is the paper's subset: the first 3 of torch.randperm(5, seed 42).
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator()
  generator.manual_seed(42)
  assert [r["example_id"] for r in records] == torch.randperm(5, generator=generator).tolist()[:3]
  # A second continual step with a name already in the library is refused in one line.
  capsys.readouterr()
  assert cli.main(["continual", "--library", lib_dir, "--base", base, "--tasks", NEW[0],
                   "--output", str(tmp_path / "again")]) == 2
  assert "the library already has an expert 'esnli_explain_why'" in capsys.readouterr().err
