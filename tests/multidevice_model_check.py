"""Run in its own process with 8 fake CPU devices: sharded (4 data x 2 model) scoring and loss
gradients equal the single-device program. Exits non-zero on mismatch."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from expert_t5x import experts, models, network, partitioning
from fakes import random_batch


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = network.get_config("tiny", vocab_size=64)
  acfg = experts.AdapterConfig(reduction_factor=4)
  model = models.EncoderDecoderModel(network.Transformer(cfg), expert_config=acfg)
  variables = model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (8, 10), "decoder_input_tokens": (8, 6)})
  params = variables["params"]
  expert = experts.init_expert(acfg, cfg, params)
  batch = random_batch(0, batch=8)

  def step(params, expert, batch):
    (loss, _), grads = jax.value_and_grad(
        lambda e: model.loss_fn(params, batch, None, expert=e), has_aux=True)(expert)
    return model.score_batch(params, batch, expert=expert), loss, grads

  want = jax.jit(step)(params, expert, batch)

  part = partitioning.PjitPartitioner(num_partitions=2)
  assert dict(part.mesh.shape) == {"data": 4, "model": 2}
  flat_axes = partitioning.params_logical_axes(variables)
  p_shard = part.sharding_for(partitioning.logical_axes_tree(params, flat_axes))
  e_specs = jax.tree.map(lambda a: jax.sharding.PartitionSpec(*a),
                         experts.logical_axes(expert, flat_axes),
                         is_leaf=lambda x: isinstance(x, tuple))
  e_shard = part.sharding_for(e_specs)
  b_shard = jax.tree.map(lambda _: part.data_sharding, batch)
  sharded = part.partition(step, (p_shard, e_shard, b_shard), (part.data_sharding, None, e_shard))
  params_s = jax.device_put(params, p_shard)
  # A model-parallel parameter really is split over the 'model' axis.
  kernel = params_s["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model"), kernel.sharding
  got = sharded(params_s, jax.device_put(expert, e_shard), jax.device_put(batch, b_shard))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  print("multidevice model check: OK")


if __name__ == "__main__":
  main()
