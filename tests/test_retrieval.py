"""Tests for Retrieval of Experts: text formats, voting with known answers and ties, cache, guard,
CLI."""

import hashlib
import json
import os

import numpy as np
import pytest

from expert_t5x import expert_format
from expert_t5x import library as library_lib
from expert_t5x import merging
from expert_t5x import retrieval
from test_embedders import make_tiny_minilm

BASE = "b" * 64
ROW = {
    "inputs": "Is the sky blue?", "answer_choices": ["yes", "no"], "dataset": "super_glue",
    "subset": "rte", "prompt": "p1", "answer_choices_template": "Yes ||| No"
}


def test_text_formats_as_the_paper():
  f = lambda fmt, row=ROW, **kw: retrieval.format_text(row, fmt, **kw)
  assert f("instance") == "Instance: Is the sky blue?"
  assert f("label") == "Answer Choices: yes, no"
  assert f("choice") == "Answer Choices: Yes ||| No"
  assert f("label_instance") == "Answer Choices: yes, no, Instance: Is the sky blue?"
  assert f("choice_instance") == "Answer Choices: Yes ||| No, Instance: Is the sky blue?"
  assert f("instance_new") == "Is the sky blue?"
  assert f("label_new") == "yes, no"
  assert f("choice_new") == "Yes ||| No"
  assert f("label_instance_new") == "yes, no</s>Is the sky blue?"
  assert f("choice_instance_new") == "Yes ||| No</s>Is the sky blue?"
  generative = dict(ROW, answer_choices=[], answer_choices_template=None)
  assert f("label", generative) == "Answer Choices: "
  assert f("choice_instance", generative) == "Answer Choices: None, Instance: Is the sky blue?"
  no_template = {k: v for k, v in ROW.items() if k != "answer_choices_template"}
  assert f("choice", no_template,
           lookup=lambda d, s, p: "{{a}} ||| {{b}}") == "Answer Choices: {{a}} ||| {{b}}"

  def failing(d, s, p):
    raise KeyError(p)
  with pytest.raises(retrieval.RetrievalError, match="Template lookup failed"):
    f("choice", no_template, lookup=failing)
  with pytest.raises(retrieval.RetrievalError, match="no template lookup"):
    f("choice", no_template)
  with pytest.raises(retrieval.RetrievalError, match="Unknown text format"):
    f("labels")


def _elm_get_text_format(text_format, instance, answer_choice_format, label_list):
  """ELM's `get_text_format` (retrieval/make_index.py and retrieval/run_retrieval.py, identical in
  both), copied line for line with `config.text_format` as an argument:

      if label_list==None:
          label_list = ''
      else:
          label_list = ", ".join(label_list)
      if config.text_format=='instance':
          text = f"Instance: {instance}"
      ... (every branch below as written there)
  """
  if label_list == None:  # noqa: E711  (the paper's comparison)
    label_list = ''
  else:
    label_list = ", ".join(label_list)
  return {
      "instance": f"Instance: {instance}",
      "label": f"Answer Choices: {label_list}",
      "choice": f"Answer Choices: {answer_choice_format}",
      "label_instance": f"Answer Choices: {label_list}, Instance: {instance}",
      "choice_instance": f"Answer Choices: {answer_choice_format}, Instance: {instance}",
      "instance_new": f"{instance}",
      "label_new": f"{label_list}",
      "choice_new": f"{answer_choice_format}",
      "label_instance_new": f"{label_list}</s>{instance}",
      "choice_instance_new": f"{answer_choice_format}</s>{instance}",
  }[text_format]


@pytest.mark.parametrize("text_format", retrieval.TEXT_FORMATS)
def test_key_and_query_texts_equal_elm_with_and_without_choices(text_format):
  """Against ELM's formatting code (above). ELM's rows: `label_list = row["labels_list"]`, None when
  the row has no labels_list (a generative prompt: make_index.py `except: label_list = None`), and
  `answer_choices_format = promptList.answer_choices`, the template's raw expression, None for a
  template without answer choices. Ours: `answer_choices` [] and `answer_choices_template` None."""
  rows = [
      (ROW, ["yes", "no"], "Yes ||| No"),
      (dict(ROW, answer_choices=[], answer_choices_template=None), None, None),
      # an empty labels_list
      (dict(ROW, answer_choices=[], answer_choices_template=None), [], None),
  ]
  for row, label_list, raw in rows:
    want = _elm_get_text_format(text_format, row["inputs"], raw, label_list)
    assert retrieval.format_text(row, text_format) == want
  # The template lookup path gives the same texts (a generative template's answer_choices is None).
  bare = {k: v for k, v in rows[1][0].items() if k != "answer_choices_template"}
  assert retrieval.format_text(bare, text_format, lambda d, s, p: None) == \
      _elm_get_text_format(text_format, ROW["inputs"], None, None)


