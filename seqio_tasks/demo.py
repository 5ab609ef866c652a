"""Synthetic demo tasks: tiny, deterministic, learnable by a tiny T5 on a CPU in minutes.

Each base task draws rows from a seeded generator over a small word list; several prompts render
the same rows, and all prompts of a task share one answer-choice set. Training tasks keep some
prompts held out, and some tasks are held out entirely, so the expert / retrieval / merging
pipeline can be exercised end to end. `expert-t5x demo` uses the tasks and prompts marked
`pipeline` (the others stay registered for the task tools and tests):

| task         | kind                                 | choices               | train | held-out |
|--------------|--------------------------------------|-----------------------|-------|----------|
| sentiment    | keyword                              | positive / negative   | 3 (2) | 1        |
| topic        | keyword                              | sports / food / music | 3 (2) | 1        |
| overlap      | NLI-like (negation cue)              | yes / no              | 3 (2) | 1        |
| length       | counting                             | short / long          | 3 (2) | 0        |
| flipped_length | length's rows, labels flipped      | short / long          | 2     | 0        |
| animal       | keyword, added later (continual)     | cat / dog / bird      | 1     | 0        |
| color        | keyword, added later (continual)     | red / blue            | 1     | 0        |
| review_topic | held-out task: sentiment x topic     | 6 "<tone> <topic>"    | 0     | 2        |
| copy         | generation                           | (none)                | 2 (-) | 0        |
| membership   | held-out task                        | yes / no              | 0     | 3 (-)    |
| parity       | held-out task                        | even / odd            | 0     | 2 (-)    |

(In parentheses: how many the demo pipeline uses.) `flipped_length` conflicts with `length` on
purpose (the same inputs, the opposite label under an instruction one word apart: negative
transfer for one model trained on both); `review_topic` needs what `sentiment` and `topic` teach
together.

Task names: `demo_<task>_<prompt>` (+ `_score_eval` for classification). The vocabulary is
`seqio.ByteVocabulary` (no file). `generate(task, split, n, seed)` returns canonical examples
without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Optional

from seqio_tasks import examples as examples_lib

FILLER = ("the", "a", "cat", "dog", "bird", "sat", "ran", "on", "mat", "big", "small", "red",
          "blue", "we", "saw", "it")
# Keywords share no word with FILLER and differ from it in more than one byte (an earlier
# lexicon's "sad" vs the filler "sat" kept a byte-level tiny T5 near chance).
POSITIVE = ("great", "happy", "lovely", "superb")
NEGATIVE = ("awful", "boring", "horrid", "nasty")
NEGATIONS = ("not", "nobody")
TOPICS = {"sports": ("ball", "goal", "team", "match"), "food": ("bread", "soup", "apple", "cake"),
          "music": ("song", "drum", "piano", "band")}
TOPIC_CHOICES = ("sports", "food", "music")
ANIMALS = ("cat", "dog", "bird")  # filler words: a row holds exactly one of them
COLORS = ("red", "blue")
REVIEW_TOPIC_CHOICES = tuple(f"{tone} {topic}" for tone in ("positive", "negative")
                             for topic in TOPIC_CHOICES)
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
PREFIX = "demo_"


@dataclasses.dataclass(frozen=True)
class DemoPrompt:
  name: str
  template: str  # str.format over the row's fields
  heldout: bool = False
  pipeline: bool = True  # used by `expert-t5x demo`


@dataclasses.dataclass(frozen=True)
class DemoTask:
  name: str
  choices: Optional[tuple[str, ...]]
  row_fn: Callable[[random.Random], dict[str, Any]]  # -> fields + 'label' (index) or 'target'
  prompts: tuple[DemoPrompt, ...]
  heldout_task: bool = False
  pipeline: bool = True  # used by `expert-t5x demo`
  continual: bool = False  # trained after the library is built (the demo's continual stage)
  rows_of: Optional[str] = None  # draw the rows of this task (same inputs), e.g. flipped_length's


def _words(rng: random.Random, k: int) -> list[str]:
  return [rng.choice(FILLER) for _ in range(k)]


def _sentiment(rng: random.Random) -> dict[str, Any]:
  # Two keywords of one polarity among fillers, like the topic task's two topic words.
  label = rng.randrange(2)
  lexicon = POSITIVE if label == 0 else NEGATIVE
  words = _words(rng, rng.randint(2, 4)) + [rng.choice(lexicon), rng.choice(lexicon)]
  rng.shuffle(words)
  return {"text": " ".join(words), "label": label}


def _topic(rng: random.Random) -> dict[str, Any]:
  label = rng.randrange(3)
  lexicon = TOPICS[TOPIC_CHOICES[label]]
  words = _words(rng, 3) + [rng.choice(lexicon), rng.choice(lexicon)]
  rng.shuffle(words)
  return {"text": " ".join(words), "label": label}


def _overlap(rng: random.Random) -> dict[str, Any]:
  # The hypothesis repeats two premise words; a negation word contradicts it. (A version whose
  # "no" hypotheses held words missing from the premise needs word-by-word comparison, which
  # adapters on the 2-layer demo base did not learn: 52-64% after 900 steps.)
  premise = rng.sample(FILLER, rng.randint(4, 6))
  label = rng.randrange(2)
  hypothesis = rng.sample(premise, 2)
  if label == 1:
    hypothesis.insert(rng.randrange(3), rng.choice(NEGATIONS))
  return {"premise": " ".join(premise), "hypothesis": " ".join(hypothesis), "label": label}


def _flipped_length(rng: random.Random) -> dict[str, Any]:
  row = _length(rng)
  return dict(row, label=1 - row["label"])


def _one_of(rng: random.Random, choices: tuple[str, ...]) -> dict[str, Any]:
  """Fillers with exactly one of `choices` (the label) among them."""
  label = rng.randrange(len(choices))
  words = [w for w in _words(rng, rng.randint(3, 5)) if w not in choices] + [choices[label]]
  rng.shuffle(words)
  return {"text": " ".join(words), "label": label}


def _review_topic(rng: random.Random) -> dict[str, Any]:
  # Two keywords of one polarity and two of one topic among fillers: each half is a row of the
  # sentiment or topic task, and the label names both.
  tone, topic = rng.randrange(2), rng.randrange(len(TOPIC_CHOICES))
  polar = POSITIVE if tone == 0 else NEGATIVE
  lexicon = TOPICS[TOPIC_CHOICES[topic]]
  words = _words(rng, rng.randint(1, 2)) + [rng.choice(polar), rng.choice(polar),
                                            rng.choice(lexicon), rng.choice(lexicon)]
  rng.shuffle(words)
  return {"text": " ".join(words), "label": tone * len(TOPIC_CHOICES) + topic}


def _length(rng: random.Random) -> dict[str, Any]:
  label = rng.randrange(2)
  return {"text": " ".join(_words(rng, rng.randint(1, 3) if label == 0 else rng.randint(6, 8))),
          "label": label}


def _copy(rng: random.Random) -> dict[str, Any]:
  text = " ".join(_words(rng, rng.randint(2, 5)))
  return {"text": text, "target": text}


def _membership(rng: random.Random) -> dict[str, Any]:
  items = rng.sample(FILLER, 4)
  label = rng.randrange(2)
  query = rng.choice(items) if label == 0 else rng.choice([w for w in FILLER if w not in items])
  return {"items": " ".join(items), "query": query, "label": label}


def _parity(rng: random.Random) -> dict[str, Any]:
  count = rng.randint(1, 4)
  letters = ["a"] * count + ["b"] * rng.randint(1, 3)
  rng.shuffle(letters)
  return {"text": " ".join(letters), "label": count % 2}


TASKS: dict[str, DemoTask] = {t.name: t for t in (
    DemoTask("sentiment", ("positive", "negative"), _sentiment, (
        DemoPrompt("review", "Review: {text}\nIs this review positive or negative?"),
        DemoPrompt("feeling", "{text}\nHow does the writer feel, positive or negative?"),
        DemoPrompt("sentiment_of", "What is the sentiment of: {text}", pipeline=False),
        DemoPrompt("tone", "Is the tone of \"{text}\" positive or negative?", heldout=True))),
    DemoTask("topic", TOPIC_CHOICES, _topic, (
        DemoPrompt("topic_is", "Text: {text}\nTopic (sports, food or music)?"),
        DemoPrompt("classify", "Classify into sports, food or music: {text}"),
        DemoPrompt("about", "{text}\nWhat is this about?", pipeline=False),
        DemoPrompt("category", "Which category fits \"{text}\": sports, food or music?",
                   heldout=True))),
    DemoTask("overlap", ("yes", "no"), _overlap, (
        DemoPrompt("follows", "{premise}\nDoes it mention {hypothesis}? yes or no"),
        DemoPrompt("contains", "Premise: {premise}\nHypothesis: {hypothesis}\nEntailed?"),
        DemoPrompt("both_words", "Are both of \"{hypothesis}\" in \"{premise}\"?",
                   pipeline=False),
        DemoPrompt("supported", "Given {premise}, is {hypothesis} supported? yes or no",
                   heldout=True))),
    DemoTask("length", ("short", "long"), _length, (
        DemoPrompt("short_or_long", "Is this short or long: {text}"),
        DemoPrompt("size", "{text}\nSize?"),
        DemoPrompt("how_long", "How long is \"{text}\", short or long?", pipeline=False))),
    # Conflicts with length: the same rows, the opposite label, an instruction that differs by
    # one word. (Conflicting with a task that has held-out prompts would leave retrieval a coin
    # flip between the two tasks' experts on those prompts: a sarcasm task worded like
    # sentiment's prompts drew half the votes of sentiment's held-out prompt.)
    DemoTask("flipped_length", ("short", "long"), _flipped_length, (
        DemoPrompt("flipped_short_or_long", "Flipped: is this short or long: {text}"),
        DemoPrompt("flipped_size", "{text}\nSize, flipped?")), rows_of="length"),
    DemoTask("animal", ANIMALS, lambda rng: _one_of(rng, ANIMALS), (
        DemoPrompt("which_animal", "Which animal is in \"{text}\": cat, dog or bird?"),),
             continual=True),
    DemoTask("color", COLORS, lambda rng: _one_of(rng, COLORS), (
        DemoPrompt("which_color", "Text: {text}\nColor (red or blue)?"),), continual=True),
    DemoTask("review_topic", REVIEW_TOPIC_CHOICES, _review_topic, (
        DemoPrompt("tone_and_topic", "Review: {text}\nPositive or negative, and which topic?"),
        DemoPrompt("two_labels", "{text}\nTone and topic?")), heldout_task=True),
    DemoTask("copy", None, _copy, (
        DemoPrompt("repeat", "Repeat: {text}"),
        DemoPrompt("echo", "Say again: {text}")), pipeline=False),
    DemoTask("membership", ("yes", "no"), _membership, (
        DemoPrompt("in_list", "List: {items}\nIs {query} in the list? yes or no"),
        DemoPrompt("contains", "Does \"{items}\" contain {query}?"),
        DemoPrompt("member", "{query} among {items}? yes or no")), heldout_task=True,
             pipeline=False),
    DemoTask("parity", ("even", "odd"), _parity, (
        DemoPrompt("count_a", "Is the number of a in \"{text}\" even or odd?"),
        DemoPrompt("parity_of", "{text}\nParity of a?")), heldout_task=True, pipeline=False),
)}


def prompt_task_name(task: str, prompt: str) -> str:
  return f"{PREFIX}{task}_{prompt}"


def _all_prompt_tasks() -> dict[str, tuple[DemoTask, DemoPrompt]]:
  return {prompt_task_name(t.name, p.name): (t, p) for t in TASKS.values() for p in t.prompts}


def resolve(task: str) -> tuple[DemoTask, DemoPrompt]:
  """(task, prompt) of a demo prompt-task name (a `_score_eval` suffix is accepted)."""
  base = task[:-len("_score_eval")] if task.endswith("_score_eval") else task
  table = _all_prompt_tasks()
  if base not in table:
    from seqio_tasks import names  # pylint: disable=g-import-not-at-top
    raise names.unknown_name_error("demo task", task, list(table))
  return table[base]


def role(task: DemoTask, prompt: DemoPrompt) -> str:
  return "heldout" if task.heldout_task or prompt.heldout else "train"


def generate(task: str, split: str = "train", n: Optional[int] = None,
             seed: int = 0) -> list[dict[str, Any]]:
  """`n` canonical examples of a demo prompt task (default: the split's size), deterministic.

  Row i of a split is a pure function of (seed, base task, split, i): every prompt of a task
  renders the same rows, and the first k examples do not depend on n.
  """
  base, prompt = resolve(task)
  if split not in SPLIT_SIZES:
    raise ValueError(f"demo split {split!r} is not one of {sorted(SPLIT_SIZES)}.")
  n = SPLIT_SIZES[split] if n is None else n
  out = []
  for i in range(n):
    row = base.row_fn(random.Random(f"{seed}/{base.rows_of or base.name}/{split}/{i}"))
    inputs = prompt.template.format(**row)
    if base.choices is None:
      out.append(examples_lib.make_example(
          inputs=inputs, targets=row["target"], answer_choices=[], example_id=i,
          dataset=PREFIX + base.name, subset="", prompt=prompt.name, label_index=-1))
    else:
      out.append(examples_lib.make_example(
          inputs=inputs, targets=base.choices[row["label"]], answer_choices=list(base.choices),
          example_id=i, dataset=PREFIX + base.name, subset="", prompt=prompt.name,
          label_index=row["label"]))
  return out


def train_tasks() -> list[str]:
  """Generation-mode names of the training prompts (the `demo_train` mixture)."""
  return [name for name, (t, p) in _all_prompt_tasks().items() if role(t, p) == "train"]


def heldout_tasks() -> list[str]:
  """Rank-classification names of the held-out prompts and tasks (the `demo_heldout` suite)."""
  return [name + "_score_eval" for name, (t, p) in _all_prompt_tasks().items()
          if role(t, p) == "heldout"]


def train_score_eval_tasks() -> list[str]:
  """Rank-classification names of the training prompts with choices (seen-task evaluation)."""
  return [name + "_score_eval" for name, (t, p) in _all_prompt_tasks().items()
          if role(t, p) == "train" and t.choices is not None]


def register_all() -> list[str]:
  """Registers every demo prompt task (+ `_score_eval` for classification) with seqio."""
  from seqio_tasks import metrics, provenance, registry, vocab  # pylint: disable=g-import-not-at-top
  from seqio_tasks.sources import canonical  # pylint: disable=g-import-not-at-top
  added = []
  for name, (task, prompt) in _all_prompt_tasks().items():
    variants = [(name, False)] + ([(name + "_score_eval", True)] if task.choices else [])
    for task_name, scoring in variants:
      source = canonical.CanonicalSource(
          name=task_name, splits=tuple(SPLIT_SIZES),
          python_fn=lambda split, n=name: iter(generate(n, split)),
          dataset=PREFIX + task.name, subset=None, prompt=prompt.name, dir_names=(task_name,))
      info = provenance.TaskInfo(
          name=task_name, kind="score_eval" if scoring else "prompt", source="demo",
          dataset=PREFIX + task.name, subset=None, prompt=prompt.name, role=role(task, prompt),
          original_task=True, eval_dataset=PREFIX + task.name, has_choices=task.choices is not None,
          splits=tuple(SPLIT_SIZES), vocabulary="bytes", base_task=name if scoring else None)
      registry.add_task(info, source, vocabulary=vocab.DEMO_VOCABULARY, scoring=scoring,
                        metric_fns=[metrics.accuracy],
                        num_classes=len(task.choices) if (scoring and task.choices) else None)
      added.append(task_name)
  return added
