"""Hostile inputs and damaged files, table-driven, through the `expert-t5x` console script's main().

Every case asserts the exit code (2: usage, 1: data), exactly one stderr line, no traceback, and
that nothing under the fixture folder was written, changed or deleted. The fixtures (two tiny
adapter experts, a library holding them, queries, a recipe) are built once per module. Then: the
corruption matrix (each file kind damaged four ways x the commands that read it), path traversal
through a tampered library entry, temp folders of killed writers, and concurrent writers with a
reader.
"""

import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest

from expert_t5x import cli
from expert_t5x import expert_format
from expert_t5x import library as library_lib

BASE = "b" * 64
RETRIEVAL_FILES = {  # retrieval files of the wrong shape (merge --retrieval)
    "r_expert_int.json": {"results": [{"task": "t", "candidates": [{"expert": 5}]}]},
    "r_results_str.json": {"results": "x"},
    "r_prompts_int.json": {"prompts": [1]},
    "r_candidates_str.json": {"candidates": "cosmos_qa_p"},
    "r_two_tasks.json": {"results": [{"task": "a", "candidates": []},
                                     {"task": "b", "candidates": []}]},
    "r_unknown_expert.json": {"candidates": [{"expert": "nope", "votes": 3}]},
    "r_no_candidates.json": {"candidates": []},
}


def _make_expert(path, seed, dataset):
  rng = np.random.default_rng(seed)
  params = {"encoder": {"layers_0": {"mlp_adapter": {"wi": {"kernel": rng.normal(size=(4, 2))}}}}}
  meta = expert_format.build_metadata(
      "adapter", {"kind": "adapter", "reduction_factor": 2, "init_seed": 0}, base_fingerprint=BASE,
      base_config_name="tiny",
      provenance=[{"task": f"{dataset}_p", "dataset": dataset, "subset": None, "prompt": "p",
                   "role": "train"}])
  keys = [{"inputs": f"{dataset} input {i}", "targets": "t", "answer_choices": ["a", "b"],
           "example_id": i, "task": f"{dataset}_p", "dataset": dataset, "subset": None,
           "prompt": "p"} for i in range(3)]
  expert_format.save_expert(path, params, meta, keys)
  return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("hostile")
  a = _make_expert(root / "a", 0, "cosmos_qa")
  b = _make_expert(root / "b", 1, "imdb")
  lib = library_lib.Library.init(root / "lib")
  lib.add(a)
  lib.add(b)
  (root / "queries.jsonl").write_text("".join(json.dumps({"inputs": f"q {i}", "task": "t"}) + "\n"
                                              for i in range(3)))
  (root / "empty.jsonl").write_text("")
  (root / "afile").write_text("x")
  (root / "adir").mkdir()
  (root / "notjson.json").write_text("{not json")
  (root / "list.json").write_text("[1, 2]")
  (root / "nofields.json").write_text("{}")
  (root / "candidates.json").write_text('{"results": [{"task": "t", "candidates": 5}]}')
  (root / "notpickle.pt").write_bytes(b"\x00not a pickle at all")
  for name, content in RETRIEVAL_FILES.items():
    (root / name).write_text(json.dumps(content))
  bad = root / "bitflip"
  shutil.copytree(b, bad)
  data = bytearray((bad / expert_format.PARAMS_FILE).read_bytes())
  data[-3] ^= 0x40
  (bad / expert_format.PARAMS_FILE).write_bytes(bytes(data))
  return root


def _snapshot(root):
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      st = os.lstat(path)
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
  return out


def _run(argv, capsys):
  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse's usage errors
    rc = e.code
  out = capsys.readouterr()
  return rc, out.out, out.err


def _fmt(argv, root):
  return [a.format(r=root, lib=f"{root}/lib", a=f"{root}/a", b=f"{root}/b") for a in argv]


