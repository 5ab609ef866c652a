"""t5x_compat (no upstream t5x needed): the T5X module's parameter tree, its logits against
`network.Transformer(..., expert=...)`, the freeze labels and optax updates, the task vocabulary,
and the vocabulary / data-root gin bindings in both gin styles and as `--gin.` flags."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from expert_t5x import checkpoint_importer
from expert_t5x import experts
from expert_t5x import network
from expert_t5x import t5x_compat

CFG = network.get_config("tiny", dropout_rate=0.0)
EXPERTS = {
    "adapter": experts.AdapterConfig(reduction_factor=4, init_seed=3),
    "lora": experts.LoraConfig(rank=2, alpha=4.0, targets=("attention_qv", "mlp"), init_seed=1),
}
X = jnp.array([[5, 6, 7, 1, 0], [9, 3, 1, 0, 0]])
Y = jnp.array([[0, 8, 9, 1], [0, 4, 1, 0]])
T = jnp.array([[8, 9, 1, 0], [4, 1, 0, 0]])


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep="/")


def _init(expert):
  module = t5x_compat.ExpertTransformer(CFG, expert_config=expert)
  return module, module.init(jax.random.PRNGKey(0), X, Y, T, enable_dropout=False)


@pytest.mark.parametrize("kind", sorted(EXPERTS))
def test_param_tree_is_base_plus_expert(kind):
  expert = EXPERTS[kind]
  _, variables = _init(expert)
  flat = _flat(variables["params"])
  base = {k: v.shape for k, v in flat.items() if not k.startswith("expert/")}
  # The base paths and shapes are T5X's (checkpoint_importer.expected_shapes mirrors T5X's network).
  assert base == {k: tuple(s) for k, s in checkpoint_importer.expected_shapes(CFG).items()}
  # The expert subtree is exactly what expert_t5x.train initialises (seeded), minus the
  # layer-norm copies (trained in place for adapters).
  init_cfg = (dataclasses.replace(expert, train_layer_norms=False) if kind == "adapter" else expert)
  ref = _flat(experts.init_expert(init_cfg, CFG, variables["params"]))
  got = {k[len("expert/"):]: v for k, v in flat.items() if k.startswith("expert/")}
  assert sorted(got) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  # Logical axis names on every parameter.
  axes = _flat(variables["params_axes"])
  assert sorted(k[:-len("_axes")] for k in axes) == sorted(flat)
  for k, v in axes.items():
    assert len(v.names) == np.ndim(flat[k[:-len("_axes")]])


@pytest.mark.parametrize("kind", sorted(EXPERTS))
def test_logits_equal_network_with_expert(kind):
  expert = EXPERTS[kind]
  module, variables = _init(expert)
  # Random expert values (a fresh LoRA's B is zero, which would hide a wrong wiring).
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.1,
                        variables["params"])
  logits = module.apply({"params": params}, X, Y, T, enable_dropout=False)
  tree = t5x_compat.expert_from_t5x_params(params, expert)
  ref = network.Transformer(CFG).apply(
      {"params": t5x_compat.base_from_t5x_params(params)}, X, Y, T, enable_dropout=False,
      expert=experts.network_tree(tree, expert))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))


def test_labels_and_freeze_base_updates():
  adapter = EXPERTS["adapter"]
  _, variables = _init(adapter)
  params = variables["params"]
  labels = _flat(t5x_compat.param_labels(params, adapter))
  trainable = sorted(k for k, v in labels.items() if v == t5x_compat.TRAINABLE)
  # The expert subtree and every layer-norm scale (12 for the tiny T5: 2 per encoder block, 3 per
  # decoder block, 2 final norms).
  scales = [k for k in labels if k.endswith("/scale")]
  assert len(scales) == 2 * 2 + 3 * 2 + 2
  expected = sorted([k for k in labels if k.startswith("expert/")] + scales)
  assert trainable == expected
  no_norms = dataclasses.replace(adapter, train_layer_norms=False)
  assert all(v == t5x_compat.FROZEN
             for k, v in _flat(t5x_compat.param_labels(params, no_norms)).items()
             if not k.startswith("expert/"))
  assert set(_flat(t5x_compat.param_labels(params, None)).values()) == {t5x_compat.TRAINABLE}
  # One AdamW step: the frozen leaves get exactly zero updates, the expert's do not.
  opt = t5x_compat.freeze_base([optax.clip_by_global_norm(1.0), optax.adamw(1e-3)], adapter)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  for k, u in _flat(updates).items():
    assert bool(jnp.all(u == 0)) == (labels[k] == t5x_compat.FROZEN), k


def test_expert_config_from_operative_gin():
  text = ("EXPERT = @experts.LoraConfig()\n# Parameters for experts.LoraConfig:\n"
          "experts.LoraConfig.alpha = 4.0\nexperts.LoraConfig.rank = 2\n"
          "experts.LoraConfig.targets = ('mlp',)\n")
  assert t5x_compat.expert_config_from_gin_text(text) == experts.LoraConfig(rank=2, alpha=4.0,
                                                                              targets=("mlp",))
  with pytest.raises(ValueError, match="names no experts"):
    t5x_compat.expert_config_from_gin_text("BATCH_SIZE = 8\n")


def test_task_vocabulary_is_the_tasks_object():
  import seqio
  import seqio_tasks
  vocab = t5x_compat.task_vocabulary("demo_sentiment_review")
  assert vocab is seqio.get_mixture_or_task("demo_sentiment_review").output_features[
      "targets"].vocabulary
  assert vocab is seqio_tasks.vocab.DEMO_VOCABULARY
  with pytest.raises(ValueError, match="not a registered task"):
    t5x_compat.task_vocabulary("no_such_task")


_DYNAMIC = """from __gin__ import dynamic_registration
import seqio_tasks
seqio_tasks.vocab.VOCABULARY_PATH = "/ckpt/spiece.model"
seqio_tasks.settings.P3_DIR = "/data/p3"
"""
_DYNAMIC_FROM = """from __gin__ import dynamic_registration
from seqio_tasks import settings
from seqio_tasks import vocab
vocab.VOCABULARY_PATH = "/ckpt/spiece.model"
settings.P3_DIR = "/data/p3"
"""
_CLASSIC = """import seqio_tasks
seqio_tasks.vocab.VOCABULARY_PATH = "/ckpt/spiece.model"
seqio_tasks.settings.P3_DIR = "/data/p3"
"""


@pytest.mark.parametrize("style", ["dynamic", "dynamic_from", "classic", "flags"])
def test_vocabulary_and_roots_bind_in_every_gin_style(style):
  # The vocabulary binding in a dynamic_registration file used to fail (gin resolved the
  # module `seqio_tasks.vocab` and found no configurable for it).
  import seqio_tasks
  gin.clear_config()
  try:
    if style == "flags":
      gin.parse_config_files_and_bindings(
          [], ['seqio_tasks.vocab.VOCABULARY_PATH = "/ckpt/spiece.model"',
               'seqio_tasks.settings.P3_DIR = "/data/p3"'])
    else:
      gin.parse_config({"dynamic": _DYNAMIC, "dynamic_from": _DYNAMIC_FROM,
                        "classic": _CLASSIC}[style])
    assert seqio_tasks.vocab._gin_vocab() == "/ckpt/spiece.model"
    assert seqio_tasks.settings.get_path("P3_DIR") == "/data/p3"
    # The modules are still the modules.
    assert seqio_tasks.vocab.T5_VOCABULARY is not None and callable(seqio_tasks.settings.get_path)
  finally:
    gin.clear_config()
