"""Benchmark: what a bfloat16 frozen base changes (`EncoderDecoderModel.base_dtype`), tiny configs.

Not a test. Trains the same adapter expert (same init, batches and dropout) on a random T5 base
held in float32 and in bfloat16, and compares the training loss curves, then scores the same
rank-classification inputs with both and compares the scores and the argmax choices.

    python bench/bench_bf16_base.py --size small --steps 50
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _model(size: str, base_dtype: str):
  from expert_t5x import experts, models, network, optimizers  # pylint: disable=g-import-not-at-top
  return models.EncoderDecoderModel(
      network.Transformer(network.get_config(size, dropout_mode="elementwise")),
      expert_config=experts.AdapterConfig(reduction_factor=4 if size == "tiny" else 32),
      optimizer_def=optimizers.AdamW(global_norm_clip_threshold=1.0),
      loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", base_dtype=base_dtype)


def run(size: str, steps: int, batch: int, li: int, lt: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from expert_t5x import experts, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, HERE)
  import bench_accelerator  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  f32 = _model(size, "float32")
  shapes = {"encoder_input_tokens": (batch, li), "decoder_input_tokens": (batch, lt)}
  variables = f32.get_initial_variables(jax.random.PRNGKey(0), shapes)
  base = variables["params"]
  axes = partitioning.params_logical_axes(variables)
  vocab = f32.config.vocab_size
  batches = [bench_accelerator._batch(rng, (batch,), li, lt, vocab) for _ in range(steps)]  # pylint: disable=protected-access
  inputs = bench_accelerator._batch(rng, (32,), li, lt, vocab)["encoder_input_tokens"]  # pylint: disable=protected-access
  choices = rng.integers(2, vocab, (32, 4, lt)).astype(np.int32)
  out = {}
  for dtype in ("float32", "bfloat16"):
    model = _model(size, dtype)
    part = partitioning.PjitPartitioner(devices=jax.devices()[:1])
    tr = trainer.Trainer(model, part,
                         optimizers.create_learning_rate_scheduler("constant", 1e-3, 0))
    expert = experts.init_expert(model.expert_config, model.config, jax.tree.map(np.asarray, base))
    base_sh = part.sharding_for(partitioning.logical_axes_tree(base, axes))
    tr.compile(jax.eval_shape(lambda e=expert: e), base_sh, axes)
    stored = model.cast_base(base)
    state = tr.init_state(expert)
    losses = []
    for b in batches:
      state, metrics = tr.train_step(stored, state, b, trainer.seed_keys(0), np.int32(steps))
      losses.append(float(metrics["loss"]))
    scores = np.asarray(jax.jit(lambda p, e, x, c, m=model: m.score_choices(p, x, c, expert=e))(
        stored, state.params, inputs, choices))
    out[dtype] = {"losses": np.array(losses), "scores": scores}
  a, b = out["float32"], out["bfloat16"]
  return {"max_loss_diff": float(np.max(np.abs(a["losses"] - b["losses"]))),
          "final_losses": (float(a["losses"][-1]), float(b["losses"][-1])),
          "max_rel_loss_diff": float(np.max(np.abs(a["losses"] - b["losses"]) / a["losses"])),
          "max_score_diff": float(np.max(np.abs(a["scores"] - b["scores"]))),
          "argmax_agreement": float(np.mean(a["scores"].argmax(-1) == b["scores"].argmax(-1)))}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--lengths", default="64,16")
  args = parser.parse_args(argv)
  li, lt = (int(x) for x in args.lengths.split(","))
  print(args.size, run(args.size, args.steps, args.batch, li, lt))


if __name__ == "__main__":
  main(sys.argv[1:])
