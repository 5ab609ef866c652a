"""Run in its own process with 8 fake CPU devices: 3 train steps on a 4x2 (data x model) mesh equal
the same steps on one device (rtol 1e-5), for one adapter expert and for full fine-tuning.
Exits non-zero on mismatch."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from expert_t5x import experts, models, network, optimizers, partitioning, trainer
from fakes import random_batch


def run(model, params, variables, partitioner, trainable):
  axes = partitioning.params_logical_axes(variables)
  base_sh = partitioner.sharding_for(partitioning.logical_axes_tree(params, axes))
  sched = optimizers.create_learning_rate_scheduler("constant", 1e-1, 0)
  tr = trainer.Trainer(model, partitioner, sched)
  tr.compile(jax.eval_shape(lambda: trainable), base_sh, axes)
  state = tr.init_state(trainable)
  base = jax.device_put(params, base_sh)
  losses = []
  for s in range(3):
    batch = jax.device_put(random_batch(s, batch=8), tr.batch_sharding())
    state, metrics = tr.train_step(base, state, batch, trainer.seed_keys(0), np.int32(3))
    losses.append(float(metrics["loss"]))
  return jax.tree.map(np.asarray, state.params), losses


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = network.get_config("tiny", vocab_size=64)
  for expert_config in (experts.AdapterConfig(reduction_factor=4), experts.FullConfig()):
    model = models.EncoderDecoderModel(
        network.Transformer(cfg),
        expert_config=expert_config,
        # eps = 1 keeps the update linear in small gradients, so
        # float32 reduction-order noise is not amplified to a full
        # step.
        optimizer_def=optimizers.AdamW(eps=1.0, global_norm_clip_threshold=1.0),
        loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    variables = model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (8, 10), "decoder_input_tokens": (8, 6)})
    params = variables["params"]
    trainable = (params if isinstance(expert_config, experts.FullConfig)
                 else experts.init_expert(expert_config, cfg, params))
    one = partitioning.PjitPartitioner(devices=jax.devices()[:1])
    mesh = partitioning.PjitPartitioner(num_partitions=2)
    assert dict(mesh.mesh.shape) == {"data": 4, "model": 2}
    want, want_losses = run(model, params, variables, one, trainable)
    got, got_losses = run(model, params, variables, mesh, trainable)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  print("multidevice train check: OK")


if __name__ == "__main__":
  main()
