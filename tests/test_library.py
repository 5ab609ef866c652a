"""Tests for the expert library: entries, concurrency, crashes, damaged files, guard and CLI."""

import json
import multiprocessing
import os

import numpy as np
import pytest

from expert_t5x import expert_format
from expert_t5x import library as library_lib

BASE = "b" * 64


def make_expert(path, seed=0, dataset="cosmos_qa", subset=None, prompt="no_prompt_text", base=BASE,
                num_keys=3):
  """Writes a tiny adapter expert with keys; returns its directory."""
  rng = np.random.default_rng(seed)
  task = "_".join(x for x in (dataset, subset, prompt) if x)
  params = {"encoder": {"layers_0": {"mlp_adapter": {"wi": {"kernel": rng.normal(size=(4, 2))}}}}}
  meta = expert_format.build_metadata(
      "adapter", {"kind": "adapter", "reduction_factor": 2, "init_seed": 0}, base_fingerprint=base,
      base_config_name="tiny",
      provenance=[{"task": task, "dataset": dataset, "subset": subset, "prompt": prompt,
                   "role": "train"}])
  keys = [{
      "inputs": f"{dataset} input {i}", "targets": "t", "answer_choices": ["a", "b"],
      "example_id": i, "task": task, "dataset": dataset, "subset": subset, "prompt": prompt
  } for i in range(num_keys)]
  expert_format.save_expert(path, params, meta, keys)
  return str(path)


