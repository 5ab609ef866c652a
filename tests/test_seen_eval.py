"""Seen-task evaluation data as the paper read it (ELM seq2seq/extract_data_subset_seen_eval.py and
the task classes of seq2seq/data/tasks.py): the split of the 7 training datasets without a
validation split, the paper's row slices, and its 300-example subset drawn with torch.randperm(seed
42).

Raw rows are generated in the Hugging Face column formats of each dataset (JSONL under RAW_DIR),
with a promptsource-format templates.yaml per dataset naming a real grid prompt.
"""

import json

import pytest

import seqio_tasks
from seqio_tasks import names
from seqio_tasks import seen_eval
from seqio_tasks import vocab

# `torch.randperm(10, generator=torch.Generator().manual_seed(42)).tolist()`, printed by torch 2.13.
TORCH_RANDPERM_10 = [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]

# dataset -> (prompt, answer choices, jinja over the dataset's HF columns, raw split, row maker,
# rows)
DATASETS = {
    "imdb": ("Movie Expressed Sentiment", "negative ||| positive",
             "{{text}} The sentiment expressed for the movie is ||| {{ answer_choices[label] }}",
             "test", lambda i: {"text": f"movie {i}", "label": i % 2}, 400),
    "trec": ("what_category_best_describe",
             "Description ||| Entity ||| Abbreviation ||| Person ||| Quantity ||| Location",
             "{{text}} Category: ||| {{ answer_choices[coarse_label] }}", "test",
             lambda i: {"text": f"question {i}?", "coarse_label": i % 6, "fine_label": i % 40}, 50),
    "ag_news": ("classify", "World politics ||| Sports ||| Business ||| Science and technology",
                "{{text}} Topic? ||| {{ answer_choices[label] }}", "test",
                lambda i: {"text": f"news {i}", "label": i % 4}, 20),
    "dbpedia_14": ("given_a_list_of_category_what_does_the_title_belong_to",
                   "Company ||| Educational Institution ||| Artist",
                   "{{title}}: {{content}} Category? ||| {{ answer_choices[label] }}", "test",
                   lambda i: {"title": f"t{i}", "content": f"c{i}", "label": i % 3}, 400),
    "yelp_review_full": ("based_on_that", "1 star ||| 2 stars ||| 3 stars ||| 4 stars ||| 5 stars",
                         "{{ text }} So I would give it ||| {{ answer_choices[label] }}", "test",
                         lambda i: {"text": f"place {i}", "label": i % 5}, 400),
    "app_reviews":
        ("categorize_rating_using_review", "Not at all ||| No ||| Maybe ||| Yes ||| Definitely",
         "{{review}} Recommend? ||| {{ answer_choices[star - 1] }}", "train",
         lambda i: {"package_name": "p", "review": f"app {i}", "date": "d", "star": i % 5 + 1}, 1000
        ),
    "amazon_polarity":
        ("Is_this_review", "Negative ||| Positive",
         "Title: {{title}} Review: {{content}} ||| {{ answer_choices[label] }}", "train",
         lambda i: {"label": i % 2, "title": "t", "content": f"r{i}"}, 50010),
}


def _task(dataset):
  return names.score_eval_name(names.prompt_task_name(dataset, None, DATASETS[dataset][0]))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("seen")
  for dataset, (prompt, choices, jinja, split, row, n) in DATASETS.items():
    (root / "templates" / dataset).mkdir(parents=True)
    (root / "templates" / dataset / "templates.yaml").write_text(
        f"dataset: {dataset}\ntemplates:\n  t1: !Template\n    answer_choices: {choices}\n"
        f"    id: t1\n    jinja: {json.dumps(jinja)}\n    metadata: !TemplateMetadata\n"
        "      choices_in_prompt: false\n      metrics:\n      - Accuracy\n"
        f"      original_task: true\n    name: {prompt}\n    reference: ''\n")
    (root / "raw" / dataset).mkdir(parents=True)
    with open(root / "raw" / dataset / f"{split}.jsonl", "w") as f:
      f.writelines(json.dumps(row(i)) + "\n" for i in range(n))
  (root / "p3").mkdir()
  patch = pytest.MonkeyPatch()
  patch.setenv("EXPERT_T5X_PROMPTSOURCE_DIR", str(root / "templates"))
  patch.setenv("EXPERT_T5X_RAW_DIR", str(root / "raw"))
  patch.setenv("EXPERT_T5X_P3_DIR", str(root / "p3"))
  yield root
  patch.undo()


def test_torch_randperm_equals_torch():
  assert seen_eval.torch_randperm(10) == TORCH_RANDPERM_10
  assert seen_eval.torch_randperm(0) == [] and seen_eval.torch_randperm(1) == [0]
  torch = pytest.importorskip("torch")  # in the parity extra; the constant above is checked always
  for n in (2, 81, 300, 7600):
    g = torch.Generator()
    g.manual_seed(42)
    assert seen_eval.torch_randperm(n) == torch.randperm(n, generator=g).tolist()


