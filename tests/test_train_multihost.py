"""Multi-host training on one machine: 2 processes x 2 fake CPU devices, coordinator on 127.0.0.1.

The reference is an independent run in one process with 4 fake devices that reads both data shards
itself and feeds their concatenation as the global batch (see `multihost_train_check.py`).
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK = os.path.join(HERE, "multihost_train_check.py")
TIMEOUT_S = 400  # all processes together; a hung collective fails the test, not CI


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(args, tmp_path, cache):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the script sets its own device count
  log = open(tmp_path / f"{args[0]}{args[2] if args[0] == 'host' else ''}.log", "w+")
  return subprocess.Popen([sys.executable, CHECK, *args], env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True), log


def _wait(procs):
  """Waits for all processes within one deadline; a failure or the deadline kills the rest (a
  host whose peer died would otherwise wait on the coordinator)."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while time.monotonic() < deadline:
      codes = [proc.poll() for proc, _ in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.5)
  finally:
    outputs = []
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.seek(0)
      outputs.append((proc.returncode, log.read()))
      log.close()
  return outputs


@pytest.mark.multidevice
@pytest.mark.tf
def test_two_hosts_equal_one_host_and_share_checkpoints(tmp_path):
  work = tmp_path / "work"
  work.mkdir()
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [_spawn(["host", coordinator, str(i), str(work)], tmp_path, tmp_path / "cache_hosts")
           for i in range(2)]
  procs.append(_spawn(["single", str(work)], tmp_path, tmp_path / "cache_single"))
  outputs = _wait(procs)
  for rc, out in outputs:
    assert rc == 0, out[-4000:]
  for i in range(2):
    # Orbax restored checkpoint_2 on both processes, and the rerun resumed from it.
    assert "restored checkpoint_2" in outputs[i][1] and "Resuming from" in outputs[i][1]

  # Per-host data shards: seqio shards the demo source round-robin, so host i trains only on
  # examples at source positions = i (mod 2); the two hosts never share an example.
  source = json.loads((work / "source_keys.json").read_text())
  position = {k: p for p, k in enumerate(source)}
  host_keys = [json.loads((work / f"keys_host{i}.json").read_text()) for i in range(2)]
  for i, batches in enumerate(host_keys):
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)  # 3 steps of 8 rows / 2 hosts
    assert {position[k] % 2 for b in batches for k in b} == {i}
  assert not {k for b in host_keys[0] for k in b} & {k for b in host_keys[1] for k in b}

  # Both processes hold the same global parameters, equal to the one-process 4-device run.
  hosts = [dict(np.load(work / f"params_host{i}.npz")) for i in range(2)]
  single = dict(np.load(work / "params_single.npz"))
  assert sorted(hosts[0]) == sorted(single) and len(single) > 10
  for name, want in single.items():
    np.testing.assert_array_equal(hosts[1][name], hosts[0][name], err_msg=name)
    np.testing.assert_allclose(hosts[0][name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  # Process 0 exported the trained (gathered) expert.
  from expert_t5x import expert_format  # pylint: disable=g-import-not-at-top
  exported, meta = expert_format.load_expert(work / "hosts" / "expert")
  assert meta["training"]["steps"] == 3
  flat = expert_format.flatten_params(exported)
  for name, value in flat.items():
    np.testing.assert_array_equal(value, hosts[0][name], err_msg=name)
