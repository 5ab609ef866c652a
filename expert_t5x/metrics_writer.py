"""Training metrics: TensorBoard event files (clu's writer), a console progress bar, MFU estimates.

Scalars per step go to `MODEL_DIR/train/` (what T5X writes) from process 0; the progress bar
(tqdm) shows steps, rate and ETA with the latest loss, learning rate and tokens/s.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from expert_t5x import flops

# Dense bf16 peak FLOP/s per device by `device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: Optional[jax.Device] = None) -> Optional[float]:
  """The device's dense bf16 peak FLOP/s, or None when unknown (e.g. CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None


def train_flops_per_example(config: Any, lengths: Mapping[str, int], full: bool,
                            expert_config: Any = None) -> float:
  """Model FLOPs of one training example (no rematerialisation), see `expert_t5x.flops`."""
  return flops.step_flops(config, lengths, "full" if full else "frozen_base", 1, expert_config,
                          remat_policy="none")


class MetricsWriter:
  """Writes scalars to TensorBoard (process 0) and drives a tqdm progress bar."""

  def __init__(self, logdir: Optional[str], total_steps: int, initial_step: int = 0,
               show_progress: bool = True):
    self._writer = None
    if logdir and jax.process_index() == 0:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.SummaryWriter(logdir)
    self._bar = None
    if show_progress and jax.process_index() == 0:
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0, desc="train")
    self._last_time = time.perf_counter()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if self._writer is not None:
      self._writer.write_scalars(step, {k: float(np.mean(v)) for k, v in scalars.items()})

  def progress(self, steps: int, postfix: Mapping[str, Any]) -> None:
    if self._bar is not None:
      self._bar.update(steps)
      self._bar.set_postfix({k: f"{float(np.mean(v)):.4g}" for k, v in postfix.items()},
                            refresh=False)

  def log(self, message: str) -> None:
    """A line that does not break the progress bar."""
    if jax.process_index() != 0:
      return
    if self._bar is not None:
      self._bar.write(message, file=sys.stderr)
    else:
      print(message, file=sys.stderr, flush=True)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._writer is not None:
      self._writer.close()
      self._writer = None
