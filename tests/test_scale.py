"""The bfloat16 frozen base, the analytic FLOP counts, and the accelerator benchmark's CPU mode."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from expert_t5x import experts, flops, models, network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(vocab, b=2, li=8, lt=4, seed=0):
  rng = np.random.default_rng(seed)
  tgt = rng.integers(2, vocab, (b, lt)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, vocab, (b, li)).astype(np.int32),
          "decoder_target_tokens": tgt, "decoder_input_tokens": np.asarray(models.shift_right(tgt)),
          "decoder_loss_weights": np.ones((b, lt), np.float32)}


def _adapter_model(config, base_dtype):
  return models.EncoderDecoderModel(network.Transformer(config),
                                    expert_config=experts.AdapterConfig(reduction_factor=4),
                                    loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
                                    base_dtype=base_dtype)


def test_bfloat16_base_rounds_only_the_weights(tiny_config, tiny_params):
  f32, bf16 = _adapter_model(tiny_config, "float32"), _adapter_model(tiny_config, "bfloat16")
  expert = experts.init_expert(f32.expert_config, tiny_config,
                               jax.tree.map(np.asarray, tiny_params))
  batch = _batch(tiny_config.vocab_size)
  grad = jax.grad(lambda e, m, p: m.loss_fn(p, batch, None, expert=e)[0])
  stored = bf16.cast_base(tiny_params)
  assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
  # A float32 base given to the bfloat16 model computes what the stored bfloat16 base does.
  g_stored, g_cast = grad(expert, bf16, stored), grad(expert, bf16, tiny_params)
  jax.tree.map(np.testing.assert_array_equal, g_stored, g_cast)
  # Against float32: the base rounded to bfloat16 by hand (numpy's round-to-nearest-even, not
  # our cast) gives the float32 model the same gradients; the unrounded base differs.
  by_hand = jax.tree.map(lambda x: np.asarray(np.asarray(x).astype(jnp.bfloat16), np.float32),
                         tiny_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grad(expert, f32, by_hand), g_stored)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(grad(expert, f32, tiny_params)), jax.tree.leaves(g_stored)))
  assert diff > 0


def test_bfloat16_base_refused_for_full_fine_tuning(tiny_config):
  with pytest.raises(ValueError, match="base_dtype='float32' for full experts"):
    models.EncoderDecoderModel(network.Transformer(tiny_config),
                               expert_config=experts.FullConfig(), base_dtype="bfloat16")
  with pytest.raises(ValueError, match="base_dtype must be one of"):
    _adapter_model(tiny_config, "float16")


def test_step_flops_by_hand():
  """Hand count for a 1+1-layer model: e=4, h*d=4, f=8 (two gated inputs), v=10, li=3, lt=2."""
  cfg = network.get_config("tiny", emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8, vocab_size=10,
                           num_encoder_layers=1, num_decoder_layers=1)
  mlp = 2 * (2 * 4 * 8 + 8 * 4)  # 192 per token
  w_enc = (2 * 4 * 4 * 4 + mlp) * 3  # q,k,v,o + MLP on 3 tokens = 960
  w_dec = (2 * 6 * 4 * 4 + mlp) * 2 + 2 * 2 * 4 * 4 * 3  # 768 + 192 (cross k/v on 3 tokens)
  w_logits = 2 * 4 * 10 * 2
  a = 4 * 3 * 3 * 4 + 4 * (2 * 2 + 2 * 3) * 4  # 144 + 160
  w = w_enc + w_dec + w_logits
  lengths = {"inputs": 3, "targets": 2}
  assert flops.step_flops(cfg, lengths, "full", 1) == 3 * w + 3 * a
  assert flops.step_flops(cfg, lengths, "frozen_base", 5) == 5 * (2 * w + 3 * a)
  assert flops.step_flops(cfg, lengths, "score", 1) == w + a
  # Two choices: decoder rows double, cross keys/values stay once per input.
  w2 = w_enc + (2 * 6 * 4 * 4 + mlp) * 4 + 2 * 2 * 4 * 4 * 3 + 2 * w_logits
  a2 = 144 + 4 * (2 * 2 * 2 + 4 * 3) * 4
  assert flops.step_flops(cfg, lengths, "score", 1, num_choices=2) == w2 + a2
  adapter = experts.AdapterConfig(reduction_factor=2)  # r = 2: 2 sites x 2 products x 2 x e x r
  x = 2 * 2 * 2 * 4 * 2 * (3 + 2)
  assert flops.step_flops(cfg, lengths, "frozen_base", 1, adapter) == 2 * w + 3 * a + 3 * x
  assert flops.step_flops(cfg.replace(remat_policy="full"), lengths, "frozen_base", 1) == (
      2 * w + 3 * a + (w_enc + w_dec) + a)


def test_bench_accelerator_cpu_mode(tmp_path):
  """The accelerator benchmark's tiny mode runs end to end on CPU and writes every row."""
  out = tmp_path / "acc.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_accelerator.py"), "--tiny",
                  "--json", str(out)], check=True, env=env, cwd=ROOT, capture_output=True)
  data = json.loads(out.read_text())
  assert data["mode"] == "tiny"
  whats = [r["what"] for r in data["rows"]]
  assert whats == ["train adapter", "train lora", "train full", "stacked K=1", "stacked K=4",
                   "rank classification"]
  for r in data["rows"]:
    assert "error" not in r, r
  assert all(r["tokens_per_s"] > 0 for r in data["rows"][:3])
  assert data["rows"][4]["speedup"] > 0 and data["rows"][5]["examples_per_s"] > 0
