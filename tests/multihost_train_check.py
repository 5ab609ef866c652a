"""Multi-host training check: 2 processes x 2 fake CPU devices against one process with 4 devices.

Run by `test_train_multihost.py`, one role per process:

    multihost_train_check.py host COORDINATOR PROCESS_ID WORKDIR   (twice: process 0 and 1)
    multihost_train_check.py single WORKDIR                        (the one-process reference)

Both roles call `train.train(...)` on the tiny model with one adapter expert on a 2x2 (data x model)
mesh; with two hosts the `data` axis spans the processes, so each host feeds its half of the global
batch. The hosts read their own seqio shard (`ShardInfo(process_index, 2)`) of the demo task; the
reference reads both shards in one process and feeds their concatenation as the global batch.

A host trains 2 steps (checkpoints 1 and 2, saved by orbax from both processes), restores
checkpoint 2 into its shardings and checks it against the in-memory state, then reruns `train` with
3 steps, which resumes from checkpoint 2 on both processes. Each role writes what the test compares
to WORKDIR: its final (gathered) parameters, the example keys of its batches, and, for the
reference, the source order of the task's example keys.
"""

import functools
import json
import os
import sys
import time

START = time.perf_counter()

ROLE = sys.argv[1] if len(sys.argv) > 1 else ""
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           + ("2" if ROLE == "host" else "4"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

TASK = "demo_sentiment_review"
STEPS = 3
BATCH = 8
NUM_SHARDS = 2


def _log(message):
  print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def _setup():
  from expert_t5x import experts, models, network, optimizers, train_data  # pylint: disable=g-import-not-at-top
  # One layer each way keeps the compile short; dropout 0.1: per-row rngs must line up.
  cfg = network.get_config("tiny", vocab_size=512, num_encoder_layers=1, num_decoder_layers=1)
  model = models.EncoderDecoderModel(
      network.Transformer(cfg), expert_config=experts.AdapterConfig(reduction_factor=4),
      loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
      # eps = 1 keeps the update linear in small gradients, so float32 reduction-order noise of the
      # cross-process all-reduce is not amplified to a full step.
      optimizer_def=optimizers.AdamW(eps=1.0, global_norm_clip_threshold=1.0))
  data = train_data.DatasetConfig(TASK, {"inputs": 32, "targets": 8}, batch_size=BATCH, seed=0)
  sched = optimizers.create_learning_rate_scheduler("constant", 1e-1, 0)
  return model, data, sched


def _train(model_dir, steps):
  from expert_t5x import partitioning, train, checkpoints, trainer  # pylint: disable=g-import-not-at-top
  model, data, sched = _setup()
  save = checkpoints.SaveCheckpointConfig(period=1)
  return train.train(
      model=model, train_dataset_cfg=data, model_dir=model_dir, total_steps=steps,
      checkpoint_cfg=checkpoints.CheckpointConfig(save=save),
      partitioner=partitioning.PjitPartitioner(num_partitions=2),
      trainer_cls=functools.partial(trainer.Trainer, learning_rate_fn=sched),
      num_retrieval_keys=0, eval_before_and_after=False, summarize_config_fn=None,
      show_progress=False)


def _record_batches(keys):
  """Makes `train` append the example keys of every batch it draws to `keys` (one list per step)."""
  from expert_t5x import train, train_data  # pylint: disable=g-import-not-at-top
  make = train.train_data.batch_iterator

  def recording(*args, **kwargs):
    for batch in make(*args, **kwargs):
      keys.append([int(k) for k in batch[train_data.EXAMPLE_KEY][:, 0]])
      yield batch
  train.train_data.batch_iterator = recording


def _gathered(tree):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_restore(model_dir, state, step):
  """Restores `checkpoint_<step>` on every process and compares each local shard bitwise."""
  from expert_t5x import checkpoints  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state.state_dict())
  manager = checkpoints.CheckpointManager(model_dir)
  assert manager.all_steps() == [1, 2], manager.all_steps()
  rep = state.step.sharding  # replicated over the global mesh
  scalar = jax.ShapeDtypeStruct((), np.int64, sharding=rep)
  restored = manager.restore(
      step, {
          **abstract, "rng": jax.ShapeDtypeStruct(
              (2,), np.uint32, sharding=rep), "data": {"seed": scalar, "batches_consumed": scalar}
      })
  manager.close()
  assert int(np.asarray(restored["data"]["batches_consumed"])) == step, restored["data"]
  count = 0
  for want, got in zip(jax.tree.leaves(state.state_dict()),
                       jax.tree.leaves({k: restored[k] for k in ("target", "state")})):
    assert got.sharding == want.sharding, (got.sharding, want.sharding)
    for a, b in zip(want.addressable_shards, got.addressable_shards):
      assert a.index == b.index
      np.testing.assert_array_equal(np.asarray(b.data), np.asarray(a.data))
      count += 1
  _log(f"process {jax.process_index()}: restored checkpoint_{step} ({count} local shards) "
       "equals the trained state")


def host(coordinator, process_id, workdir):
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=NUM_SHARDS,
                             process_id=process_id, initialization_timeout=60)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  model_dir = os.path.join(workdir, "hosts")
  _log(f"process {process_id}: initialized")
  keys = []
  _record_batches(keys)
  step, state = _train(model_dir, 2)
  assert step == 2
  _log(f"process {process_id}: trained 2 steps")
  _check_restore(model_dir, state, 2)
  step, state = _train(model_dir, STEPS)  # resumes from checkpoint_2 on both processes
  _log(f"process {process_id}: resumed and trained step {STEPS}")
  assert step == STEPS and int(np.asarray(state.step)) == STEPS
  np.savez(os.path.join(workdir, f"params_host{process_id}.npz"), **_gathered(state.params))
  with open(os.path.join(workdir, f"keys_host{process_id}.json"), "w") as f:
    json.dump(keys, f)
  _log(f"process {process_id}: done")
  # Shut the coordination service down together (a barrier), then skip interpreter teardown: the
  # coordinator's gRPC server can abort in its destructor when process 1 is still disconnecting.
  jax.distributed.shutdown()
  sys.stdout.flush()
  os._exit(0)  # pylint: disable=protected-access


def single(workdir):
  """The reference: one process, 4 devices, the two shards' batches concatenated."""
  from expert_t5x import train, train_data  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 1 and jax.device_count() == 4
  real = train_data.batch_iterator

  def both_shards(cfg, shard_id=0, num_shards=1, info=None, skip_batches=0):
    assert (shard_id, num_shards) == (0, 1)
    its = [real(cfg, i, NUM_SHARDS, info, skip_batches) for i in range(NUM_SHARDS)]
    while True:
      parts = [next(it) for it in its]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  train.train_data.batch_iterator = both_shards
  step, state = _train(os.path.join(workdir, "single"), STEPS)
  _log(f"single: trained {STEPS} steps")
  train.train_data.batch_iterator = real
  assert step == STEPS
  np.savez(os.path.join(workdir, "params_single.npz"), **_gathered(state.params))
  source = train_data._task_dataset(_setup()[1]).map(train_data.add_example_key)  # pylint: disable=protected-access
  with open(os.path.join(workdir, "source_keys.json"), "w") as f:
    json.dump([int(ex[train_data.EXAMPLE_KEY][0]) for ex in source.as_numpy_iterator()], f)
  _log("single: done")


if __name__ == "__main__":
  if ROLE == "host":
    host(sys.argv[2], int(sys.argv[3]), sys.argv[4])
  elif ROLE == "single":
    single(sys.argv[2])
  else:
    sys.exit(__doc__)
