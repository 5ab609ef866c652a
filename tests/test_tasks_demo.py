"""Synthetic demo tasks: determinism, schema, labels consistent with the generating rule, suites.

Labels are checked against the task's rule recomputed here from the rendered text (an
independent reading of the example), not against the generator's own label.
"""

import collections
import re

import pytest

pytestmark = pytest.mark.tf

import seqio_tasks  # noqa: E402
from seqio_tasks import demo, examples  # noqa: E402


def test_generate_is_deterministic_prefix_stable_and_split_specific():
  a = demo.generate("demo_sentiment_review", "train", 50, seed=3)
  assert a == demo.generate("demo_sentiment_review", "train", 50, seed=3)
  assert a[:20] == demo.generate("demo_sentiment_review", "train", 20, seed=3)
  assert a != demo.generate("demo_sentiment_review", "train", 50, seed=4)
  assert [e["inputs"] for e in a] != [
      e["inputs"] for e in demo.generate("demo_sentiment_review", "validation", 50, seed=3)]
  for i, ex in enumerate(a):
    examples.validate_example(ex, where=f"example {i}")


def test_prompts_of_a_task_share_rows_and_choices():
  review = demo.generate("demo_sentiment_review", "validation", 30)
  tone = demo.generate("demo_sentiment_tone", "validation", 30)
  assert [e["label_index"] for e in review] == [e["label_index"] for e in tone]
  assert {tuple(e["answer_choices"]) for e in review + tone} == {("positive", "negative")}
  assert review[0]["inputs"] != tone[0]["inputs"]


def _words(text):
  return re.findall(r"[a-z]+", text)


def test_labels_follow_each_rule():
  for ex in demo.generate("demo_sentiment_feeling", "train", 200):
    words = set(_words(ex["inputs"]))
    gold = "positive" if words & set(demo.POSITIVE) else "negative"
    assert ex["targets"] == gold and not (words & set(demo.POSITIVE) and words & set(demo.NEGATIVE))
  for ex in demo.generate("demo_topic_classify", "train", 200):
    counts = collections.Counter(t for w in _words(ex["inputs"]) for t, lex in demo.TOPICS.items()
                                 if w in lex)
    assert ex["targets"] == counts.most_common(1)[0][0]
  for ex in demo.generate("demo_overlap_contains", "train", 200):
    premise = ex["inputs"].split("\n")[0][len("Premise: "):].split()
    hypothesis = ex["inputs"].split("\n")[1][len("Hypothesis: "):].split()
    negated = set(hypothesis) & set(demo.NEGATIONS)
    assert set(hypothesis) - negated <= set(premise)
    assert ex["targets"] == ("no" if negated else "yes")
  for ex in demo.generate("demo_parity_parity_of", "train", 200):
    assert ex["targets"] == ("even" if ex["inputs"].split("\n")[0].split().count("a") % 2 == 0
                             else "odd")
  for ex in demo.generate("demo_copy_repeat", "train", 20):
    assert ex["inputs"] == "Repeat: " + ex["targets"] and ex["answer_choices"] == []


def test_classes_are_balanced_enough_to_learn():
  for task in ("demo_sentiment_review", "demo_topic_about", "demo_length_size"):
    counts = collections.Counter(e["targets"] for e in demo.generate(task, "train"))
    assert len(counts) >= 2 and min(counts.values()) > 0.5 * sum(counts.values()) / len(counts)


def test_suites_roles_and_registration():
  train, heldout = seqio_tasks.suite("demo_train"), seqio_tasks.suite("demo_heldout")
  assert "demo_copy_repeat" in train and "demo_sentiment_tone" not in train
  assert "demo_sentiment_tone_score_eval" in heldout
  assert "demo_membership_in_list_score_eval" in heldout
  assert not set(heldout) & {t + "_score_eval" for t in train}
  info = seqio_tasks.get_info("demo_membership_member_score_eval")
  assert (info.role, info.vocabulary, info.base_task) == ("heldout", "bytes",
                                                          "demo_membership_member")
  assert seqio_tasks.load_examples("demo_topic_about", "validation", 5) == demo.generate(
      "demo_topic_about", "validation", 5)


def test_unknown_demo_task_suggests_close_names():
  with pytest.raises(KeyError, match="demo_sentiment_review"):
    demo.generate("demo_sentiment_reviw", "train", 1)
  with pytest.raises(ValueError, match="demo split 'dev'"):
    demo.generate("demo_sentiment_review", "dev", 1)
