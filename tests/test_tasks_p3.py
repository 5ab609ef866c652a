"""P3 TFRecords, promptsource-over-raw-rows sources, dataset tasks and the render round trip.

Fixtures are generated here: P3 directories with P3's real feature keys (incl. pre-expanded
`_score_eval` rows), a promptsource-format templates tree and JSONL rows. Expected values are
written out by hand or derived from the fixture rows independently of the code under test.
"""

import io
import json
import os

import pytest

pytestmark = pytest.mark.tf

tf = pytest.importorskip("tensorflow")
import seqio  # noqa: E402
import sentencepiece as spm  # noqa: E402

import seqio_tasks  # noqa: E402
from seqio_tasks import examples, render, vocab  # noqa: E402

CB = "super_glue_cb_can_we_infer"
CB_TEMPLATES = """
dataset: super_glue
subset: cb
templates:
  t1: !Template
    answer_choices: Yes ||| No ||| Maybe
    id: t1
    jinja: 'Suppose {{premise}} Can we infer that "{{hypothesis}}"? Yes, no, or maybe?
      ||| {% if label !=-1 %}{{ answer_choices[label] }}{% endif %} '
    metadata: !TemplateMetadata
      choices_in_prompt: true
      metrics:
      - Accuracy
      original_task: true
    name: can we infer
    reference: ''
  t2: !Template
    answer_choices: Always ||| Never ||| Sometimes
    id: t2
    jinja: 'Suppose it''s true that {{premise}} Then, is "{{hypothesis}}" {{"always"}}, {{"sometimes"}},
      or {{"never"}} true? ||| {% if label !=-1 %}{{ answer_choices[label] }}{% endif %}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      metrics:
      - Accuracy
      original_task: true
    name: always/sometimes/never
    reference: ''
"""
CB_ROWS = [
    {"premise": "It rained.", "hypothesis": "The street is wet.", "idx": 0, "label": 0},
    {"premise": "He left early.", "hypothesis": "He stayed.", "idx": 1, "label": 1},
    {"premise": "Unlabeled.", "hypothesis": "x", "idx": 2, "label": -1},
    {"premise": "Maybe so.", "hypothesis": "Perhaps.", "idx": 3, "label": 2},
]


def _expected_cb(row, example_id):
  choices = ["Yes", "No", "Maybe"]
  return {"inputs": f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, no, '
                    "or maybe?",
          "targets": choices[row["label"]], "answer_choices": choices,
          "label_index": row["label"], "example_id": example_id, "dataset": "super_glue",
          "subset": "cb", "prompt": "can we infer"}


@pytest.fixture()
def spm_path(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(
      ["Suppose it rained. Can we infer that yes no maybe always never"] * 50),
                                 model_writer=model,
                                 vocab_size=60,
                                 pad_id=0,
                                 eos_id=1,
                                 unk_id=2,
                                 bos_id=-1,
                                 hard_vocab_limit=False)
  path = tmp_path / "spiece.model"
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.fixture()
def env(tmp_path, monkeypatch, spm_path):
  """Empty P3 root, templates tree and raw rows under tmp_path; tiny vocabulary."""
  templates_dir = tmp_path / "templates"
  (templates_dir / "super_glue" / "cb").mkdir(parents=True)
  (templates_dir / "super_glue" / "cb" / "templates.yaml").write_text(CB_TEMPLATES)
  raw_dir = tmp_path / "raw" / "super_glue" / "cb"
  raw_dir.mkdir(parents=True)
  (raw_dir / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CB_ROWS))
  (tmp_path / "p3").mkdir()
  monkeypatch.setenv("EXPERT_T5X_PROMPTSOURCE_DIR", str(templates_dir))
  monkeypatch.setenv("EXPERT_T5X_RAW_DIR", str(tmp_path / "raw"))
  monkeypatch.setenv("EXPERT_T5X_P3_DIR", str(tmp_path / "p3"))
  monkeypatch.setenv("EXPERT_T5X_VOCAB", spm_path)
  vocab.T5_VOCABULARY.reset()
  yield tmp_path
  vocab.T5_VOCABULARY.reset()


