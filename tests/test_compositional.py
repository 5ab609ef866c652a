"""`expert-t5x compositional` end to end on generated files, and its pieces.

The run uses the file layout a user writes (XSum / Tatoeba / XL-Sum JSONL, `docs/continual.md`), a
SentencePiece vocabulary and an HF-format tiny T5 base; the experts are trained through `python -m
expert_t5x.train --gin_file=experts/dataset_expert.gin`. The merge is checked against the task
arithmetic formula recomputed with numpy from the two experts' files, and ROUGE-L / BLEU against
rouge-score and sacrebleu called directly on the written predictions.
"""

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.tf]

from expert_t5x import compositional  # noqa: E402

WORDS = "the a film movie was good bad great dull title news man dog cat sat ran because".split()


def _sentences(n, seed):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) for _ in range(n)]


def _jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tasks_render_the_paper_prompts(tmp_path, monkeypatch):
  """XSum rows render as promptsource's `DOC_write_summary_of_above`; the composed task carries
  ELM mt0.json's instruction; ELM's own eval file wins over JSONL when present."""
  import seqio_tasks  # pylint: disable=g-import-not-at-top
  from seqio_tasks import settings  # pylint: disable=g-import-not-at-top
  from seqio_tasks.sources import compositional as src  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(settings.env_var("COMPOSITIONAL_DIR"), str(tmp_path))
  _jsonl(tmp_path / "xsum" / "train.jsonl", [{"document": "A dog sat.", "summary": "dog"}])
  _jsonl(tmp_path / "tatoeba" / "eng-kor" / "train.jsonl",
         [{"translation": {"eng": "Hello", "kor": "안녕"}}])
  _jsonl(tmp_path / "xlsum" / "kor" / "validation.jsonl", [{"text": "Doc.", "summary": "요약"}])
  from seqio_tasks import cli  # pylint: disable=g-import-not-at-top
  ok, line = cli.task_status("compositional_tatoeba_eng_kor")
  assert not ok and line.startswith(f"missing {tmp_path}/tatoeba/eng-kor/validation.jsonl")
  assert cli.task_status("compositional_xlsum_translate_to_kor_and_summarize")[0]
  assert seqio_tasks.suite("compositional_eval")[0] == (
      "compositional_xlsum_translate_to_kor_and_summarize")
  [ex] = src.summary_examples("train")
  # promptsource xsum: '{{document}}\n\n===\n\nWrite a summary of the text above : ||| {{summary}}'
  assert (ex["inputs"], ex["targets"]) == (
      "A dog sat.\n\n===\n\nWrite a summary of the text above :", "dog")
  [ex] = src.translation_examples("kor", "train")
  assert (ex["inputs"], ex["targets"]) == ("Hello\n\ntranslate to kor", "안녕")
  [ex] = src.composed_examples("kor", "validation")
  assert ex["inputs"].endswith("translate to kor and summarize") and ex["targets"] == "요약"
  (tmp_path / src.ELM_EVAL_FILE).write_text(json.dumps(
      {"xlsum": {"translate to kor and summarize": {"0": {"source": "S", "target": "T"}}}}))
  assert [(e["inputs"], e["targets"]) for e in src.composed_examples("kor", "validation")] == [
      ("S", "T")]
  with pytest.raises(FileNotFoundError, match="EXPERT_T5X_COMPOSITIONAL_DIR"):
    list(src.translation_examples("spa", "train"))
  with pytest.raises(ValueError, match="expected a comma list of kor, spa"):
    compositional.parse_languages("kor,deu")


def test_training_groups_use_the_papers_settings():
  groups = compositional.training_groups(["kor"])
  assert [(s.batch_size, s.max_examples, s.inputs_length, s.targets_length, t)
          for s, t in groups] == [
      (15, 10000, 512, 128, ["compositional_xsum_DOC_write_summary_of_above"]),
      (30, 100000, 128, 128, ["compositional_tatoeba_eng_kor"])]
  from expert_t5x import continual  # pylint: disable=g-import-not-at-top
  command = continual.train_command(groups[0][1], groups[0][0], "/b", "/m",
                                    expert_gin=compositional.FULL_EXPERT_GIN)
  assert command[3] == "--gin_file=experts/dataset_expert.gin"
  assert not any("reduction_factor" in a for a in command)  # full experts have no adapters


SUMMARIZER = "compositional_xsum_DOC_write_summary_of_above"


