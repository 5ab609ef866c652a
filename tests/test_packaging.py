"""Packaging and the command line: the wheel carries every gin and data file, model code stays free
of TensorFlow/seqio, and every `--help` exits 0."""

import glob
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_ships_gin_configs_and_data(tmp_path):
  # A non-editable install gets gin/ as the package expert_t5x.gin_configs (setup.py package_dir).
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path), ROOT], check=True, capture_output=True)
  names = set(zipfile.ZipFile(glob.glob(str(tmp_path / "*.whl"))[0]).namelist())
  shipped = {os.path.relpath(p, os.path.join(ROOT, "gin"))
             for p in glob.glob(os.path.join(ROOT, "gin", "**", "*.gin"), recursive=True)}
  assert shipped and {f"expert_t5x/gin_configs/{p}" for p in shipped} <= names
  for data in glob.glob(os.path.join(ROOT, "expert_t5x", "data", "*.json")) + glob.glob(
      os.path.join(ROOT, "seqio_tasks", "data", "*.json")):
    assert os.path.relpath(data, ROOT) in names


def test_model_code_imports_neither_tensorflow_nor_seqio():
  code = ("import sys; import expert_t5x.network, expert_t5x.experts, expert_t5x.models, "
          "expert_t5x.checkpoint_importer, expert_t5x.partitioning, expert_t5x.expert_format; "
          "bad = [m for m in ('tensorflow', 'seqio', 'seqio_tasks', 'gin') if m in sys.modules]; "
          "print(bad); sys.exit(1 if bad else 0)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


COMMANDS = [[], ["tasks"], ["data"], ["eval"], ["infer"], ["library"], ["retrieve"], ["merge"],
            ["import"], ["demo"], ["t5x-checkpoint"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_subcommand_help_exits_zero(command):
  from expert_t5x import cli
  if command and command[0] not in cli.SUBCOMMANDS:
    pytest.fail(f"subcommand {command[0]!r} is not registered")
  proc = subprocess.run([sys.executable, "-m", "expert_t5x.cli", *command, "--help"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "usage" in proc.stdout.lower()


@pytest.mark.parametrize("module", ["expert_t5x.train", "expert_t5x.eval", "expert_t5x.infer"])
def test_python_entry_points_help_exits_zero(module):
  proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_subcommand_is_one_clear_line():
  proc = subprocess.run([sys.executable, "-m", "expert_t5x.cli", "trian"], capture_output=True,
                        text=True, cwd=ROOT)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "unknown command 'trian'" in proc.stderr