def test_query_selection_is_seeded_and_recorded():
  a = retrieval.select_queries(100, 32, seed=3)
  assert a == retrieval.select_queries(100, 32, seed=3) and len(set(a)) == 32
  assert a != retrieval.select_queries(100, 32, seed=4)
  assert sorted(retrieval.select_queries(5, 32)) == [0, 1, 2, 3, 4]


def test_vote_known_answers_and_ties():
  # Keys 0,1 -> expert 0; keys 2,3 -> expert 1; key 4 -> expert 2. Each row's best key is set by
  # hand.
  key_expert = np.array([0, 0, 1, 1, 2])
  best = [3, 1, 4, 2, 0]
  scores = np.zeros((5, 5))
  scores[np.arange(5), best] = 1.0
  v = retrieval.vote(scores, key_expert, 3)
  assert v["votes"].tolist() == [2, 2, 1]
  # Experts 0 and 1 tie on votes; expert 0's best voted key (0) is lower than expert 1's (2).
  assert v["ranked"] == [0, 1, 2]
  # Equal scores inside one query go to the lowest key id.
  tied = np.array([[0.0, 0.5, 0.5, 0.0, 0.2]])
  assert retrieval.top_keys(tied, 1).tolist() == [[1]]
  assert retrieval.top_keys(tied, 2).tolist() == [[1, 2]]
  assert retrieval.top_keys(tied, 3).tolist() == [[1, 2, 4]]
  # Two votes per query: the second-best key votes too.
  v2 = retrieval.vote(tied, key_expert, 3, votes_per_query=2)
  assert v2["votes"].tolist() == [1, 1, 0] and v2["ranked"] == [0, 1]
  # Expert 1 wins outright when it has more votes, whatever its key ids.
  scores[4] = 0
  scores[4, 3] = 1.0
  assert retrieval.vote(scores, key_expert, 3)["ranked"] == [1, 0, 2]


def test_top_key_by_expert_equals_argmax_with_ties_and_empty_experts():
  """The nearest key found through per-expert maxima vs numpy's argmax over all keys (lowest id
  among
  ties), on integer scores with many exact ties and experts of 0..7 keys."""
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 8, size=40)
  counts[0] = 0
  offsets = np.concatenate([[0], np.cumsum(counts)])
  scores = rng.integers(0, 4, size=(64, int(offsets[-1]))).astype(np.float32)
  best = retrieval.per_expert_max(scores, offsets)
  assert np.all(best[:, counts == 0] == -np.inf)
  got = retrieval.top_key_by_expert(scores, best, offsets)
  np.testing.assert_array_equal(got, np.argmax(scores, axis=1))
  np.testing.assert_array_equal(got, retrieval.top_keys(scores, 1)[:, 0])


def _keyset(texts_per_expert):
  ids = [f"e{i}" for i in range(len(texts_per_expert))]
  return retrieval.KeySet(ids, texts_per_expert, [[{}] * len(t) for t in texts_per_expert])


def test_summary_confidence_abstention_and_identical_keys():
  keys = _keyset([["a", "shared"], ["shared", "b"], ["c"]])
  # Queries 0-2 hit expert 0's "shared" key (text shared with expert 1), query 3 hits "b".
  scores = np.zeros((4, 5))
  scores[:3, 1] = 1.0
  scores[3, 3] = 1.0
  s = retrieval.summarize(scores, keys, abstain_threshold=0.8, fallback="merge")
  assert s["winner"] == "e0" and s["confidence"] == 0.75 and s["margin"] == 0.5
  assert s["abstained"] and s["selected"] == "merge"
  assert s["identical_key_votes"] == 3 and "e1" in s["warning"]
  assert [c["expert"] for c in s["candidates"]] == ["e0", "e1", "e2"]
  assert [c["votes"] for c in s["candidates"]] == [3, 1, 0]
  assert s["instance_level"] == ["e0", "e0", "e0", "e1"]
  np.testing.assert_allclose(retrieval.expert_similarity(scores, keys.offsets), [0.75, 0.25, 0.0])
  assert not retrieval.summarize(scores, keys)["abstained"]


