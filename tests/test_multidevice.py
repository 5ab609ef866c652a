"""Multi-device checks, each in its own process with 8 fake CPU devices."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def run_isolated(script: str, timeout: int = 600) -> str:
  """Runs tests/<script> in a fresh interpreter (XLA_FLAGS must be set before JAX starts)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.join(HERE, script)], env=env, timeout=timeout,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.multidevice
def test_4x2_mesh_equals_single_device():
  # Compares the sharded program with the same computation jitted on one device.
  assert "OK" in run_isolated("multidevice_model_check.py")


@pytest.mark.multidevice
def test_gin_partitioning_preset_shapes_the_evaluation_mesh():
  # runs/eval.gin + partitioning/fsdp.gin: the evaluator's Scorer gets the preset's 4 x 2 mesh and
  # rules, and scores as the default data-parallel run does.
  assert "OK" in run_isolated("eval_partitioning_check.py")