def _cases():
  m = ["merge", "--experts", "{a}", "{b}", "--output", "{r}/out"]
  cases = []

  def add(rc, *argv):
    cases.append((rc, list(argv)))

  # merge: flags out of range or not finite (negative λ/weights are task negation: allowed)
  for method, flag, values in (("task_arithmetic", "--lam", ("nan", "inf", "-inf")),
                               ("ties", "--density", ("nan", "0", "1.5", "-1", "inf")),
                               ("dare", "--drop", ("nan", "1", "-0.1", "2")),
                               ("ties", "--lam", ("nan", "-inf"))):
    for v in values:
      add(2 if v in ("nan", "inf", "-inf") else 1, *m, "--method", method, flag, v)
  for w in (["nan", "1"], ["1", "inf"], ["-inf", "1"], ["1"], ["1", "1", "1"], ["-1", "1"],
            ["0", "0"]):
    add(2 if any(x in ("nan", "inf", "-inf") for x in w) else 1, *m, "--method", "weighted",
        "--weights", *w)
  add(2, *m, "--method", "uniform", "--weights", "nan", "1")
  for v in ("0", "-1", "-5"):
    add(2, *m, "--method", "ties", "--svd-rank", v)
  for v in ("0", "-2"):
    add(2, "merge", "--library", "{lib}", "--retrieval", "{r}/queries.jsonl", "--top-k", v,
        "--output", "{r}/out")
  for retrieval in ("list.json", "nofields.json", "notjson.json", "adir", "missing.json",
                    "candidates.json"):
    add(1, "merge", "--library", "{lib}", "--retrieval", f"{{r}}/{retrieval}", "--output",
        "{r}/out")
  for retrieval in RETRIEVAL_FILES:  # --top-k 1: the file's content is what is refused
    add(2 if retrieval == "r_no_candidates.json" else 1, "merge", "--library", "{lib}",
        "--retrieval", f"{{r}}/{retrieval}", "--top-k", "1", "--output", "{r}/out")
  add(2, "merge", "--experts", "{a}", "{a}", "--output", "{r}/out")
  add(2, "merge", "--experts", "{a}", "{b}", "--output", "{a}")
  add(2, "merge", "--experts", "{a}", "{b}", "--output", "{r}/afile")
  add(2, *m, "--recipe-out", "{r}/adir")
  add(2, *m, "--recipe-out", "{r}/missing/dir/r.json")
  add(1, "merge", "--experts", "{r}/missing", "--output", "{r}/out")
  add(1, "merge", "--experts", "{r}/afile", "--output", "{r}/out")
  add(1, "merge", "--experts", "{r}/adir", "--output", "{r}/out")
  add(1, "merge", "--experts", "{a}", "{r}/bitflip", "--output", "{r}/out")
  add(1, "merge", "--output", "{r}/out")
  add(1, "merge", "--ids", "x", "--output", "{r}/out")
  for bad_id in ("../a", "..", ".hidden", "a/b", "/etc/passwd", "nope", "a" * 300):
    add(1, "merge", "--library", "{lib}", "--ids", bad_id, "--output", "{r}/out")
  add(2, "merge", "--library", "{lib}", "--ids", "-x", "--output", "{r}/out")
  for recipe in ("missing.json", "notjson.json", "list.json", "nofields.json", "afile", "adir"):
    add(1, "merge", "--recipe", f"{{r}}/{recipe}", "--experts", "{a}", "--output", "{r}/out")
  add(2, *m, "--method", "nosuch")
  add(2, *m, "--seed", "x")
  add(2, *m, "--lam", "x")
  add(2, "merge", "--experts", "{a}")
  # library
  for bad_id in ("../a", "..", ".hidden", "a/b", "/etc/passwd", "nope", "", "a" * 300, "x\ny"):
    add(1, "library", "show", "{lib}", bad_id)
    add(1, "library", "remove", "{lib}", bad_id)
  add(1, "library", "show", "{lib}", "nope", "--verify")
  add(2, "library", "init", "{r}/newlib", "--base-fingerprint", "not-hex!")
  add(2, "library", "init", "{r}/newlib", "--base-fingerprint", "ab")
  add(2, "library", "init", "{r}/afile")
  for target in ("{r}/missing", "{r}/afile", "{r}/adir", "{a}"):
    add(1, "library", "list", target)
    add(1, "library", "show", target, "x")
    add(1, "library", "check", target)
    add(1, "library", "index", target)
  for src in ("{r}/missing", "{r}/afile", "{r}/adir", "{r}/bitflip", "{lib}"):
    add(1, "library", "add", "{lib}", src)
  add(2, "library", "add", "{lib}", "{a}", "--name", "x", "{b}")
  add(2, "library", "nosuch", "{lib}")
  add(2, "library")
  add(1, "library", "report-overlaps", "{lib}")
  add(1, "library", "report-overlaps", "{lib}", "--eval-suite", "{r}/missing.json")
  add(1, "library", "report-overlaps", "{lib}", "--eval-suite", "{r}/notjson.json")
  # retrieve
  q = ["retrieve", "--library", "{lib}", "--queries", "{r}/queries.jsonl", "--embedder", "bm25"]
  for flag, v in (("--num-queries", "0"), ("--num-queries", "-5"), ("--votes-per-query", "0"),
                  ("--abstain-threshold", "nan"), ("--abstain-threshold", "2"),
                  ("--abstain-threshold", "-0.5"), ("--abstain-threshold", "inf"),
                  ("--max-seq-length", "0"), ("--output", "{r}/adir"),
                  ("--output", "{r}/missing/out.json"), ("--output", "{r}/queries.jsonl")):
    add(2, *q, flag, v)
  add(1, "retrieve", "--library", "{lib}", "--queries", "{r}/adir")
  add(1, "retrieve", "--library", "{lib}", "--queries", "{r}/missing.jsonl")
  add(2, "retrieve", "--library", "{lib}", "--queries", "{r}/empty.jsonl", "--embedder", "bm25")
  add(1, "retrieve", "--library", "{r}/missing", "--queries", "{r}/queries.jsonl")
  add(1, "retrieve", "--library", "{r}/afile", "--queries", "{r}/queries.jsonl")
  add(2, *q, "--num-queries", "x")
  add(2, *q, "--embedder", "nosuch")
  # eval (flags checked before any model or data is loaded)
  e = ["eval", "--tasks", "demo_heldout", "--output_dir", "{r}/evalout", "--model_config", "tiny"]
  for flag, v in (("--max_examples", "0"), ("--max_examples", "-1"), ("--batch_size", "0"),
                  ("--experts_per_pass", "0"), ("--max_input_length", "-1"),
                  ("--generation_max_length", "0"), ("--num_queries", "0"),
                  ("--votes_per_query", "-1"), ("--abstain_threshold", "nan"),
                  ("--abstain_threshold", "2"), ("--merge_lam", "nan"), ("--merge_lam", "inf"),
                  ("--merge_top_k", "0"), ("--merge_density", "nan"), ("--merge_drop", "1.5"),
                  ("--bootstrap_samples", "-1"), ("--num_partitions", "0")):
    add(2, *e, flag, v)
  add(2, "eval", "--tasks", "demo_heldout", "--output_dir", "{r}/afile", "--model_config", "tiny")
  add(1, *e, "--experts", "{r}/missing")
  add(1, *e, "--experts", "{r}/afile")
  add(1, *e, "--vocabulary_path", "{r}/missing.model")
  add(1, *e, "--expert_list", "{r}/adir")
  add(1, *e, "--library", "{r}/missing")
  add(2, "eval", "--tasks", "demo_heldout", "--output_dir", "{a}", "--experts", "{a}")
  add(2, *e, "--scoring", "nosuch")
  add(2, "eval", "--output_dir", "{r}/evalout")
  # infer
  i = ["infer", "--inputs", "x", "--model_config", "tiny"]
  for flag, v in (("--max_input_length", "-1"), ("--max_decode_length", "0"),
                  ("--batch_size", "0"), ("--num_partitions", "0"), ("--vocab_size", "0"),
                  ("--output_file", "{r}/adir"), ("--output_file", "{r}/missing/o.jsonl")):
    add(2, *i, flag, v)
  add(1, *i, "--vocabulary_path", "{r}/missing.model")
  add(1, *i, "--input_file", "{r}/missing.jsonl")
  add(1, *i, "--input_file", "{r}/adir")
  add(1, *i, "--expert", "{r}/missing")
  add(1, *i, "--expert", "{r}/afile")
  add(2, *i, "--mode", "nosuch")
  # import
  for kind in ("paper-adapter", "peft-lora"):
    add(1, "import", kind, "{r}/missing", "--output", "{r}/imp", "--base-fingerprint", BASE)
    add(1, "import", kind, "{r}/adir", "--output", "{r}/imp", "--base-fingerprint", BASE)
  add(1, "import", "paper-adapter", "{r}/notpickle.pt", "--output", "{r}/imp",
      "--base-fingerprint", BASE)
  add(1, "import", "paper-adapter", "{r}/afile", "--output", "{r}/imp", "--base-fingerprint", BASE)
  add(2, "import", "nosuch", "{r}/afile", "--output", "{r}/imp")
  add(2, "import", "paper-adapter", "{r}/afile")
  # the console script itself
  add(2, "nosuch")
  add(2, "merge", "--nosuch-flag")
  return cases