def test_prompt_task_renders_raw_rows_and_counts_skipped(env, caplog):
  got = examples.load_examples(CB, "validation")
  # Row 2 has label -1: its target renders empty, so it is skipped (and reported), as in t-zero.
  assert got == [_expected_cb(CB_ROWS[i], i) for i in (0, 1, 3)]
  assert "1 skipped (empty target)" in caplog.text
  assert examples.load_examples(CB + "_score_eval", "validation") == got


def test_seqio_score_eval_rows_from_raw_rows(env):
  task = seqio.get_mixture_or_task(CB + "_score_eval")
  rows = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
  assert [tuple(r["idx"]) for r in rows] == [(i, j) for i in (0, 1, 3) for j in range(3)]
  assert [bool(r["is_correct"]) for r in rows] == [
      j == CB_ROWS[i]["label"] for i in (0, 1, 3) for j in range(3)]
  sp = spm.SentencePieceProcessor(model_file=os.environ["EXPERT_T5X_VOCAB"])
  assert list(rows[0]["targets"]) == sp.encode("Yes") + [1]  # EOS appended.
  assert rows[0]["inputs_pretokenized"].decode() == _expected_cb(CB_ROWS[0], 0)["inputs"]


def _write_p3(path, split, rows):
  path.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(path / f"{split}.tfrecord-00000-of-00001")) as w:
    for row in rows:
      feature = {}
      for key, value in row.items():
        if isinstance(value, float):
          feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        elif isinstance(value, (int, bool)):
          feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        elif isinstance(value, str):
          feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        elif value and isinstance(value[0], str):
          feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[v.encode() for v in value]))
        else:
          feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=list(value)))
      w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  features = {k: {"dtype": "int32" if k in ("inputs", "targets", "idx") else "string",
                  "shape": [None]} for k in rows[0]}
  (path / f"info.{split}.json").write_text(json.dumps({"features": features}))


def test_p3_grouped_and_pre_expanded_score_rows(env):
  labeled = [(i, r) for i, r in enumerate(CB_ROWS) if r["label"] >= 0]
  choices = ["Yes", "No", "Maybe"]
  grouped = [{"inputs": [5, 6, 7], "inputs_pretokenized": _expected_cb(r, i)["inputs"],
              "targets": [8, 1], "targets_pretokenized": choices[r["label"]] + " ",
              "answer_choices": choices} for i, r in labeled]
  score_rows = [{"idx": [i, j], "inputs": [5], "inputs_pretokenized": _expected_cb(r, i)["inputs"],
                 "targets": [9], "targets_pretokenized": choices[j], "answer_choices": choices,
                 "is_correct": j == r["label"], "weight": 1.0}
                for i, r in labeled for j in range(3)]
  _write_p3(env / "p3" / CB, "validation", grouped)
  from_grouped = examples.load_examples(CB, "validation")
  # P3 base rows carry no ids: the row position is the id; the label is found among the choices.
  expected = [dict(_expected_cb(r, n), targets=choices[r["label"]] + " ")
              for n, (_, r) in enumerate(labeled)]
  assert from_grouped == expected
  # Only the pre-expanded directory: regrouped by idx[0], ids from idx, gold from is_correct.
  os.rename(env / "p3" / CB, env / "p3" / "moved")
  _write_p3(env / "p3" / (CB + "_score_eval"), "validation", score_rows)
  regrouped = examples.load_examples(CB + "_score_eval", "validation")
  assert regrouped == [_expected_cb(r, i) for i, r in labeled]
  task = seqio.get_mixture_or_task(CB + "_score_eval")
  rows = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
  assert [(tuple(r["idx"]), bool(r["is_correct"])) for r in rows] == [
      (tuple(s["idx"]), s["is_correct"]) for s in score_rows]