def _existing_summarizer(base, path, lib_dir):
  """A full expert (random small delta on every base tensor) already in the library, so the run
  takes it and trains only the translator (one training job keeps the test cheap)."""
  from expert_t5x import base_models, checkpoint_importer, expert_format, experts, library  # pylint: disable=g-import-not-at-top
  params, _, _ = checkpoint_importer.load_params(base)
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(0.0, 1e-3, np.shape(v)).astype(np.float32)
          for k, v in expert_format.flatten_params(params).items()}
  meta = expert_format.build_metadata(
      "full", experts.config_to_json(experts.FullConfig(init_seed=0)),
      base_fingerprint=base_models.load_base(base).fingerprint, base_config_name="tiny",
      provenance=[{"task": SUMMARIZER, "dataset": "xsum", "subset": None,
                   "prompt": "DOC_write_summary_of_above", "role": "train"}])
  expert_format.save_expert(str(path), flat, meta)
  library.Library.init(str(lib_dir)).add(str(path), name=SUMMARIZER)


@pytest.mark.slow
def test_compositional_command_end_to_end(tmp_path, monkeypatch):
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  import sacrebleu  # pylint: disable=g-import-not-at-top
  from expert_t5x import cli, expert_format, library, results  # pylint: disable=g-import-not-at-top
  from seqio_tasks import vocab  # pylint: disable=g-import-not-at-top
  from test_continual import _spm, _tiny_base  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  docs, sums = _sentences(4, 1), _sentences(4, 2)
  for split in ("train", "validation"):
    _jsonl(data / "xsum" / f"{split}.jsonl",
           [{"document": d, "summary": s} for d, s in zip(docs, sums)])
    _jsonl(data / "tatoeba" / "eng-kor" / f"{split}.jsonl", [
        {"translation": {"eng": a, "kor": b}} for a, b in zip(_sentences(4, 3), _sentences(4, 4))])
  _jsonl(data / "xlsum" / "kor" / "validation.jsonl",
         [{"text": d, "summary": s} for d, s in zip(_sentences(3, 5), _sentences(3, 6))])
  monkeypatch.setenv("EXPERT_T5X_COMPOSITIONAL_DIR", str(data))
  monkeypatch.setenv("EXPERT_T5X_VOCAB", _spm(tmp_path / "spiece.model"))
  vocab.T5_VOCABULARY.reset()
  lib_dir, out = tmp_path / "lib", tmp_path / "out"
  try:
    base = _tiny_base(tmp_path / "base")
    _existing_summarizer(base, tmp_path / "summarizer", lib_dir)
    code = cli.main([
        "compositional", "--base", base, "--library",
        str(lib_dir), "--output",
        str(out), "--languages", "kor", "--lam", "0.75", "--max_examples", "2",
        "--generation_max_length", "4", "--batch_size", "2", "--gin_file=runs/tiny_overlay.gin",
        "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"
    ])
  finally:
    vocab.T5_VOCABULARY.reset()
  assert code == 0
  report = json.loads((out / compositional.REPORT_FILE).read_text())
  summ, trans = SUMMARIZER, "compositional_tatoeba_eng_kor"
  assert report["trained"] == [trans]  # the summarizer was taken from the library
  lib = library.Library(str(lib_dir))
  assert sorted(lib.ids()) == sorted(report["experts"].values())
  # The merge is θ_pre + λ(τ_sum + τ_trans): full experts store τ, so the merged delta is λ(τ1+τ2).
  recipe = report["merge"]["recipes"]["kor"]
  assert recipe["method"] == "task_arithmetic" and recipe["params"] == {"lam": 0.75}
  readers = [
      expert_format.ExpertReader(lib.expert_dir(report["experts"][t])) for t in (summ, trans)
  ]
  merged = expert_format.ExpertReader(str(out / "merged" / "kor"))
  try:
    assert merged.metadata["merge"]["output_hash"] == recipe["output_hash"]
    for name in merged.names():
      want = 0.75 * (readers[0].get(name).astype(np.float64) + readers[1].get(name))
      np.testing.assert_allclose(merged.get(name), want.astype(np.float32), rtol=1e-6, atol=1e-7)
  finally:
    for r in readers + [merged]:
      r.close()
  # Base, merge and both experts each scored on the composed task, ROUGE-L and BLEU as recomputed.
  rows = {r["role"]: r for r in report["results"]}
  assert set(rows) == {"base", "merged", "summarizer", "translator"}
  records = results.read_jsonl(str(out / "eval" / "kor" / results.PREDICTIONS_FILE))
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  for role, row in rows.items():
    assert row["num_examples"] == 2 and row["task"].endswith("translate_to_kor_and_summarize")
    mine = [r for r in records if r["expert_ids"] == ([] if role == "base" else [row["model"]])]
    assert len(mine) == 2, role
    rouge_l = np.mean([scorer.score(r["gold"], r["pred"])["rougeL"].fmeasure for r in mine]) * 100
    assert row["metrics"]["rougeL"] == pytest.approx(rouge_l)
    bleu = sacrebleu.corpus_bleu([r["pred"] for r in mine], [[r["gold"] for r in mine]],
                                 tokenize="intl").score
    assert row["metrics"]["bleu"] == pytest.approx(bleu)
