"""Sharded training on 8 fake CPU devices, in its own process."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.mark.multidevice
def test_4x2_mesh_training_equals_single_device():
  # Compares 3 steps on a 4x2 (data x model) mesh with the same steps on one device.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_train_check.py")],
                        env=env, timeout=900, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "OK" in proc.stdout