def test_every_dataset_without_validation_evaluates_on_the_papers_split(env):
  for dataset, (_, _, _, split, _, n) in DATASETS.items():
    ids = [ex["example_id"] for ex in seqio_tasks.load_examples(_task(dataset), "validation")]
    if dataset == "app_reviews":  # APPREVIEWS: train.select([len(train) - i for i in range(300)])
      assert ids == [0] + [n - i for i in range(1, 300)]
    elif dataset == "amazon_polarity":  # AMAZONPOLARITY: train rows [50000 - i for i in range(300)]
      assert ids == [50000 - i for i in range(300)]
    else:  # the whole test split (the first N with max_examples)
      assert split == "test" and ids == list(range(n))
      first = seqio_tasks.load_examples(_task(dataset), "validation", 5)
      assert [ex["example_id"] for ex in first] == [0, 1, 2, 3, 4]
  rows = seqio_tasks.load_examples(_task("app_reviews"), "validation", 2)
  assert rows[0]["inputs"] == "app 0 Recommend?" and rows[1]["inputs"] == "app 999 Recommend?"


def test_paper_subset_is_the_first_300_of_randperm_42_after_the_papers_slice(env):
  def ids(dataset, max_examples=None):
    return [ex["example_id"] for ex in seqio_tasks.load_examples(
        _task(dataset), "validation", max_examples, subset="paper")]
  perm300 = seen_eval.torch_randperm(300)
  assert ids("imdb") == perm300  # IMDB: test[0:300], then the permutation
  assert ids("dbpedia_14") == perm300
  assert ids("yelp_review_full") == [1 + j for j in perm300]  # YELPREVIEWFULL: test rows 1..300
  assert ids("trec") == seen_eval.torch_randperm(50)  # the whole test split (50 < 300 rows)
  assert ids("trec", 10) == seen_eval.torch_randperm(50)[:10]
  assert ids("ag_news") == seen_eval.torch_randperm(20)  # GeneralTask: x["test"]
  app = [0] + [1000 - i for i in range(1, 300)]
  assert ids("app_reviews") == [app[j] for j in perm300]
  with pytest.raises(ValueError, match="example subset 'random' is not one of"):
    seqio_tasks.load_examples(_task("imdb"), "validation", subset="random")


@pytest.mark.tf
def test_p3_test_split_serves_validation(env, tmp_path, monkeypatch):
  """A P3 directory holding only `test` (bigscience/P3's layout for imdb) is read for
  `validation`."""
  from seqio_tasks.sources import p3  # pylint: disable=g-import-not-at-top
  base = names.prompt_task_name("imdb", None, DATASETS["imdb"][0])
  rows = seqio_tasks.load_examples(_task("imdb"), "validation", 3)
  p3.write_split(str(tmp_path / base), "test",
                 [dict(r, inputs="from p3 " + r["inputs"]) for r in rows])
  monkeypatch.setenv("EXPERT_T5X_P3_DIR", str(tmp_path))
  got = seqio_tasks.load_examples(_task("imdb"), "validation")
  assert [r["inputs"] for r in got] == ["from p3 " + r["inputs"] for r in rows]
  assert seen_eval.p3_split_aliases("app_reviews") == {}  # a row slice: raw rows only


@pytest.mark.tf
def test_cli_seen_eval_with_the_paper_subset_records_it(env, tmp_path, monkeypatch):
  from expert_t5x import eval as eval_entry  # pylint: disable=g-import-not-at-top
  from expert_t5x import results  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["question category entity person"] * 50),
                                 model_writer=model, vocab_size=40, pad_id=0, eos_id=1, unk_id=2,
                                 bos_id=-1, hard_vocab_limit=False)
  (tmp_path / "spiece.model").write_bytes(model.getvalue())
  monkeypatch.setenv("EXPERT_T5X_VOCAB", str(tmp_path / "spiece.model"))
  vocab.T5_VOCABULARY.reset()
  try:
    rc = eval_entry.cli_main(["--tasks", _task("trec"), "--output_dir", str(tmp_path / "out"),
                              "--model_config", "tiny", "--random_init_seed", "0",
                              "--example_subset", "paper", "--max_examples", "12",
                              "--batch_size", "4", "--bootstrap_samples", "0", "--no_progress"])
  finally:
    vocab.T5_VOCABULARY.reset()
  assert rc == 0
  res = results.read_results(str(tmp_path / "out" / results.RESULTS_FILE))
  assert res["protocol"]["example_subset"] == "paper" and res["protocol"]["split"] == "validation"
  assert res["entries"][0]["prompts"][0]["num_examples"] == 12
  preds = results.read_jsonl(str(tmp_path / "out" / results.PREDICTIONS_FILE))
  assert [p["example_id"] for p in preds] == seen_eval.torch_randperm(50)[:12]
