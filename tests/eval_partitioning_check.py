"""Run in its own process with 8 fake CPU devices: a gin partitioning preset given after
`runs/eval.gin` shapes the evaluator's mesh and logical axis rules, as it does training's.

`partitioning/fsdp.gin` (2-way model parallel, parameters also sharded over 'data') must give the
Scorer a 4 (data) x 2 (model) mesh with those rules, and the same predictions and scores as the
default data-parallel run (8 x 1). Exits non-zero on mismatch."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import gin  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from expert_t5x import eval as eval_entry
from expert_t5x import base_models, gin_utils, results, scoring
import eval_fakes


def _run(root: str, name: str, presets: list[str], experts: list[str]):
  """(the Scorer's partitioner, its parameter shardings, predictions) of one gin evaluation."""
  bindings = [f"EVAL_OUTPUT_DIR = '{os.path.join(root, name)}'", "CHECKPOINT_PATH = None",
              "MIXTURE_OR_TASK_NAME = 'nli_p1'", "MODEL_CONFIG = 'tiny'", "RANDOM_INIT_SEED = 0",
              f"CONFIG_OVERRIDES = {{'vocab_size': {eval_fakes.VOCAB_SIZE}}}", "BATCH_SIZE = 8",
              "BOOTSTRAP_SAMPLES = 0", "PROGRESS = False", f"EXPERT_PATHS = {experts!r}",
              "INCLUDE_BASE = True"]
  seen = []
  original = scoring.Scorer.__init__

  def spy(self, *args, **kwargs):
    original(self, *args, **kwargs)
    seen.append(self)
  scoring.Scorer.__init__ = spy
  gin_evaluate = gin_utils.configurable(eval_entry.evaluate)  # as `python -m expert_t5x.eval`
  try:
    gin_utils.parse_gin_flags([], ["runs/eval.gin"] + presets, bindings)
    gin_evaluate(task_source=eval_fakes.make_source(n=6))
  finally:
    scoring.Scorer.__init__ = original
    gin.clear_config()
  assert len(seen) == 1, seen
  preds = results.read_jsonl(os.path.join(root, name, results.PREDICTIONS_FILE))
  return seen[0].partitioner, seen[0].param_sharding, preds


def _mesh_axes(shardings) -> set:
  """Every mesh axis some parameter is sharded over."""
  axes = set()
  for sharding in jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "spec")):
    for entry in sharding.spec:
      axes.update(entry if isinstance(entry, tuple) else (entry,))
  return axes - {None}


def _key(record) -> tuple:
  return tuple(record["expert_ids"]), record["example_id"]


def main():
  assert jax.device_count() == 8, jax.devices()
  base = base_models.load_base(model_config="tiny", random_init_seed=0,
                              config_overrides={"vocab_size": eval_fakes.VOCAB_SIZE})
  with tempfile.TemporaryDirectory() as root:
    experts = eval_fakes.save_adapter_experts(root, base.params, base.config, [1],
                                              fingerprint=base.fingerprint)
    plain, plain_sharding, plain_preds = _run(root, "plain", [], experts)
    fsdp, fsdp_sharding, fsdp_preds = _run(root, "fsdp", ["partitioning/fsdp.gin"], experts)
  assert dict(plain.mesh.shape) == {"data": 8, "model": 1}, plain.mesh.shape
  assert dict(fsdp.mesh.shape) == {"data": 4, "model": 2}, fsdp.mesh.shape
  # fsdp.gin's rules reached the partitioner: 'embed' goes to 'data' first, which data-parallel
  # rules never do, and the base's parameters are sharded over both axes.
  assert fsdp.rules[0] == ("embed", "data") and ("embed", "data") not in plain.rules, fsdp.rules
  assert _mesh_axes(fsdp_sharding) == {"data", "model"}, _mesh_axes(fsdp_sharding)
  assert _mesh_axes(plain_sharding) <= {"model"}, _mesh_axes(plain_sharding)
  plain_preds, fsdp_preds = sorted(plain_preds, key=_key), sorted(fsdp_preds, key=_key)
  assert [_key(r) for r in plain_preds] == [_key(r) for r in fsdp_preds]
  assert len({r["expert_ids"][0] if r["expert_ids"] else "" for r in plain_preds}) == 2
  for a, b in zip(plain_preds, fsdp_preds):
    np.testing.assert_allclose(a["choice_scores"], b["choice_scores"], rtol=1e-5, atol=1e-5)
    assert a["pred"] == b["pred"], (a, b)
  print("eval partitioning preset check: OK")


if __name__ == "__main__":
  main()