def test_unvoted_candidates_ranked_by_similarity_then_id():
  """Hand-computed: e3 gets every vote; e0, e1, e2 have mean best-key scores 0.2, 0.5, 0.2."""
  keys = _keyset([["a"], ["b"], ["c"], ["d"]])
  scores = np.array([[0.2, 0.5, 0.2, 0.9], [0.2, 0.5, 0.2, 0.8]])
  s = retrieval.summarize(scores, keys)
  assert [(c["expert"], c["votes"]) for c in s["candidates"]] == [("e3", 2), ("e1", 0), ("e0", 0),
                                                                  ("e2", 0)]
  assert all(type(c["votes"]) is int and type(c["similarity"]) is float for c in s["candidates"])


def _paper_dataset_level(stats, dataset_of):
  """ELM's run_task_32.py, transcribed: `stats` counts votes per expert in insertion order, the
  winner is `sorted(stats, key=stats.get, reverse=True)[0]` and its dataset `split('@')[0]`."""
  picked_expert = sorted(stats, key=stats.get, reverse=True)[0]
  return dataset_of[picked_expert]


def test_dataset_level_rules_disagree_on_a_hand_built_vote():
  """e0 (dataset X) wins the task-level vote 3-2-2; e1 and e2 (both dataset Y) pool 4 votes. The
  paper
  (run_task_32.py) takes the winner's dataset X; the pooled rule takes Y."""
  keys = _keyset([["a"], ["b"], ["c"]])
  scores = np.zeros((7, 3))
  for q, k in enumerate([0, 0, 0, 1, 1, 2, 2]):
    scores[q, k] = 1.0
  dataset_of = {"e0": "X", "e1": "Y", "e2": "Y"}
  winner = retrieval.summarize(scores, keys, dataset_experts=dataset_of)
  pooled = retrieval.summarize(scores, keys, dataset_experts=dataset_of, dataset_rule="pooled")
  assert winner["winner"] == pooled["winner"] == "e0"
  stats = {"e0": 3, "e1": 2, "e2": 2}
  assert winner["dataset_level"] == {"rule": "winner", "dataset": "X", "votes": {"X": 3, "Y": 4}}
  assert winner["dataset_level"]["dataset"] == _paper_dataset_level(stats, dataset_of)
  assert pooled["dataset_level"] == {"rule": "pooled", "dataset": "Y", "votes": {"X": 3, "Y": 4}}
  # A winner that records no single dataset gives no dataset under the paper's rule.
  assert retrieval.summarize(scores, keys, dataset_experts={"e1": "Y", "e2": "Y"}
                             )["dataset_level"]["dataset"] is None
  with pytest.raises(retrieval.RetrievalError, match="Unknown dataset rule 'votes'"):
    retrieval.dataset_vote(winner["candidates"], dataset_of, "votes")


class HashEmbedder:
  """Bag-of-words hashing embedder with an embed-call log (an independent, transparent dense
  embedder)."""
  kind = "dense"
  identity = "hash-test-v1"

  def __init__(self):
    self.calls = []

  def embed(self, texts):
    self.calls.append(list(texts))
    out = np.zeros((len(texts), 64), np.float32)
    for i, t in enumerate(texts):
      for w in t.lower().replace(",", " ").split():
        out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _expert(path, dataset, prompt, words, choices, seed, subset=None):
  task = "_".join(x for x in (dataset, subset, prompt) if x)
  keys = [{
      "inputs": f"{words} example {i}", "targets": "t", "answer_choices": choices, "example_id": i,
      "task": task, "dataset": dataset, "subset": subset, "prompt": prompt
  } for i in range(4)]
  meta = expert_format.build_metadata("adapter", {"kind": "adapter", "init_seed": 0},
                                      base_fingerprint=BASE,
                                      base_config_name="tiny",
                                      provenance=[{
                                          "task": task, "dataset": dataset, "subset": subset,
                                          "prompt": prompt, "role": "train"
                                      }])
  params = {"encoder/layers_0/mlp_adapter/wi/kernel": np.full((2, 2), seed, np.float32)}
  expert_format.save_expert(path, params, meta, keys)
  return str(path)


