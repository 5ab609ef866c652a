"""Preprocessors: rank classification (T5's three modes) and canonical-example helpers.

`rank_classification` follows T5's `t5.data.preprocessors.rank_classification` contract (seqio has
none): each example becomes N candidates with `idx = [example, choice]`, `inputs`, `targets`,
`is_correct` and an optional `weight`;

* `mode="eval"`: one row per candidate (what `seqio.Evaluator` with a score metric consumes);
* `mode="fewshot_eval"`: the N candidates stay together in one element (what
  `EncoderDecoderModel.score_choices` consumes);
* `mode="train"`: one row per candidate, only the correct ones kept.

It runs on strings, so place it before `seqio.preprocessors.tokenize`. The Python twin
`rank_classification_rows` does the same on canonical example dicts without TensorFlow.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

MODES = ("train", "eval", "fewshot_eval")


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"rank_classification mode {mode!r} is not one of {MODES}.")


def rank_classification(ds, inputs_fn: Callable, targets_fn: Callable, is_correct_fn: Callable,
                        weight_fn: Optional[Callable] = None, mode: str = "eval",
                        passthrough_feature_keys: Optional[Sequence[str]] = None,
                        idx_key: Optional[str] = None):
  """Expands each example into one candidate per choice (see the module docstring).

  Args:
    ds: a tf.data.Dataset of examples.
    inputs_fn: example -> [N] string inputs (usually the input tiled N times).
    targets_fn: example -> [N] string candidates.
    is_correct_fn: example -> [N] bool.
    weight_fn: optional example -> scalar float weight.
    mode: 'train', 'eval' or 'fewshot_eval'.
    passthrough_feature_keys: features copied (tiled to N) into every candidate.
    idx_key: an int feature used as `idx[0]` (e.g. 'example_id', unique across hosts); by default
      the position in `ds`, as in T5.

  Returns:
    The expanded dataset.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _check_mode(mode)

  def expand(position, ex):
    inputs, targets = inputs_fn(ex), targets_fn(ex)
    is_correct = tf.cast(is_correct_fn(ex), tf.bool)
    n = tf.shape(targets)[0]
    first = tf.cast(ex[idx_key] if idx_key else position, tf.int32)
    out = {
        "idx": tf.stack([tf.fill([n], first), tf.range(n, dtype=tf.int32)], axis=1),
        "inputs": inputs, "targets": targets, "is_correct": is_correct,
    }
    if weight_fn is not None:
      out["weight"] = tf.fill([n], tf.cast(weight_fn(ex), tf.float32))
    for key in passthrough_feature_keys or ():
      value = ex[key]
      out[key] = tf.tile(tf.expand_dims(value, 0),
                         tf.concat([[n], tf.ones([tf.rank(value)], tf.int32)], axis=0))
    return out

  ds = ds.enumerate().map(expand, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if mode != "fewshot_eval":
    ds = ds.unbatch()
  if mode == "train":
    ds = ds.filter(lambda ex: ex["is_correct"])
  return ds


def rank_classification_canonical(ds, mode: str = "eval",
                                  passthrough_feature_keys: Optional[Sequence[str]] = None):
  """`rank_classification` on canonical examples: candidates = answer choices, gold = label_index.

  `idx[0]` is the example id, so rows stay unique across shards and hosts. An example whose target
  is not among its choices keeps all its rows with `is_correct` false (it counts as an error).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def tiled_inputs(ex):
    return tf.fill(tf.shape(ex["answer_choices"]), ex["inputs"])

  def is_correct(ex):
    n = tf.shape(ex["answer_choices"])[0]
    return tf.equal(tf.range(n, dtype=tf.int32), tf.cast(ex["label_index"], tf.int32))

  return rank_classification(ds, inputs_fn=tiled_inputs, targets_fn=lambda ex: ex["answer_choices"],
                             is_correct_fn=is_correct, weight_fn=lambda ex: 1.0, mode=mode,
                             passthrough_feature_keys=passthrough_feature_keys,
                             idx_key="example_id")


def rank_classification_rows(examples: Iterable[Mapping[str, Any]],
                             mode: str = "eval") -> list[dict[str, Any]]:
  """Python twin of `rank_classification_canonical` on canonical example dicts."""
  _check_mode(mode)
  out: list[dict[str, Any]] = []
  for ex in examples:
    choices = list(ex["answer_choices"])
    rows = [{"idx": [int(ex["example_id"]), j], "inputs": ex["inputs"], "targets": choice,
             "is_correct": j == ex["label_index"], "weight": 1.0}
            for j, choice in enumerate(choices)]
    if mode == "fewshot_eval":
      out.append({"idx": [r["idx"] for r in rows], "inputs": [r["inputs"] for r in rows],
                  "targets": choices, "is_correct": [r["is_correct"] for r in rows],
                  "weight": [1.0] * len(rows)})
    elif mode == "train":
      out.extend(r for r in rows if r["is_correct"])
    else:
      out.extend(rows)
  return out

