"""Continual (CT0) tasks: ELM's ct0_data files, or local JSONL + a user templates file; metrics.

Metric values are checked on cases whose value is known without the libraries (identical texts:
100; disjoint texts: 0) and ROUGE-L against an LCS computed here; BERTScore precision against the
`bert-score` package's own functions on a tiny random model written by the test.
"""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.tf

import seqio_tasks  # noqa: E402
from seqio_tasks import examples, metrics  # noqa: E402
from seqio_tasks.cli import task_status  # noqa: E402

TEMPLATES = """
dataset: haiku
templates:
  h1: !Template
    id: h1
    jinja: 'Write a haiku about {{inputs}} ||| {{targets}}'
    name: do_nothing
    reference: ''
"""


def test_continual_task_from_local_files(tmp_path, monkeypatch):
  monkeypatch.setenv("EXPERT_T5X_CONTINUAL_DIR", str(tmp_path))
  ok, line = task_status("haiku_do_nothing")
  assert not ok and str(tmp_path / "haiku" / "templates.yaml") in line
  (tmp_path / "haiku").mkdir()
  (tmp_path / "haiku" / "templates.yaml").write_text(TEMPLATES)
  rows = [{"inputs": "rain", "targets": "soft rain falls"}, {"inputs": "sun", "targets": "warm"}]
  (tmp_path / "haiku" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = examples.load_examples("haiku_do_nothing", "train")
  assert [(e["inputs"], e["targets"], e["answer_choices"]) for e in got] == [
      ("Write a haiku about rain", "soft rain falls", []), ("Write a haiku about sun", "warm", [])]
  with pytest.raises(FileNotFoundError, match=r"validation\.jsonl"):
    examples.load_examples("haiku_do_nothing", "validation")
  ok, line = task_status("haiku_do_nothing")
  assert not ok and line.startswith(f"missing {tmp_path / 'haiku' / 'validation.jsonl'}:")
  assert len(seqio_tasks.suite("ct0_continual")) == 10


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def test_generation_metrics():
  same = ["the cat sat on the mat", "a b c d"]
  assert metrics.bleu(same, same)["bleu"] == pytest.approx(100.0)
  assert metrics.rouge(same, same)["rougeL"] == pytest.approx(100.0)
  assert metrics.rouge(["alpha beta"], ["gamma delta"])["rouge1"] == 0.0
  target, prediction = "one two three four five", "one three five six"
  lcs = _lcs(target.split(), prediction.split())
  p, r = lcs / 4, lcs / 5
  assert metrics.rouge([target], [prediction])["rougeL"] == pytest.approx(100 * 2 * p * r / (p + r))
  assert metrics.squad(["The Cat"], ["cat"]) == {"em": 100.0, "f1": 100.0}
  assert metrics.accuracy(["a", "b"], ["a", "c"]) == {"accuracy": 50.0}


# What ELM's configs/cT0/<config>.json set (joeljang/ELM 27fc2a3): per_device_train_batch_size,
# num_train_epochs; every config has learning_rate 1e-4, max_source_length 512,
# max_target_length 256, max_train_samples 100000 and task_reduction_factor 32.
ELM_CT0_CONFIGS = {
    "1_wiki_auto": ("wiki_auto", "simplification_1", 2, 1),
    "2_gigaword_1": ("ct0_gigaword", "constrain_contain+make_a_title", 8, 1),
    "2_gigaword_2": ("ct0_gigaword", "constrain_end+make_a_title", 8, 1),
    "2_gigaword_3": ("ct0_gigaword", "constrain_start+make_a_title", 8, 1),
    "3_haiku": ("haiku", "do_nothing", 8, 10),
    "4_covid_qa": ("covid_qa", "covid_qa_deepset", 8, 50),
    "5_eli5": ("eli5", "generate_a_question_1", 4, 2),
    "6_emdg": ("empathetic_dialogues", "dialogue_with_emotion", 4, 2),
    "7_esnli": ("esnli", "explain_why", 8, 1),
    "8_tw20": ("twitter_top20", "tweet_as+about", 8, 8),
}


def test_expert_settings_equal_elm_configs():
  from seqio_tasks import continual_tasks  # pylint: disable=g-import-not-at-top
  from seqio_tasks.sources import continual  # pylint: disable=g-import-not-at-top
  got = {s.config: (d, p, s.batch_size, s.num_epochs)
         for (d, p), s in continual.CT0_EXPERTS.items()}
  assert got == ELM_CT0_CONFIGS
  for s in continual.CT0_EXPERTS.values():
    assert (s.learning_rate, s.inputs_length, s.targets_length, s.max_examples,
            s.reduction_factor) == (1e-4, 512, 256, 100000, 32)
  assert continual_tasks.expert_settings("haiku_do_nothing").num_epochs == 10
  with pytest.raises(KeyError, match="not one of the paper's 10 continual experts"):
    continual_tasks.expert_settings("asset_simplification_1")


def test_target_prompts_and_metrics_follow_elm():
  """The 16 prompts of run_target_eval_with_json.py, each with its tasks.py metric."""
  suite = seqio_tasks.suite("ct0_target_eval")
  assert len(suite) == 16 and set(seqio_tasks.suite("ct0_continual")) < set(suite)
  paper = {info.dataset: info.metrics[0] for info in map(seqio_tasks.get_info, suite)}
  assert paper == {
      "wiki_auto": "BLEU", "asset": "BLEU", "ct0_gigaword": "ROUGE", "haiku": "ROUGE",
      "covid_qa": "BERTScore", "eli5": "BERTScore", "empathetic_dialogues": "BERTScore",
      "esnli": "BERTScore", "twitter_top20": "BERTScore"
  }
  asset = seqio_tasks.get_info("asset_simplification_1")
  assert asset.splits == ("validation", "target_eval") and asset.role == "heldout"


def _write_elm(path, n, list_targets=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  tgt = [[f"t{i}", f"alt{i}"] if list_targets else f"t{i}" for i in range(n)]
  path.write_text(json.dumps({"src": [f"s{i}" for i in range(n)], "tgt": tgt}))


def test_elm_ct0_data_files(tmp_path, monkeypatch):
  """ELM's own file layout and splits (tasks.py load_dataset + extract_data_subset_target_eval)."""
  torch = pytest.importorskip("torch")
  monkeypatch.setenv("EXPERT_T5X_CONTINUAL_DIR", str(tmp_path))
  ok, line = task_status("wiki_auto_simplification_1")
  assert not ok and str(tmp_path / "wiki_auto/wiki_auto/simplification_1.train.json") in line
  _write_elm(tmp_path / "wiki_auto/wiki_auto/simplification_1.train.json", 7)
  _write_elm(tmp_path / "wiki_auto/wiki_auto/simplification_1.test.json", 305)
  _write_elm(tmp_path / "asset/asset/simplification_2.validation.json", 320, list_targets=True)
  _write_elm(tmp_path / "covid_qa/covid_qa_deepset/covid_cloze_book_qa.train.json", 4)
  _write_elm(tmp_path / "eli5/generate_a_question_1.train_asks.json", 3)
  assert task_status("wiki_auto_simplification_1")[0]
  train = examples.load_examples("wiki_auto_simplification_1", "train")
  assert [(e["inputs"], e["targets"]) for e in train[:2]] == [("s0", "t0"), ("s1", "t1")]
  assert len(examples.load_examples("wiki_auto_simplification_1", "validation")) == 300
  asset = examples.load_examples("asset_simplification_2", "validation")
  assert len(asset) == 320 and asset[5]["targets"] == "t5"  # ELM keeps the first reference
  generator = torch.Generator()
  generator.manual_seed(42)
  wanted = torch.randperm(320, generator=generator).tolist()[:300]
  sub = examples.load_examples("asset_simplification_2", "target_eval")
  assert [e["example_id"] for e in sub] == wanted
  covid = examples.load_examples("covid_qa_covid_qa_deepset", "validation")
  assert covid == examples.load_examples("covid_qa_covid_qa_deepset", "train")
  assert len(examples.load_examples("eli5_generate_a_question_1", "train")) == 3
  with pytest.raises(ValueError, match="'asset_simplification_2' has no split 'train'"):
    examples.load_examples("asset_simplification_2", "train")
  (tmp_path / "haiku/haiku").mkdir(parents=True)
  (tmp_path / "haiku/haiku/do_nothing.train.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="expected a JSON object with 'src' and 'tgt'"):
    examples.load_examples("haiku_do_nothing", "train")


def _tiny_bertscore_model(directory):
  """A random 3-layer DeBERTa with a WordPiece vocabulary, saved as transformers would."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  words = "[PAD] [UNK] [CLS] [SEP] [MASK] the a cat dog sat on mat ran big small red".split()
  directory.mkdir()
  (directory / "vocab.txt").write_text("\n".join(words) + "\n")
  transformers.BertTokenizer(str(directory / "vocab.txt"), model_max_length=64).save_pretrained(
      str(directory))
  config = transformers.DebertaConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=3,
                                      num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=64)
  torch.manual_seed(0)
  transformers.DebertaModel(config).save_pretrained(str(directory))
  return str(directory)


def _bert_score_utils():
  """bert-score's `utils` module without its package __init__ (which imports pandas/matplotlib)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("bert_score")
  if spec is None:
    pytest.skip("bert-score is not installed (test extra)")
  package = types.ModuleType("bert_score")
  package.__path__ = list(spec.submodule_search_locations)
  package.__version__ = "0.3.13"
  saved = sys.modules.get("bert_score")
  sys.modules["bert_score"] = package
  try:
    return importlib.import_module("bert_score.utils")
  finally:
    sys.modules.pop("bert_score.utils", None)
    if saved is not None:
      sys.modules["bert_score"] = saved
    else:
      sys.modules.pop("bert_score")


@pytest.mark.parity
def test_bertscore_precision_equals_bert_score_package(tmp_path):
  """Our precision equals bert-score's `bert_cos_score_idf` (idf off: [CLS]/[SEP] weight 0, the
  rest 1, as `score()` sets it) at the same layer, on a tiny random model made here."""
  pytest.importorskip("transformers")
  import collections  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from seqio_tasks import bertscore  # pylint: disable=g-import-not-at-top
  utils = _bert_score_utils()
  model_dir = _tiny_bertscore_model(tmp_path / "bertscore")
  refs = ["the cat sat on the mat", "a dog ran", "red", "big red dog"]
  cands = ["the cat sat", "a big dog ran on the mat", "cat", "small cat sat"]
  ours = bertscore.precision_scores(refs, cands, model_dir, num_layers=2)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  idf = collections.defaultdict(lambda: 1.0)
  idf[tokenizer.sep_token_id] = idf[tokenizer.cls_token_id] = 0
  theirs = utils.bert_cos_score_idf(utils.get_model(model_dir, 2), refs, cands, tokenizer, idf,
                                    batch_size=64, device="cpu")[:, 0].tolist()
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
  assert len(set(np.round(ours, 4))) == 4  # four different scores: not a constant
  assert bertscore.precision_scores(["the cat"], [""], model_dir, num_layers=2) == [0.0]
  mean = bertscore.bertscore_precision(refs, cands, model_dir, num_layers=2)
  assert mean["bertscore_precision"] == pytest.approx(100 * np.mean(theirs), abs=1e-4)
  with pytest.raises(ValueError, match="num_layers 18 is outside the 3 layers"):
    bertscore.precision_scores(refs, cands, model_dir)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    bertscore.precision_scores(refs, cands, str(tmp_path))
