"""Optimizers and schedules against independent numpy implementations of the published
algorithms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from expert_t5x import optimizers


def _t5x_adafactor_reference(params, grads_seq, lr, decay_rate=0.8, eps1=1e-30, eps2=1e-3,
                             clip=1.0, min_dim=128, scale_by_param=True):
  """Numpy re-statement of T5X's Adafactor (factored second moments, RMS clipping, parameter
  scale) for parameters of rank <= 2, written from the algorithm's description."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  state = {}
  for step, grads in enumerate(grads_seq):
    decay = 1.0 - (step + 1.0) ** -decay_rate
    for k, g in grads.items():
      g = g.astype(np.float64)
      g2 = g * g + eps1
      shape = g.shape
      factored = len(shape) == 2 and min(shape) >= min_dim
      if factored:
        vr, vc = state.get(k, (np.zeros(shape[0]), np.zeros(shape[1])))
        vr = decay * vr + (1 - decay) * g2.mean(axis=1)
        vc = decay * vc + (1 - decay) * g2.mean(axis=0)
        state[k] = (vr, vc)
        y = g * (vr / vr.mean())[:, None] ** -0.5 * vc[None, :] ** -0.5
      else:
        v = state.get(k, np.zeros(shape))
        v = decay * v + (1 - decay) * g2
        state[k] = v
        y = g * v ** -0.5
      y = y / max(1.0, np.sqrt(np.mean(y * y)) / clip)
      scale = lr * max(np.sqrt(np.mean(params[k] ** 2)), eps2) if scale_by_param else lr
      params[k] = params[k] - scale * y
  return params


def _run(optimizer_def, params, grads_seq, lr):
  tx = optimizer_def.create()
  state = tx.init(params)
  for g in grads_seq:
    state = optimizers.set_learning_rate(state, lr)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("scale_by_param", [True, False])
def test_adafactor_matches_t5x_algorithm(scale_by_param):
  # Compares with the numpy statement of T5X's Adafactor above (factored 128x130 and unfactored).
  rng = np.random.default_rng(0)
  params = {"big": rng.normal(size=(128, 130)).astype(np.float32),
            "small": rng.normal(size=(4, 3)).astype(np.float32),
            "vec": rng.normal(size=(5,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(3)]
  got, _ = _run(optimizers.Adafactor(multiply_by_parameter_scale=scale_by_param),
                {k: jnp.asarray(v) for k, v in params.items()}, grads_seq, 0.01)
  want = _t5x_adafactor_reference(params, grads_seq, 0.01, scale_by_param=scale_by_param)
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-6)


def test_adamw_with_clipping_matches_numpy():
  # Compares with PyTorch's AdamW update rule (bias-corrected moments) after global-norm clipping.
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
  grads_seq = [{"w": 3 * rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(3)]
  got, _ = _run(optimizers.AdamW(weight_decay=0.01, global_norm_clip_threshold=1.0),
                {"w": jnp.asarray(params["w"])}, grads_seq, 1e-2)
  w, m, v = params["w"].astype(np.float64), 0.0, 0.0
  for t, g in enumerate(grads_seq, 1):
    g = g["w"].astype(np.float64)
    g = g / max(1.0, np.linalg.norm(g))
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
    w = w - 1e-2 * (mhat / (np.sqrt(vhat) + 1e-8) + 0.01 * w)
  np.testing.assert_allclose(np.asarray(got["w"]), w, rtol=1e-5, atol=1e-6)


def test_frozen_leaves_have_no_state_and_no_update():
  params = {"encoder": {"w": jnp.ones((3, 3))}, "token_embedder": {"embedding": jnp.ones((5, 3))}}
  opt = optimizers.AdamW(frozen_patterns=("token_embedder",))
  grads = jax.tree.map(jnp.ones_like, params)
  new, state = _run(opt, params, [grads], 0.1)
  np.testing.assert_array_equal(np.asarray(new["token_embedder"]["embedding"]), 1.0)
  assert np.all(np.asarray(new["encoder"]["w"]) < 1.0)
  # Adam keeps two moments per trainable leaf; the frozen embedding keeps none.
  shapes = [x.shape for x in jax.tree.leaves(state)]
  assert (5, 3) not in shapes and shapes.count((3, 3)) == 2


def test_linear_decay_matches_hugging_face_schedule():
  # HF get_linear_schedule_with_warmup: lr * max(0, (T - s) / (T - W)) after warmup W.
  sched = optimizers.create_learning_rate_scheduler("constant * linear_warmup * linear_decay",
                                                    1e-4, warmup_steps=3, min_learning_rate=0.0)
  total = 10
  for step in range(total + 2):
    want = 1e-4 * (step / 3 if step < 3 else max(0.0, (total - step) / (total - 3)))
    np.testing.assert_allclose(float(sched(step, total)), want, rtol=1e-6, atol=1e-12)
  # Per-expert budgets as a vector (stacked experts).
  np.testing.assert_allclose(np.asarray(sched(5, jnp.array([10, 20]))),
                             [1e-4 * 5 / 7, 1e-4 * 15 / 17], rtol=1e-6)


def test_t5x_rsqrt_schedule_and_errors():
  sched = optimizers.create_learning_rate_scheduler()  # T5X default: constant*linear_warmup*rsqrt
  for step in (0, 500, 1000, 4000):
    want = 0.5 * min(1.0, step / 1000) / np.sqrt(max(step, 1000))
    np.testing.assert_allclose(float(sched(step)), max(want, 1e-8), rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown learning-rate factor"):
    optimizers.create_learning_rate_scheduler("constant * cosine_warmup")
  with pytest.raises(ValueError, match="needs total_steps"):
    optimizers.create_learning_rate_scheduler("linear_decay")(3)
  with pytest.raises(ValueError, match="epsilon2"):
    optimizers.Adafactor(epsilon2=1e-4)