CASES = _cases()


def test_the_table_is_large_enough():
  assert len(CASES) >= 150, len(CASES)


@pytest.mark.parametrize("want_rc,argv", CASES, ids=[" ".join(a)[:90] for _, a in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, monkeypatch, want_rc, argv):
  monkeypatch.delenv("EXPERT_T5X_TRACEBACK", raising=False)
  before = _snapshot(world)
  rc, _, err = _run(_fmt(argv, world), capsys)
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err, err
  assert rc == want_rc, err
  if lines and lines[0].startswith("usage:"):  # argparse: usage + one error line
    lines = lines[-1:]
  assert len(lines) == 1, err
  assert _snapshot(world) == before


# ------------------------------------------------------------------------------ corruption matrix

def _damage(path, how):
  data = path.read_bytes()
  if how == "truncate":
    path.write_bytes(data[:len(data) // 2])
  elif how == "bitflip":
    b = bytearray(data)
    b[len(b) * 3 // 4] ^= 0x04
    path.write_bytes(bytes(b))
  elif how == "delete":
    path.unlink()
  elif how == "wrong_type":
    if path.suffix == ".safetensors":
      header = b'[1, 2]'
      path.write_bytes(len(header).to_bytes(8, "little") + header)
    else:
      path.write_text("[1, 2]\n")


KINDS = {  # file kind -> path inside the library copy (the first expert, id cosmos_qa_p)
    "expert.json": "experts/cosmos_qa_p/expert.json",
    "params.safetensors": "experts/cosmos_qa_p/params.safetensors",
    "keys.jsonl": "experts/cosmos_qa_p/keys.jsonl",
    "entry": "entries/cosmos_qa_p.json",
    "library.json": "library.json",
}
READERS = {
    "show --verify": ["library", "show", "{lib}", "cosmos_qa_p", "--verify"],
    "check": ["library", "check", "{lib}"],
    "merge": ["merge", "--library", "{lib}", "--ids", "cosmos_qa_p", "imdb_p", "--output", "{r}/m"],
    "strict list": ["library", "--strict", "list", "{lib}"],
}
MATRIX = [(k, d, c) for k in KINDS for d in ("truncate", "bitflip", "delete", "wrong_type")
          for c in READERS]


@pytest.mark.parametrize("kind,how,command", MATRIX, ids=["-".join(x) for x in MATRIX])
def test_corruption_matrix(world, tmp_path, capsys, kind, how, command):
  shutil.copytree(world / "lib", tmp_path / "lib")
  target = tmp_path / "lib" / KINDS[kind]
  _damage(target, how)
  if command == "strict list" and kind not in ("entry", "library.json"):
    pytest.skip("list reads entries only")
  if command == "merge" and kind == "keys.jsonl":
    pytest.skip("merge does not read retrieval keys")
  if command == "strict list" and kind == "entry" and how == "delete":
    pytest.skip("without its entry file the expert is simply not in the library")
  argv = [a.format(lib=tmp_path / "lib", r=tmp_path) for a in READERS[command]]
  before = _snapshot(tmp_path)
  rc, out, err = _run(argv, capsys)
  assert "Traceback" not in err, err
  if how == "bitflip" and kind in ("entry", "library.json") and rc == 0:
    # Only acceptable when the flipped bit left well-formed JSON (a letter inside a string).
    json.loads(target.read_text())
    return
  assert rc == 1, err
  if command == "check":  # every problem on stdout, with its fix
    assert "fix:" in out or len(err.strip().splitlines()) == 1, out + err
    assert "cosmos_qa_p" in out or "library.json" in err, out + err
  else:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "cosmos_qa_p" in lines[0] or "library.json" in lines[0], err
  after = _snapshot(tmp_path)
  moved = {k for k in set(before) ^ set(after)}
  assert not moved and after == before, moved


def test_damaged_entry_is_skipped_with_a_warning_naming_it(world, tmp_path, capsys):
  shutil.copytree(world / "lib", tmp_path / "lib")
  (tmp_path / "lib" / KINDS["entry"]).write_text('{"id": "cosmos_qa_p"}')
  rc, out, err = _run(["library", "list", str(tmp_path / "lib")], capsys)
  assert rc == 0 and "imdb_p" in out and "cosmos_qa_p" not in out
  assert "entries/cosmos_qa_p.json" in err and "Traceback" not in err
  rc, _, err = _run(["library", "check", str(tmp_path / "lib")], capsys)
  assert rc == 1 and "entries/cosmos_qa_p.json" in err + _ and "fix:" in err + _


# ------------------------------------------------------------------------------ embedding caches

class _WordEmbedder:
  """A transparent dense embedder (hashed bag of words, L2-normalised) counting its embed calls."""
  kind = "dense"
  identity = "words-test-v1"

  def __init__(self):
    self.calls = 0

  def embed(self, texts):
    self.calls += 1
    out = np.zeros((len(texts), 16), np.float32)
    for i, text in enumerate(texts):
      for word in text.split():
        out[i, sum(word.encode()) % 16] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _rewrite_cache(path, how):
  """Cache files that read fine as npz but hold the wrong vectors, digest, shape or dtype."""
  from expert_t5x import retrieval  # pylint: disable=g-import-not-at-top
  digest_of = retrieval._embedding_digest  # pylint: disable=protected-access
  with np.load(path) as data:
    block, digest = data["embeddings"], data["digest"]
  if how == "bitflip_in_vectors":  # one bit of one vector, the npz and npy headers intact
    raw = bytearray(path.read_bytes())
    at = bytes(raw).index(block.tobytes()) + block.nbytes // 2 + 3
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    return
  if how == "garbled_vectors":  # well-formed npz, the stored digest of other vectors
    block = block * np.float32(1.75)
  elif how == "foreign_digest":  # intact vectors whose digest names another embedder
    digest = np.array(digest_of("other", path.name, block))
  else:
    block = {"wrong_rows": block[:1], "float64": block.astype(np.float64)}[how]
    digest = np.array(digest_of("words-test-v1", path.name, block))
  with open(path, "wb") as f:
    np.savez(f, embeddings=block, digest=digest)


CACHE_DAMAGE = ("truncate", "bitflip", "delete", "wrong_type", "bitflip_in_vectors",
                "garbled_vectors", "foreign_digest", "wrong_rows", "float64", "npy_format")


@pytest.mark.parametrize("how", CACHE_DAMAGE)
def test_a_damaged_embedding_cache_is_recomputed_never_used(world, tmp_path, capsys, how):
  from expert_t5x import retrieval  # pylint: disable=g-import-not-at-top
  queries = [{"inputs": f"imdb input {i}", "answer_choices": ["a", "b"], "dataset": "rte"}
             for i in range(3)]
  shutil.copytree(world / "lib", tmp_path / "clean")
  clean = retrieval.Retriever(library_lib.Library(tmp_path / "clean"), _WordEmbedder())
  want = clean.retrieve(queries, guard="seen")
  shutil.copytree(world / "lib", tmp_path / "lib")
  lib = library_lib.Library(tmp_path / "lib")
  retrieval.Retriever(lib, _WordEmbedder())  # writes the cache
  files = sorted((tmp_path / "lib" / "embeddings" / "words-test-v1").iterdir())
  assert [f.suffix for f in files] == [".npz", ".npz"]
  target = files[0]
  if how == "npy_format":
    np.save(target.with_suffix(".tmp.npy"), np.load(target)["embeddings"])
    os.replace(target.with_suffix(".tmp.npy"), target)
  elif how in CACHE_DAMAGE[:4]:
    _damage(target, how)
  else:
    _rewrite_cache(target, how)
  capsys.readouterr()
  embedder = _WordEmbedder()
  again = retrieval.Retriever(lib, embedder)
  err = capsys.readouterr().err
  assert embedder.calls == 1  # only the damaged expert's keys were embedded again
  np.testing.assert_array_equal(again.key_embeddings, clean.key_embeddings)
  assert again.retrieve(queries, guard="seen") == want
  lines = err.strip().splitlines()
  if how == "delete":
    assert lines == [], err
  else:
    assert len(lines) == 1 and str(target) in lines[0] and "recomputing" in lines[0], err
  # The recomputed cache is intact: the next reader uses it as it is, silently.
  embedder = _WordEmbedder()
  np.testing.assert_array_equal(retrieval.Retriever(lib, embedder).key_embeddings,
                                clean.key_embeddings)
  assert embedder.calls == 0 and capsys.readouterr().err == ""


def test_an_unwritable_embedding_cache_is_skipped_with_one_warning(world, tmp_path, capsys):
  from expert_t5x import retrieval  # pylint: disable=g-import-not-at-top
  shutil.copytree(world / "lib", tmp_path / "clean")
  want = retrieval.Retriever(library_lib.Library(tmp_path / "clean"), _WordEmbedder())
  shutil.copytree(world / "lib", tmp_path / "lib")
  blocker = tmp_path / "lib" / "embeddings" / "words-test-v1"
  blocker.write_text("not a folder")  # where the cache folder goes (as a read-only library would)
  capsys.readouterr()
  got = retrieval.Retriever(library_lib.Library(tmp_path / "lib"), _WordEmbedder())
  np.testing.assert_array_equal(got.key_embeddings, want.key_embeddings)
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "not written" in lines[0] and str(blocker) in lines[0], lines
  assert blocker.read_text() == "not a folder"


def test_embedding_cache_modes_follow_the_library(world, tmp_path):
  from expert_t5x import retrieval  # pylint: disable=g-import-not-at-top
  old = os.umask(0o022)
  try:
    for shared in (False, True):
      lib = library_lib.Library.init(tmp_path / f"lib{shared}", group_shared=shared)
      lib.add(world / "a")
      retrieval.Retriever(lib, _WordEmbedder())
      folder = tmp_path / f"lib{shared}" / "embeddings" / "words-test-v1"
      dir_mode, file_mode = (0o2770, 0o660) if shared else (0o755, 0o644)
      assert folder.stat().st_mode & dir_mode == dir_mode, oct(folder.stat().st_mode)
      for f in folder.iterdir():
        assert f.stat().st_mode & file_mode == file_mode, (f, oct(f.stat().st_mode))
  finally:
    os.umask(old)


# ------------------------------------------------------------------------------ matrix.npz

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """An eval output directory of three experts on three prompts: results.json and matrix.npz."""
  from expert_t5x import results  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("evaluated")
  tasks = [{"name": f"p{j}", "dataset": f"d{j % 2}"} for j in range(3)]
  (root / results.RESULTS_FILE).write_text(json.dumps({
      "schema_version": results.SCHEMA_VERSION, "kind": results.RESULTS_KIND, "protocol": {},
      "model": {}, "experts": [], "tasks": tasks, "environment": {}, "exclusions": {},
      "entries": []}))
  acc = np.array([[50.0, 20.0, np.nan], [10.0, 70.0, 30.0], [60.0, 0.0, 100.0]])
  results.write_matrix(str(root / results.MATRIX_FILE), acc, ["e0", "e1", "e2"],
                       [t["name"] for t in tasks])
  return root


def _write_npz(path, **arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)


MATRIX_CONTENT = {  # well-formed npz files that are not an evaluation's matrix
    "acc_shape": dict(acc=np.zeros((2, 3)), expert_ids=np.array(["a", "b", "c"]),
                      prompt_ids=np.array(["p0", "p1", "p2"])),
    "acc_strings": dict(acc=np.array([["x"] * 3] * 3), expert_ids=np.array(["a", "b", "c"]),
                        prompt_ids=np.array(["p0", "p1", "p2"])),
    "acc_not_percent": dict(acc=np.full((3, 3), 250.0), expert_ids=np.array(["a", "b", "c"]),
                            prompt_ids=np.array(["p0", "p1", "p2"])),
    "acc_1d": dict(acc=np.zeros(3), expert_ids=np.array(["a", "b", "c"]),
                   prompt_ids=np.array(["p0"])),
    "ids_numbers": dict(acc=np.zeros((3, 3)), expert_ids=np.arange(3),
                        prompt_ids=np.array(["p0", "p1", "p2"])),
    "no_prompt_ids": dict(acc=np.zeros((3, 3)), expert_ids=np.array(["a", "b", "c"])),
    "pickled": dict(acc=np.array([{"a": 1}], dtype=object), expert_ids=np.array(["a"]),
                    prompt_ids=np.array(["p0"])),
}
MATRIX_DAMAGE = (["truncate", "wrong_type", "npy_format", "empty"] + list(MATRIX_CONTENT)
                 + [f"bitflip@{k}" for k in range(10)])


@pytest.mark.parametrize("how", MATRIX_DAMAGE)
def test_a_damaged_matrix_is_one_line_or_the_clean_result(evaluated, tmp_path, capsys, monkeypatch,
                                                         how):
  from expert_t5x import results  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("EXPERT_T5X_TRACEBACK", raising=False)
  shutil.copytree(evaluated, tmp_path / "eval")
  rc, want, _ = _run(["eval", "--oracle", str(tmp_path / "eval")], capsys)
  assert rc == 0
  target = tmp_path / "eval" / results.MATRIX_FILE
  if how.startswith("bitflip@"):  # ten places spread over the file: arrays, headers, directory
    raw = bytearray(target.read_bytes())
    raw[(2 * int(how[8:]) + 1) * len(raw) // 20] ^= 0x04
    target.write_bytes(bytes(raw))
  elif how == "npy_format":
    np.save(tmp_path / "acc.npy", np.zeros((3, 3)))
    os.replace(tmp_path / "acc.npy", target)
  elif how == "empty":
    target.write_bytes(b"")
  elif how in MATRIX_CONTENT:
    _write_npz(target, **MATRIX_CONTENT[how])
  else:
    _damage(target, how)
  before = _snapshot(tmp_path)
  rc, out, err = _run(["eval", "--oracle", str(tmp_path / "eval")], capsys)
  assert "Traceback" not in err, err
  assert _snapshot(tmp_path) == before
  if rc == 0 and how.startswith("bitflip@"):  # a bit the reader never uses (e.g. a zip date)
    assert out == want
    return
  lines = err.strip().splitlines()
  assert rc == 1 and len(lines) == 1 and str(target) in lines[0] and "rerun" in lines[0], err


@pytest.mark.parametrize("how", ["truncate", "wrong_type", "delete"])
def test_a_damaged_results_file_beside_the_matrix_is_one_line(evaluated, tmp_path, capsys,
                                                             monkeypatch, how):
  from expert_t5x import results  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("EXPERT_T5X_TRACEBACK", raising=False)
  shutil.copytree(evaluated, tmp_path / "eval")
  target = tmp_path / "eval" / results.RESULTS_FILE
  _damage(target, how)
  rc, _, err = _run(["eval", "--oracle", str(tmp_path / "eval")], capsys)
  lines = err.strip().splitlines()
  assert "Traceback" not in err and len(lines) == 1 and str(target) in lines[0], err
  assert rc == (2 if how == "delete" else 1), err  # a missing file: the --oracle path is wrong


# ------------------------------------------------------------------------------ path traversal

@pytest.mark.parametrize("path", ["../victim", "experts/../../victim", "experts/../entries",
                                  "experts/cosmos_qa_p/../../../victim", "."])
@pytest.mark.parametrize("command", ["remove", "show --verify", "merge"])
def test_an_entry_path_leaving_the_library_is_never_read_or_deleted(world, tmp_path, capsys, path,
                                                                    command):
  shutil.copytree(world / "lib", tmp_path / "lib")
  victim = tmp_path / "victim"
  shutil.copytree(world / "a", victim)  # a valid expert outside the library
  entry_file = tmp_path / "lib" / KINDS["entry"]
  entry = json.loads(entry_file.read_text())
  entry_file.write_text(json.dumps(dict(entry, path=path)))
  argv = {"remove": ["library", "remove", "{lib}", "cosmos_qa_p"],
          "show --verify": ["library", "show", "{lib}", "cosmos_qa_p", "--verify"],
          "merge": READERS["merge"]}[command]
  before = _snapshot(tmp_path)
  rc, _, err = _run([a.format(lib=tmp_path / "lib", r=tmp_path) for a in argv], capsys)
  assert rc == 1 and "leaves experts/" in err and "Traceback" not in err, err
  assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ killed writers

def test_temp_folders_of_killed_writers_are_cleaned_on_the_next_run(world, tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  dead = 2 ** 22 + 12345  # above the default pid_max: no such process
  host = socket.gethostname()
  out = tmp_path / "export" / "expert"
  out.parent.mkdir()
  leftover = out.parent / f".expert.tmp-{host}-{dead}-abc"
  leftover.mkdir()
  (leftover / "params.safetensors").write_bytes(b"partial")
  live = out.parent / f".expert.tmp-{host}-{os.getpid()}-xyz"  # a running writer's: kept
  live.mkdir()
  params, meta = expert_format.load_expert(world / "a")
  expert_format.save_expert(out, params, meta)
  assert not leftover.exists() and live.exists()
  shutil.copytree(world / "lib", tmp_path / "lib")
  lib = library_lib.Library(tmp_path / "lib")
  lib.remove("cosmos_qa_p")
  stale = tmp_path / "lib" / "experts" / f".tmp-cosmos_qa_p-{host}-{dead}-q"
  stale.mkdir()
  lib.add(world / "a")
  assert not stale.exists()


# ------------------------------------------------------------------------------ writers + reader

def _add_one(args):
  root, src, name = args
  try:
    library_lib.Library(root).add(src, name=name)
    return name
  except library_lib.LibraryError:
    return None


def test_concurrent_writers_and_a_reader(world, tmp_path):
  # Six writers add distinct experts while a reader lists and verifies: the reader only ever
  # sees complete entries whose experts verify, and every add lands.
  lib = library_lib.Library.init(tmp_path / "lib")
  srcs = [_make_expert(tmp_path / f"e{i}", 10 + i, f"ds{i}") for i in range(6)]
  ctx = multiprocessing.get_context("fork")
  with ctx.Pool(3) as pool:
    pending = pool.map_async(_add_one, [(lib.root, s, f"n{i}") for i, s in enumerate(srcs)])
    seen = 0
    while not pending.ready():
      reader = library_lib.Library(lib.root, strict=True)
      for e in reader.entries():
        reader.verify(e["id"])
      seen = max(seen, len(reader.entries()))
    added = pending.get(timeout=120)
  assert sorted(added) == [f"n{i}" for i in range(6)]
  assert library_lib.Library(lib.root).check() == []
  assert len(library_lib.Library(lib.root).entries()) == 6 >= seen


# ------------------------------------------------------------------------------ permissions

@pytest.mark.parametrize("shared", [False, True])
def test_library_modes_follow_the_umask_or_the_group_shared_option(world, tmp_path, shared):
  old = os.umask(0o022)
  try:
    lib = library_lib.Library.init(tmp_path / "lib", group_shared=shared)
    lib.add(world / "a")
  finally:
    os.umask(old)
  file_mode, dir_mode = (0o660, 0o2770) if shared else (0o644, 0o755)
  for folder, dirs, files in os.walk(lib.root):
    for d in dirs:
      got = os.stat(os.path.join(folder, d)).st_mode & 0o7777
      assert got & dir_mode == dir_mode, (d, oct(got))
    for f in files:
      got = os.stat(os.path.join(folder, f)).st_mode & 0o777
      assert got & file_mode == file_mode, (f, oct(got))


# ------------------------------------------------------------------------------ training settings

@pytest.mark.parametrize("field,value", [
    ("total_steps", 0), ("total_steps", -5), ("total_steps", 2.5), ("total_steps", [3, 0]),
    ("batch_size", 0), ("batch_size", -4), ("period", 0), ("keep", 0), ("max_examples", 0),
    ("lengths", {"inputs": 0, "targets": 8}), ("model_dir", ""), ("model_dir", None)])
def test_training_settings_out_of_range_are_usage_errors(tmp_path, field, value):
  from expert_t5x import train  # pylint: disable=g-import-not-at-top
  from expert_t5x import checkpoints  # pylint: disable=g-import-not-at-top
  from expert_t5x import train_data  # pylint: disable=g-import-not-at-top
  from expert_t5x import validation  # pylint: disable=g-import-not-at-top
  data = train_data.DatasetConfig(
      mixture_or_task_name="t", task_feature_lengths=value if field == "lengths" else
      {"inputs": 8, "targets": 8}, batch_size=value if field == "batch_size" else 2,
      max_examples=value if field == "max_examples" else None)
  save = checkpoints.SaveCheckpointConfig(period=value if field == "period" else None,
                                                keep=value if field == "keep" else None)
  model_dir = value if field == "model_dir" else str(tmp_path / "m")
  with pytest.raises(validation.UsageError) as info:
    train._validate_settings(data, value if field == "total_steps" else 3, save, model_dir)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("how", ["truncate", "bitflip", "delete", "nan"])
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys, how):
  from expert_t5x import checkpoints  # pylint: disable=g-import-not-at-top
  manager = checkpoints.CheckpointManager(tmp_path, async_save=False)
  trees = {s: {"w": np.full((64,), float(s), np.float32)} for s in (1, 2, 3)}
  if how == "nan":
    trees[3]["w"][5] = np.nan
  for step, tree in trees.items():
    manager.save(step, tree)
  manager.wait()
  if how != "nan":
    files = sorted(p for p in (tmp_path / "checkpoint_3").rglob("*") if p.is_file()
                   and p.stat().st_size > 100 and "d" in p.parts[-2:-1])
    files = files or sorted(p for p in (tmp_path / "checkpoint_3").rglob("*")
                            if p.is_file() and p.stat().st_size > 100)
    _damage(files[0], how)
  abstract = {"w": np.zeros((64,), np.float32)}
  import jax  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
  step, tree = manager.restore_newest_intact(abstract)
  err = capsys.readouterr().err
  assert step == 2 and np.all(np.asarray(tree["w"]) == 2.0)
  assert "checkpoint_3" in err and "damaged" in err and "checkpoint_2" in err
  assert (tmp_path / "damaged_checkpoints" / "checkpoint_3").is_dir()
  assert manager.latest_step() == 2
  manager.close()


@pytest.mark.parametrize("how", ["truncate", "bitflip", "wrong_type", "no_fingerprint"])
def test_a_damaged_base_json_refuses_to_resume_in_one_line(tmp_path, how):
  from expert_t5x import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.write_base_json(str(tmp_path), "/base", "f" * 64, "tiny")
  checkpoints.check_base_json(str(tmp_path), "f" * 64, "/base")  # intact: resumes
  target = tmp_path / checkpoints.BASE_JSON
  if how == "no_fingerprint":
    target.write_text('{"path": "/base", "fingerprint": 7}')
  else:
    _damage(target, how)
  with pytest.raises(ValueError) as info:
    checkpoints.check_base_json(str(tmp_path), "f" * 64, "/base")
  message = str(info.value)
  assert "\n" not in message, message
  if how == "bitflip":  # the flip lands in the fingerprint: refused as a run on another base
    assert "holds checkpoints trained on base" in message, message
  else:
    assert str(target) in message and "delete it" in message, message


# ------------------------------------------------- one declaration: CLI, gin and Python agree

def _python_eval(world, dataset=None, experts=None, routing=None, partitioner=None):
  """`eval.evaluate` from Python with one bad config (the others valid); returns its error."""
  from expert_t5x import eval as eval_entry  # pylint: disable=g-import-not-at-top
  from expert_t5x import validation  # pylint: disable=g-import-not-at-top
  r, lib = str(world), str(world / "lib")
  with pytest.raises((validation.UsageError, validation.DataError)) as info:
    eval_entry.evaluate(
        base=eval_entry.BaseConfig(model_config="tiny", random_init_seed=0),
        dataset_cfg=dataset(r, lib) if dataset else eval_entry.DatasetConfig("demo_heldout"),
        output_cfg=eval_entry.OutputConfig(f"{r}/evalout"),
        experts=experts(r, lib) if experts else eval_entry.ExpertsConfig(),
        routing=routing(r, lib) if routing else None,
        partitioner=partitioner(r, lib) if partitioner else None)
  return info.value


def _same_value_cases():
  from expert_t5x import eval as eval_entry  # pylint: disable=g-import-not-at-top
  from expert_t5x import partitioning  # pylint: disable=g-import-not-at-top
  from expert_t5x import routed_evaluation as roe  # pylint: disable=g-import-not-at-top
  return [  # (rc, CLI flags, gin file, gin bindings, the Python API's bad config)
      (2, ["--batch_size", "0"], "eval", ["BATCH_SIZE=0"],
       dict(dataset=lambda r, lib: eval_entry.DatasetConfig("demo_heldout", batch_size=0))),
      (2, ["--max_examples", "-1"], "eval", ["MAX_EXAMPLES=-1"],
       dict(dataset=lambda r, lib: eval_entry.DatasetConfig("demo_heldout", max_examples=-1))),
      (2, ["--num_partitions", "0"], "eval", ["NUM_PARTITIONS=0"],
       dict(partitioner=lambda r, lib: partitioning.PjitPartitioner(num_partitions=0))),
      (1, ["--experts", "{r}/missing"], "eval", ["EXPERT_PATHS=['{r}/missing']"],
       dict(experts=lambda r, lib: eval_entry.ExpertsConfig(expert_paths=[f"{r}/missing"]))),
      (2, ["--experts", "{a}", "--output_dir", "{a}"], "eval",
       ["EXPERT_PATHS=['{a}']", "EVAL_OUTPUT_DIR='{a}'"], None),
      (2, ["--library", "{lib}", "--roe", "--num_queries", "0"], "eval_roe",
       ["LIBRARY_PATH='{lib}'", "NUM_QUERIES=0"],
       dict(routing=lambda r, lib: roe.RoEConfig(library=lib, num_queries=0))),
      (2, ["--library", "{lib}", "--roe", "--abstain_threshold", "2"], "eval_roe",
       ["LIBRARY_PATH='{lib}'", "ABSTAIN_THRESHOLD=2.0"],
       dict(routing=lambda r, lib: roe.RoEConfig(library=lib, abstain_threshold=2.0))),
      (1, ["--library", "{r}/missing", "--roe"], "eval_roe", ["LIBRARY_PATH='{r}/missing'"],
       dict(routing=lambda r, lib: roe.RoEConfig(library=f"{r}/missing"))),
  ]


@pytest.mark.tf
@pytest.mark.parametrize("case", range(8))
def test_the_same_bad_value_is_the_same_line_through_cli_gin_and_python(world, capsys,
                                                                        monkeypatch, case):
  # The checks are declared once, on the configs: each way in reports the same line.
  import gin  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("EXPERT_T5X_TRACEBACK", raising=False)
  rc, flags, gin_file, bindings, python = _same_value_cases()[case]
  before = _snapshot(world)
  e = ["eval", "--tasks", "demo_heldout", "--output_dir", "{r}/evalout", "--model_config", "tiny"]
  got_rc, _, err = _run(_fmt(e + flags, world), capsys)
  assert got_rc == rc and len(err.strip().splitlines()) == 1, err
  cli_line = err.strip().split(": ", 1)[1]
  gin_argv = ["eval", f"--gin_file=runs/{gin_file}.gin", "--gin.CHECKPOINT_PATH=None",
              "--gin.MODEL_CONFIG='tiny'", "--gin.MIXTURE_OR_TASK_NAME='demo_heldout'",
              "--gin.EVAL_OUTPUT_DIR='{r}/evalout'"] + [f"--gin.{b}" for b in bindings]
  # gin's bindings live in the process: clear the last run's (absl's flags are reset by the CLI).
  gin.clear_config()
  try:
    got_rc, _, err = _run(_fmt(gin_argv, world), capsys)
  finally:
    gin.clear_config()
  lines = [line for line in err.splitlines() if line.startswith("expert_t5x.eval: ")]
  assert got_rc == rc and "Traceback" not in err and len(lines) == 1, err
  assert lines[0].split(": ", 1)[1] == cli_line
  if python:  # (the Python API's output can't equal an expert without an ExpertsConfig)
    assert str(_python_eval(world, **python)) == cli_line
  assert _snapshot(world) == before


def test_configs_refuse_bad_values_on_construction():
  from expert_t5x import eval as eval_entry  # pylint: disable=g-import-not-at-top
  from expert_t5x import validation  # pylint: disable=g-import-not-at-top
  for make in (lambda: eval_entry.DatasetConfig("demo_heldout", batch_size=0),
               lambda: eval_entry.DatasetConfig(""),
               lambda: eval_entry.DatasetConfig("t", task_feature_lengths={"inputs": 0}),
               lambda: eval_entry.OutputConfig("x", bootstrap_samples=-1),
               lambda: eval_entry.ExpertsConfig(experts_per_pass=0),
               lambda: eval_entry.BaseConfig(dtype="float16")):
    with pytest.raises(validation.UsageError) as info:
      make()
    assert "\n" not in str(info.value) and " / " in str(info.value), info.value
