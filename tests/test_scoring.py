"""One scoring engine: `infer`, RoE's label-free query scoring and training's accuracy check score
through `expert_t5x.scoring` and give its numbers; the accuracy check also equals an independent
computation (one fixed-shape batch scored by `model.score_choices`, as the check used to)."""

import jax
import numpy as np
import pytest

from expert_t5x import base_models
from expert_t5x import eval_experts
from expert_t5x import expert_format
from expert_t5x import experts as experts_lib
from expert_t5x import infer
from expert_t5x import models
from expert_t5x import network
from expert_t5x import partitioning
from expert_t5x import routed_evaluation as roe
from expert_t5x import scoring

import eval_fakes

LENGTHS = {"inputs": 64, "targets": None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("engine")
  base, expert = eval_fakes.tiny_base_and_adapter(str(root), 5)
  return base, expert


def _engine_scores(base, expert_dir, examples, vocabulary, lengths, batch_size=8):
  """[N, K] scores of the examples under the expert, straight from the Scorer."""
  scorer = scoring.Scorer(base.config, base.params, partitioning.PjitPartitioner(),
                          scoring.ScoringOptions())
  scorer.set_chunk(eval_experts.expert_chunk(expert_dir, "e"))
  encoded, _ = scoring.encode_examples(examples, vocabulary, lengths, scoring=True)
  out = scorer.score_encoded(encoded, batch_size)
  return [out[i][0][:len(ex["answer_choices"])] for i, ex in enumerate(examples)]


def test_infer_and_query_scores_are_the_engines(setup):
  base, expert = setup
  vocabulary = eval_fakes.CharVocabulary()
  examples = eval_fakes.make_source().examples("nli_p1", "validation", None)
  want = _engine_scores(base, expert, examples, vocabulary, LENGTHS)
  got = infer.infer(inputs=[{"inputs": ex["inputs"], "answer_choices": ex["answer_choices"]}
                            for ex in examples], mode="score", model_config="tiny",
                    random_init_seed=0, config_overrides={"vocab_size": eval_fakes.VOCAB_SIZE},
                    expert_path=expert, vocabulary=vocabulary, batch_size=8,
                    max_input_length=LENGTHS["inputs"])
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.float32(g["scores"]), w)
  scorer = scoring.Scorer(base.config, base.params, partitioning.PjitPartitioner(),
                          scoring.ScoringOptions())
  queries = roe.query_choice_scores(scorer, expert, examples, vocabulary, LENGTHS, 8)
  assert queries.shape == (len(examples), max(len(w) for w in want))
  for q, w in zip(queries, want):
    np.testing.assert_array_equal(np.float32(q[:len(w)]), w)
    assert np.all(np.isneginf(q[len(w):]))


@pytest.mark.tf
def test_train_accuracy_is_the_engines_and_equals_an_independent_computation(tmp_path):
  from expert_t5x import train  # pylint: disable=g-import-not-at-top
  task_name = "demo_sentiment_review"
  lengths = {"inputs": 128, "targets": 8}
  config = network.get_config("tiny", vocab_size=512)
  params = jax.tree.map(np.asarray, base_models.load_base(
      model_config="tiny", random_init_seed=0, config_overrides={"vocab_size": 512}).params)
  cfg = experts_lib.AdapterConfig(reduction_factor=4, init_seed=3)
  path = str(tmp_path / "expert")
  expert_format.save_expert(path, experts_lib.init_expert(cfg, config, params),
                            expert_format.build_metadata("adapter", experts_lib.config_to_json(cfg),
                                                         base_fingerprint=None,
                                                         base_config_name="tiny"))
  expert = expert_format.load_expert(path)[0]
  model = models.EncoderDecoderModel(network.Transformer(config), expert_config=cfg)
  accuracy, chance = train.rank_classification_accuracy(model, params, expert, task_name, lengths,
                                                        max_examples=24)

  # The same examples, read as the check reads them.
  task = train.train_data.get_task(task_name)
  vocabulary = task.output_features["targets"].vocabulary
  rows = []
  for ex in task.get_dataset(sequence_length=lengths, split="validation", shuffle=False,
                             num_epochs=1).take(24).as_numpy_iterator():
    choices = [c.decode() for c in ex["answer_choices"]]
    target = ex["targets_pretokenized"].decode().strip()
    if target in [c.strip() for c in choices]:
      rows.append((ex, choices, [c.strip() for c in choices].index(target)))
  assert len(rows) > 8
  assert chance == pytest.approx(np.mean([1.0 / len(c) for _, c, _ in rows]))
  examples = [{"inputs": ex["inputs_pretokenized"].decode(), "answer_choices": c, "label_index": y}
              for ex, c, y in rows]
  labels = np.asarray([y for _, _, y in rows])

  # The engine: the Scorer's scores of those examples under the expert.
  base = base_models.BaseModel(params, config, "random", None)
  engine = _engine_scores(base, path, examples, vocabulary, lengths)
  assert accuracy == float(np.mean([int(np.argmax(s)) for s in engine] == labels))

  # Independent: the dataset's own tokens in one fixed-shape batch, scored by the model directly.
  k = max(len(c) for _, c, _ in rows)
  enc = np.zeros((len(rows), lengths["inputs"]), np.int32)
  dec = np.zeros((len(rows), k, lengths["targets"]), np.int32)
  for i, (ex, choices, _) in enumerate(rows):
    enc[i, :len(ex["inputs"])] = ex["inputs"]
    for j, c in enumerate(choices):
      ids = list(vocabulary.encode(c))[:lengths["targets"] - 1] + [1]
      dec[i, j, :len(ids)] = ids
  scores = np.asarray(jax.jit(lambda p, e, x, c: model.score_choices(p, x, c, expert=e))(
      params, expert, enc, dec))
  assert accuracy == float(np.mean(np.argmax(scores, -1) == labels))
  for s, e in zip(scores, engine):
    np.testing.assert_allclose(s[:len(e)], e, rtol=1e-5, atol=1e-5)