@pytest.fixture
def lib(tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib")
  lib.add(_expert(tmp_path / "a", "cosmos_qa", "p1", "story about people", ["a", "b", "c", "d"], 1))
  lib.add(
      _expert(tmp_path / "b", "super_glue", "p2", "premise hypothesis entail", ["yes", "no"], 2,
              "rte"))
  lib.add(
      _expert(tmp_path / "c", "super_glue", "p3", "premise hypothesis entail", ["true", "false"], 3,
              "rte"))
  lib.add(
      _expert(tmp_path / "d", "imdb", "p4", "movie review sentiment", ["positive", "negative"], 4))
  return lib


def _queries(words, choices, dataset="anli", n=40):
  return [{
      "inputs": f"{words} query {i}", "answer_choices": choices, "dataset": dataset, "subset": None,
      "prompt": "q", "task": f"{dataset}_q"
  } for i in range(n)]


def test_retriever_end_to_end_with_cache_and_guard(lib, tmp_path):
  emb = HashEmbedder()
  r = retrieval.Retriever(lib, emb)
  assert len(emb.calls) == 4 and len(r.keys.texts) == 16  # one embed call per expert's keys
  res = r.retrieve(_queries("premise hypothesis entail", ["yes", "no"]), guard="zero_shot")
  assert res["winner"] == "super_glue_rte_p2" and res["num_queries"] == 32 and res[
      "confidence"] == 1.0
  assert res["guard"]["mode"] == "zero_shot" and res["guard"]["excluded"] == []
  assert res["dataset_level"]["dataset"] == "super_glue/rte"
  # Under zero_shot, an rte eval task may not use rte experts; under seen it may.
  rte = _queries("premise hypothesis entail", ["yes", "no"], dataset="super_glue/rte")
  res = r.retrieve(rte, guard="zero_shot")
  assert {x["id"] for x in res["guard"]["excluded"]} == {"super_glue_rte_p2", "super_glue_rte_p3"}
  assert res["winner"] not in ("super_glue_rte_p2", "super_glue_rte_p3")
  assert r.retrieve(rte, guard="seen")["winner"] == "super_glue_rte_p2"
  # A second retriever reuses every cached key embedding; a new expert embeds only its own keys.
  emb2 = HashEmbedder()
  retrieval.Retriever(lib, emb2)
  assert emb2.calls == []
  lib.add(_expert(tmp_path / "e", "dream", "p5", "dialogue between speakers", ["x", "y"], 5))
  retrieval.Retriever(lib, emb2)
  assert len(emb2.calls) == 1 and emb2.calls[0][0].endswith("dialogue between speakers example 0")


def test_retrieve_many_equals_one_product_per_prompt(lib, monkeypatch):
  """Batched retrieval (one product per allowed expert set, in row blocks) vs an independent
  per-prompt
  reference: numpy scores of each prompt's queries against its guard's keys, then `summarize`. With
  3-row blocks every prompt's queries are split over several products."""
  emb = HashEmbedder()
  r = retrieval.Retriever(lib, emb)
  prompts = [_queries("premise hypothesis entail", ["yes", "no"], dataset="super_glue/rte", n=20),
             _queries("movie review sentiment", ["positive", "negative"], n=9),
             _queries("story about people", ["a", "b", "c", "d"], dataset="hellaswag", n=40),
             _queries("premise hypothesis entail", ["yes", "no"], dataset="super_glue/rte", n=5)]
  monkeypatch.setattr(retrieval, "MAX_SCORES", 3 * len(r.keys.texts))
  chunked = r.retrieve_many(prompts, guard="zero_shot", num_queries=8, seed=3)
  monkeypatch.undo()
  emb.calls.clear()
  batched = r.retrieve_many(prompts, guard="zero_shot", num_queries=8, seed=3)
  assert len(emb.calls) == 1  # every prompt's queries embedded in one call
  for rows, got, got_chunked in zip(prompts, batched, chunked):
    verdict = library_lib.apply_guard(r.entries, rows[0]["dataset"], None, "zero_shot")
    keys, key_emb = r._subset_keys(verdict.allowed)  # pylint: disable=protected-access
    idx = retrieval.select_queries(len(rows), 8, 3)
    q = emb.embed([retrieval.format_text(rows[i]) for i in idx])
    want = retrieval.summarize(q @ key_emb.T, keys, dataset_experts=r.dataset_of)
    # A product of another shape (the batched one, or 3-row blocks) may round the last bit
    # differently (another BLAS kernel, or another thread count): the same votes and ranking,
    # similarities equal to float32 precision.
    assert got["winner"] == want["winner"]
    for result in (got, got_chunked):
      assert [(c["expert"], c["votes"]) for c in result["candidates"]] == \
          [(c["expert"], c["votes"]) for c in want["candidates"]]
      np.testing.assert_allclose([c["similarity"] for c in result["candidates"]],
                                 [c["similarity"] for c in want["candidates"]], rtol=1e-6)
    assert got["query_indices"] == got_chunked["query_indices"] == idx
  assert batched[0]["winner"] not in ("super_glue_rte_p2", "super_glue_rte_p3")
  with pytest.raises(retrieval.RetrievalError, match="prompt 1"):
    r.retrieve_many([prompts[0], []])


def test_retrieve_and_merge_cli_with_bm25(lib, tmp_path, capsys):
  qfile = tmp_path / "q.jsonl"
  rows = _queries("movie review sentiment", ["positive", "negative"]) + _queries(
      "story about people", ["a", "b", "c", "d"], dataset="hellaswag")
  qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "r.json"
  assert retrieval.retrieve_main([
      "--library", lib.root, "--queries",
      str(qfile), "--embedder", "bm25", "--num-queries", "8", "--output",
      str(out)
  ]) == 0
  data = json.load(open(out))
  assert data["guard_mode"] == "zero_shot" and data["text_format"] == "label_instance"
  winners = {r["task"]: r["winner"] for r in data["results"]}
  assert winners == {"anli_q": "imdb_p4", "hellaswag_q": "cosmos_qa_p1"}
  assert len(data["results"][0]["query_indices"]) == 8
  merged = tmp_path / "merged"
  assert merging.merge_main([
      "--library", lib.root, "--retrieval",
      str(out), "--task", "anli_q", "--top-k", "2", "--output",
      str(merged)
  ]) == 0
  meta = expert_format.read_metadata(merged)
  assert meta["merge"]["inputs"][0]["name"] == "imdb_p4" and len(meta["merge"]["inputs"]) == 2
  assert retrieval.retrieve_main(["--library", lib.root, "--queries",
                                  str(qfile), "--task", "nope"]) == 1
  assert "not in" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    retrieval.retrieve_main(["--help"])
  assert e.value.code == 0


def test_retrieve_cli_with_minilm(lib, tmp_path, monkeypatch, capsys):
  directory = make_tiny_minilm(tmp_path / "minilm")
  qfile = tmp_path / "q.jsonl"
  qfile.write_text("".join(
      json.dumps(r) + "\n" for r in _queries("story about people", ["a", "b", "c", "d"])))
  out = tmp_path / "r.json"
  assert retrieval.retrieve_main([
      "--library", lib.root, "--queries",
      str(qfile), "--minilm-dir", directory, "--max-seq-length", "64", "--votes-per-query", "2",
      "--output",
      str(out)
  ]) == 0
  data = json.load(open(out))
  assert data["embedder"].startswith("minilm-") and data["results"][0]["total_votes"] == 64
  assert os.listdir(os.path.join(lib.root, "embeddings", data["embedder"]))
  monkeypatch.setenv("EXPERT_T5X_MINILM_DIR", str(tmp_path / "missing"))
  assert retrieval.retrieve_main(["--library", lib.root, "--queries", str(qfile)]) == 1
  assert "data fetch minilm" in capsys.readouterr().err


def test_retriever_refuses_unknown_provenance_under_zero_shot_unless_allowed(tmp_path):
  from test_library import make_expert  # pylint: disable=g-import-not-at-top
  lib = library_lib.Library.init(tmp_path / "lib")
  lib.add(make_expert(tmp_path / "k", 0, "cosmos_qa"))
  unknown = lib.add(make_expert(tmp_path / "u", 1, expert_format.UNKNOWN_DATASET, None, "t"))["id"]
  retriever = retrieval.Retriever(lib, retrieval.make_embedder("bm25"))
  queries = [{"inputs": f"{expert_format.UNKNOWN_DATASET} input {i}", "answer_choices": ["a", "b"],
              "dataset": "super_glue", "subset": "rte"} for i in range(3)]
  refused, admitted = (retriever.retrieve(queries, num_queries=3, allow_unknown_provenance=allow)
                       for allow in (False, True))
  assert refused["guard"]["excluded"] == [{"id": unknown, "reason": "unknown provenance"}]
  assert refused["selected"] != unknown and "allow_unknown_provenance" not in refused["guard"]
  assert admitted["guard"] == {"mode": "zero_shot", "num_allowed": 2, "excluded": [],
                               "allow_unknown_provenance": True}
  assert admitted["selected"] == unknown  # its keys match the queries best
