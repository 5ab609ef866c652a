"""`train(init_expert_path=...)`: fine-tuning an exported expert further (the demo's continual
stage), checked against the exported expert's own tensors, and its one-line refusals."""

import numpy as np
import pytest

pytestmark = pytest.mark.tf

TASK = "demo_sentiment_review"


def _model(reduction_factor=4, lora=False):
  from expert_t5x import experts, models, network, optimizers  # pylint: disable=g-import-not-at-top
  config = network.get_config("tiny", vocab_size=384)
  expert = (experts.LoraConfig() if lora else
            experts.AdapterConfig(reduction_factor=reduction_factor))
  return models.EncoderDecoderModel(network.Transformer(config), expert_config=expert,
                                    optimizer_def=optimizers.AdamW(weight_decay=0.0))


def _train(tmp_path, name, model, learning_rate, seed=0, init=None):
  from expert_t5x import checkpoints as tc  # pylint: disable=g-import-not-at-top
  from expert_t5x import optimizers, train, train_data, trainer  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  schedule = optimizers.create_learning_rate_scheduler("constant", learning_rate, 0)
  run = tmp_path / name
  train.train(
      model=model, train_dataset_cfg=train_data.DatasetConfig(TASK, {"inputs": 88, "targets": 16},
                                                              batch_size=2),
      model_dir=str(run), total_steps=2, random_seed=seed,
      trainer_cls=functools.partial(trainer.Trainer, learning_rate_fn=schedule),
      checkpoint_cfg=tc.CheckpointConfig(save=tc.SaveCheckpointConfig(period=None, keep=1)),
      num_retrieval_keys=0, eval_before_and_after=False, summarize_config_fn=None,
      show_progress=False, init_expert_path=init)
  return str(run / "expert")


def test_training_starts_from_the_given_expert(tmp_path):
  """With a zero learning rate, fine-tuning leaves the start expert's tensors as they were (read
  back by the expert format's own reader; to float32 rounding of the step's arithmetic, 1e-6
  relative, while a step at 1e-2 moves them by about 1e-2); with a real one, it moves them."""
  from expert_t5x import expert_format, trees  # pylint: disable=g-import-not-at-top
  first = _train(tmp_path, "first", _model(), 1e-2)
  again = _train(tmp_path, "again", _model(), 0.0, init=first)
  moved = _train(tmp_path, "moved", _model(), 1e-2, init=first)
  a, b, c = (trees.flatten(expert_format.load_expert(p)[0]) for p in (first, again, moved))
  assert a.keys() == b.keys() == c.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
  assert max(float(np.max(np.abs(a[k] - c[k]))) for k in a) > 1e-3
  # A fresh init differs from the trained expert, so the zero-rate run did start from `first`.
  fresh = trees.flatten(expert_format.load_expert(_train(tmp_path, "fresh", _model(), 0.0))[0])
  assert max(float(np.max(np.abs(a[k] - fresh[k]))) for k in a) > 1e-3

  with pytest.raises(ValueError, match="'adapter' expert, but this run trains 'lora' experts"):
    _train(tmp_path, "lora", _model(lora=True), 0.0, init=first)
  with pytest.raises(ValueError, match="has other parameters than this run's adapter config"):
    _train(tmp_path, "wide", _model(reduction_factor=2), 0.0, init=first)
  with pytest.raises(ValueError, match="was trained on another base"):
    _train(tmp_path, "other_base", _model(), 0.0, seed=1, init=first)


def test_negative_retrieval_key_count_is_refused_before_anything_is_written(tmp_path):
  from expert_t5x import train, train_data, validation  # pylint: disable=g-import-not-at-top
  with pytest.raises(validation.UsageError, match="NUM_RETRIEVAL_KEYS=-1"):
    train.train(model=_model(), model_dir=str(tmp_path / "run"), total_steps=1,
                train_dataset_cfg=train_data.DatasetConfig(TASK, {"inputs": 88, "targets": 16},
                                                           batch_size=2),
                num_retrieval_keys=-1, summarize_config_fn=None, show_progress=False)
  assert not (tmp_path / "run").exists()
