"""Helpers shared by the bench scripts: the machine line of each report, thread pinning.

The scripts run as `python bench/<script>.py`, which puts this directory on `sys.path`.
"""

import os
import platform
import sys


def cpu_model() -> str:
  """The CPU's marketing name (`/proc/cpuinfo`), for the machine line of a report."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def pin_threads(threads: int) -> None:
  """Pins the process (hence XLA's CPU pool) and OpenMP pools to `threads` cores (before jax/torch
  import)."""
  cores = sorted(os.sched_getaffinity(0))
  if threads > len(cores):
    sys.exit(f"--threads={threads} but only {len(cores)} cores are available.")
  os.sched_setaffinity(0, cores[:threads])
  # XLA:CPU sizes its thread pool from the affinity mask set above (there is no thread-count flag).
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
  os.environ["OMP_NUM_THREADS"] = str(threads)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