def test_init_add_list_show_remove(tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib")
  a = lib.add(make_expert(tmp_path / "a", 0, "cosmos_qa"))
  b = lib.add(make_expert(tmp_path / "b", 1, "super_glue", "rte", "GPT-3 style"))
  assert [e["id"] for e in lib.entries()] == sorted([a["id"], b["id"]])
  assert b["id"] == "super_glue_rte_GPT-3_style"  # spaces are made file-safe
  assert lib.get(a["id"])["num_keys"] == 3
  assert lib.keys(a["id"])[1]["inputs"] == "cosmos_qa input 1"
  assert lib.manifest()["num_experts"] == 2
  # The copied expert is byte-identical in content to the source.
  _, meta = expert_format.load_expert(lib.expert_dir(a["id"]))
  assert meta["content_hash"] == a["content_hash"]
  lib.remove(a["id"])
  assert lib.ids() == [b["id"]]
  assert not os.path.exists(tmp_path / "lib" / "experts" / a["id"])
  with pytest.raises(library_lib.LibraryError, match="No expert"):
    lib.get(a["id"])


def test_adding_never_changes_existing_experts(tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib")
  a = lib.add(make_expert(tmp_path / "a", 0, "cosmos_qa"))
  before = {n: open(os.path.join(lib.expert_dir(a["id"]), n), "rb").read()
            for n in os.listdir(lib.expert_dir(a["id"]))}
  entry_before = lib.get(a["id"])
  lib.add(make_expert(tmp_path / "b", 1, "dream"))
  after = {n: open(os.path.join(lib.expert_dir(a["id"]), n), "rb").read()
           for n in os.listdir(lib.expert_dir(a["id"]))}
  assert before == after and lib.get(a["id"]) == entry_before


def test_refuses_other_base_duplicates_and_bad_input(tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib", base_fingerprint=BASE)
  with pytest.raises(library_lib.LibraryError, match="trained on base"):
    lib.add(make_expert(tmp_path / "x", 0, base="c" * 64))
  lib.add(make_expert(tmp_path / "a", 0))
  with pytest.raises(library_lib.LibraryError, match="already has an expert"):
    lib.add(make_expert(tmp_path / "a2", 5))  # same provenance -> same id
  with pytest.raises(library_lib.LibraryError, match="identical"):
    lib.add(tmp_path / "a", name="copy")
  with pytest.raises(library_lib.LibraryError, match="not an expert directory"):
    lib.add(tmp_path)
  with pytest.raises(library_lib.LibraryError, match="not an expert library"):
    library_lib.Library(tmp_path)


def test_first_expert_pins_base(tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib")
  lib.add(make_expert(tmp_path / "a", 0))
  with pytest.raises(library_lib.LibraryError, match="trained on base"):
    lib.add(make_expert(tmp_path / "b", 1, "dream", base="d" * 64))


def test_corrupted_expert_is_refused_and_library_stays_usable(tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib")
  lib.add(make_expert(tmp_path / "a", 0))
  bad = make_expert(tmp_path / "bad", 1, "dream")
  path = os.path.join(bad, expert_format.PARAMS_FILE)
  data = bytearray(open(path, "rb").read())
  data[-1] ^= 0xFF  # flip bits in the last tensor's bytes
  open(path, "wb").write(bytes(data))
  with pytest.raises(library_lib.LibraryError, match="corrupt"):
    lib.add(bad)
  assert len(lib.entries()) == 1
  # A damaged entry file inside the library is skipped and reported, never fatal.
  open(tmp_path / "lib" / "entries" / "zz.json", "w").write("{not json")
  entries, damaged = lib.entries(with_damaged=True)
  assert len(entries) == 1 and damaged == ["zz.json"]
  assert lib.rebuild_index()["damaged_entries"] == ["zz.json"]
  # Damaging a stored expert is caught by verify.
  stored = os.path.join(lib.expert_dir(entries[0]["id"]), expert_format.PARAMS_FILE)
  data = bytearray(open(stored, "rb").read())
  data[-1] ^= 0xFF
  open(stored, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="corrupt"):
    lib.verify(entries[0]["id"])


def _concurrent_add(root, expert, barrier, name=None):
  def hook(stage):
    if stage == "after_read":
      barrier.wait(timeout=60)  # both writers have read the library before either commits
  library_lib.fault_hook = hook
  library_lib.Library(root).add(expert, name=name)


def test_one_expert_added_twice_at_once_under_two_names_is_kept_once(tmp_path):
  """Both writers pass the duplicate pre-check (the barrier holds them after reading); after
  committing, the later entry withdraws, so the library holds the expert once."""
  root = str(tmp_path / "lib")
  library_lib.Library.init(root)
  expert = make_expert(tmp_path / "e", 0, "ds")
  ctx = multiprocessing.get_context("spawn")
  barrier = ctx.Barrier(2)
  procs = [
      ctx.Process(target=_concurrent_add, args=(root, expert, barrier, name)) for name in ("a", "b")
  ]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert sorted(p.exitcode for p in procs) == [0, 1]
  lib = library_lib.Library(root)
  assert len(lib.ids()) == 1 and lib.rebuild_index()["num_experts"] == 1
  lib.verify(lib.ids()[0])
  assert sorted(os.listdir(os.path.join(root, library_lib.EXPERTS_DIR))) == lib.ids()


def test_two_processes_adding_at_once_lose_nothing(tmp_path):
  root = str(tmp_path / "lib")
  library_lib.Library.init(root)
  experts = [make_expert(tmp_path / f"e{i}", i, f"ds{i}") for i in range(2)]
  ctx = multiprocessing.get_context("spawn")
  barrier = ctx.Barrier(2)
  procs = [ctx.Process(target=_concurrent_add, args=(root, e, barrier)) for e in experts]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert [p.exitcode for p in procs] == [0, 0]
  lib = library_lib.Library(root)
  assert lib.ids() == ["ds0_no_prompt_text", "ds1_no_prompt_text"]
  assert lib.rebuild_index()["num_experts"] == 2


def _crashing_add(root, expert):
  def hook(stage):
    if stage == "before_commit":
      os._exit(3)  # a hard crash between writing the temporary entry and renaming it
  library_lib.fault_hook = hook
  library_lib.Library(root).add(expert)


def test_crash_between_temp_write_and_rename_leaves_library_readable(tmp_path):
  root = str(tmp_path / "lib")
  lib = library_lib.Library.init(root)
  lib.add(make_expert(tmp_path / "a", 0))
  crashed = make_expert(tmp_path / "b", 1, "dream")
  proc = multiprocessing.get_context("spawn").Process(target=_crashing_add, args=(root, crashed))
  proc.start()
  proc.join(120)
  assert proc.exitcode == 3
  assert any(n.startswith(".tmp-") for n in os.listdir(os.path.join(root, "entries")))
  assert lib.ids() == ["cosmos_qa_no_prompt_text"]  # the half-written entry is invisible
  # Adding the same expert again reuses the completed copy; gc removes the temporary file.
  lib.add(crashed)
  assert lib.ids() == ["cosmos_qa_no_prompt_text", "dream_no_prompt_text"]
  lib.rebuild_index(gc=True)
  assert not any(n.startswith(".tmp-") for n in os.listdir(os.path.join(root, "entries")))


def test_guard_modes_and_overlap_report(tmp_path):
  lib = library_lib.Library.init(tmp_path / "lib")
  lib.add(make_expert(tmp_path / "a", 0, "super_glue", "rte", "p1"))
  lib.add(make_expert(tmp_path / "b", 1, "Super-Glue", "CB", "p2"))
  lib.add(make_expert(tmp_path / "c", 2, "cosmos_qa"))
  zs = lib.guard("super_glue/rte", None, "zero_shot")
  assert [x["id"] for x in zs.excluded] == ["super_glue_rte_p1"]
  assert len(zs.allowed) == 2
  # normalised
  assert lib.guard("super_glue", "cb", "zero_shot").excluded[0]["id"] == "Super-Glue_CB_p2"
  assert lib.guard("super_glue", "rte", "seen").excluded == []
  assert lib.guard("super_glue", "rte", "off").to_json()["mode"] == "off"
  with pytest.raises(library_lib.LibraryError, match="Unknown guard mode"):
    lib.guard("x", None, "strict")
  report = lib.report_overlaps([("super_glue", "rte"), ("hellaswag", None)])
  assert report[0]["overlapping"] == ["super_glue_rte_p1"]
  assert report[0]["excluded"] == {"zero_shot": ["super_glue_rte_p1"], "seen": [], "off": []}
  assert report[1]["overlapping"] == []


def test_cli(tmp_path, capsys):
  root = str(tmp_path / "lib")
  assert library_lib.library_main(["init", root, "--base-fingerprint", BASE]) == 0
  assert library_lib.library_main(
      ["add", root, make_expert(tmp_path / "a", 0, "super_glue", "rte", "p")]) == 0
  assert library_lib.library_main(["list", root, "--json"]) == 0
  out = capsys.readouterr().out
  assert json.loads(out[out.index("{"):])["experts"][0]["id"] == "super_glue_rte_p"
  assert library_lib.library_main(["show", root, "super_glue_rte_p", "--verify"]) == 0
  assert '"verified": true' in capsys.readouterr().out
  suite = tmp_path / "suite.json"
  suite.write_text(
      json.dumps([{"eval_dataset": "rte", "hf_dataset": "super_glue", "hf_subset": "rte"}]))
  assert library_lib.library_main(["report-overlaps", root, "--eval-suite", str(suite)]) == 0
  assert "1 overlapping" in capsys.readouterr().out
  assert library_lib.library_main(["show", root, "nope"]) == 1
  assert "No expert 'nope'" in capsys.readouterr().err
  assert library_lib.library_main(["remove", root, "super_glue_rte_p"]) == 0
  assert library_lib.library_main(["index", root]) == 0
  with pytest.raises(SystemExit) as e:
    library_lib.library_main(["--help"])
  assert e.value.code == 0


@pytest.mark.tf
def test_object_store_library_is_single_writer_through_a_working_copy(tmp_path, monkeypatch,
                                                                      capsys):
  """A library on TensorFlow's in-memory file system (ram://: an object store, no flock or atomic
  rename): the CLI says it is single-writer; a reader with its own working copy (another machine)
  sees every expert, downloads keys without weights, verifies content hashes, and sees removals."""
  monkeypatch.setenv("EXPERT_T5X_CACHE", str(tmp_path / "writer"))
  url = f"ram://{tmp_path.name}/lib"
  assert library_lib.library_main(["init", url, "--base-fingerprint", BASE]) == 0
  assert "single-writer" in capsys.readouterr().err
  assert library_lib.library_main(
      ["add", url, make_expert(tmp_path / "a", 0, "super_glue", "rte", "p")]) == 0
  writer = library_lib.Library(url)
  writer.add(make_expert(tmp_path / "b", 1, "dream"))
  with pytest.raises(library_lib.LibraryError, match="without --no-copy"):
    writer.add(make_expert(tmp_path / "c", 2, "quail"), copy=False)
  monkeypatch.setenv("EXPERT_T5X_CACHE", str(tmp_path / "reader"))
  reader = library_lib.Library(url)
  ids = reader.ids()
  assert ids == writer.ids() == ["dream_no_prompt_text", "super_glue_rte_p"]
  assert reader.root != writer.root and reader.manifest()["num_experts"] == 2
  assert reader.keys(ids[0]) == writer.keys(ids[0]) and len(reader.keys(ids[0])) == 3
  weights = os.path.join(reader.root, library_lib.EXPERTS_DIR, ids[0], expert_format.PARAMS_FILE)
  assert not os.path.exists(weights)  # keys only, so far
  reader.verify(ids[0])  # downloads the expert and recomputes its content hash
  assert os.path.isfile(weights)
  reader.remove(ids[0])
  monkeypatch.setenv("EXPERT_T5X_CACHE", str(tmp_path / "writer"))
  writer = library_lib.Library(url)
  assert writer.ids() == ["super_glue_rte_p"]  # the writer's copy follows
  # Removed and re-added under the same id with other weights: a reader's older copy is refreshed.
  old_hash = writer.get("super_glue_rte_p")["content_hash"]
  writer.remove("super_glue_rte_p")
  writer.add(make_expert(tmp_path / "a2", 7, "super_glue", "rte", "p"))
  monkeypatch.setenv("EXPERT_T5X_CACHE", str(tmp_path / "reader"))
  reader = library_lib.Library(url)
  assert reader.get("super_glue_rte_p")["content_hash"] not in (None, old_hash)
  reader.verify("super_glue_rte_p")
  with pytest.raises(library_lib.LibraryError, match="not an expert library"):
    library_lib.Library(f"ram://{tmp_path.name}/nothing")
  with pytest.raises(library_lib.LibraryError, match="already exists"):
    library_lib.Library.init(url)


def test_zero_shot_guard_refuses_unknown_provenance_unless_allowed(tmp_path, caplog):
  """An expert whose training data is unknown may have seen the held-out dataset: zero_shot refuses
  it (one warning naming the option); the explicit option admits it; seen and off never exclude."""
  lib = library_lib.Library.init(tmp_path / "lib")
  lib.add(make_expert(tmp_path / "k", 0, "cosmos_qa"))
  unknown = lib.add(make_expert(tmp_path / "u", 1, expert_format.UNKNOWN_DATASET, None, "t"))["id"]
  with caplog.at_level("WARNING"):
    verdict = lib.guard("super_glue", "rte", "zero_shot")
  assert verdict.allowed == ["cosmos_qa_no_prompt_text"]
  assert verdict.excluded == [{"id": unknown, "reason": "unknown provenance"}]
  assert [r.getMessage().count("--allow-unknown-provenance") for r in caplog.records] == [1]
  admitted = lib.guard("super_glue", "rte", "zero_shot", allow_unknown_provenance=True)
  assert sorted(admitted.allowed) == sorted(lib.ids()) and admitted.excluded == []
  assert admitted.to_json()["allow_unknown_provenance"] is True
  assert "allow_unknown_provenance" not in verdict.to_json()  # default results stay as they were
  assert all(not lib.guard("super_glue", "rte", m).excluded for m in ("seen", "off"))
  root = str(lib.root)
  report = lib.report_overlaps([("super_glue", "rte")])
  assert report[0]["excluded"] == {"zero_shot": [unknown], "seen": [], "off": []}
  assert library_lib.library_main(["report-overlaps", root, "--eval", "super_glue:rte", "--json",
                                   "--allow-unknown-provenance"]) == 0


def test_training_records_unknown_provenance_explicitly(caplog):
  """A task registered outside seqio_tasks has no readable provenance: recorded as unknown (not
  None,
  which the guard could not tell from 'does not apply'), with the reason logged."""
  from expert_t5x import train  # pylint: disable=g-import-not-at-top
  with caplog.at_level("WARNING"):
    items = train._provenance("not_a_registered_task_xyz")  # pylint: disable=protected-access
  assert items == [{"task": "not_a_registered_task_xyz", "dataset": expert_format.UNKNOWN_DATASET,
                    "subset": None, "prompt": None, "role": None}]
  assert any("not_a_registered_task_xyz" in r.getMessage() for r in caplog.records)
  assert library_lib.unknown_provenance({"provenance": items})