def test_missing_rows_error_names_paths_and_settings(env, monkeypatch):
  monkeypatch.setenv("EXPERT_T5X_RAW_DIR", str(env / "nowhere"))
  with pytest.raises(FileNotFoundError) as e:
    examples.load_examples(CB, "validation")
  message = str(e.value)
  assert str(env / "nowhere" / "super_glue" / "cb" / "validation.jsonl") in message
  assert "EXPERT_T5X_RAW_DIR" in message and "EXPERT_T5X_P3_DIR" in message


def test_render_round_trip_gives_back_canonical_examples(env, spm_path, monkeypatch):
  out = env / "rendered"
  names = [CB, CB + "_score_eval", "demo_topic_classify", "demo_copy_repeat"]
  originals = {n: examples.load_examples(n, "validation") for n in names}
  for n in names:
    render.render_task(n, str(out), splits=["validation"], log=lambda _: None,
                       vocabulary=vocab.T5_VOCABULARY if n == CB else None)
  monkeypatch.setenv("EXPERT_T5X_P3_DIR", str(out))
  # Now read from TFRecords (the raw rows are gone, so nothing can be re-rendered).
  monkeypatch.setenv("EXPERT_T5X_RAW_DIR", str(env / "nowhere"))
  for n in names:
    assert seqio_tasks.provenance.get(n)
    source = seqio.get_mixture_or_task(n).source
    # A `_score_eval` twin reads its base task's grouped rows first.
    assert source.tfrecord_dir("validation") in (str(out / n), str(out / CB))
    assert examples.load_examples(n, "validation") == originals[n], n
    via_tf = [examples.from_tf(e) for e in source.get_dataset("validation").as_numpy_iterator()]
    assert via_tf == originals[n], n
  # Token ids written with the vocabulary equal its encoding of the strings.
  record = next(iter(tf.data.TFRecordDataset(str(out / CB / "validation.tfrecord-00000-of-00001"))))
  parsed = tf.train.Example.FromString(record.numpy())
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  assert list(parsed.features.feature["inputs"].int64_list.value) == sp.encode(
      originals[CB][0]["inputs"])
  assert json.loads((out / CB / "stats.validation.json").read_text()) == {"examples": 3}


def test_dataset_tasks_concatenate_or_draw_member_prompts(env, monkeypatch):
  from seqio_tasks import names
  specs = [s for s in names.train_prompts() if s.dataset == "ag_news"]
  templates_dir = env / "templates" / "ag_news"
  templates_dir.mkdir()
  body = "dataset: ag_news\ntemplates:\n" + "".join(
      f"  id{i}: !Template\n    answer_choices: a ||| b\n    id: id{i}\n"
      f"    jinja: '{s.prompt}: {{{{text}}}} ||| {{{{ answer_choices[label] }}}}'\n"
      f"    name: {s.prompt}\n    reference: ''\n" for i, s in enumerate(specs))
  (templates_dir / "templates.yaml").write_text(body)
  rows = [{"text": f"t{i}", "label": i % 2} for i in range(6)]
  (env / "raw" / "ag_news").mkdir()
  (env / "raw" / "ag_news" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  all_prompts = examples.load_examples("ag_news_all_prompts", "train")
  assert [(e["prompt"], e["inputs"]) for e in all_prompts] == [
      (s.prompt, f"{s.prompt}: t{i}") for s in specs for i in range(6)]
  drawn = examples.load_examples("ag_news_random_prompt", "train")
  assert [e["inputs"] for e in drawn] == [f"{e['prompt']}: t{i}" for i, e in enumerate(drawn)]
  assert drawn == examples.load_examples("ag_news_random_prompt", "train")  # Deterministic.
  assert len({e["prompt"] for e in drawn}) > 1
  assert drawn[0]["prompt"] in {s.prompt for s in specs}
