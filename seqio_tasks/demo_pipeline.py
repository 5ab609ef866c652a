"""Tasks the demo pipeline adds to the synthetic demo tasks: a pre-training corpus and dataset
tasks.

* `demo_pretrain_corpus`: T5-style span corruption over synthetic sentences drawn from a lexicon
  that shares no word with the demo tasks (their fillers, keywords, templates and answer choices),
  so pre-training teaches the tiny base bytes, words and copying without seeing any task.
  Input `the old boat [0] across the [1]`, target `[0] drifted slowly [1] lake`.
* `demo_<task>_all_prompts`: every training prompt of one demo task, concatenated (the dataset
  expert's data, as T0's `<ds>_all_prompts`), with provenance listing its member prompts.
* `demo_expert_train`: the mixture of the training prompts with answer choices (the multitask
  baseline's data: the same tasks the experts train on).
* `demo_continual_train`: the mixture of the tasks added after the library is built (the
  continual stage fine-tunes the multitask adapter on them alone).

Only the tasks and prompts marked `pipeline` in `seqio_tasks.demo` take part.

Everything is generated deterministically from (seed, split, index) and tokenized with the demo's
byte vocabulary.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any, Iterator

from seqio_tasks import demo
from seqio_tasks import examples as examples_lib

CORPUS_TASK = "demo_pretrain_corpus"
MULTITASK_MIXTURE = "demo_expert_train"
CONTINUAL_MIXTURE = "demo_continual_train"
ALL_MIXTURE = "demo_all_train"  # earlier and new training prompts: a multitask model retrained
MIXTURES = (MULTITASK_MIXTURE, CONTINUAL_MIXTURE, ALL_MIXTURE)
ALL_PROMPTS_SUFFIX = "_all_prompts"
CORPUS_SPLITS = {"train": 20000, "validation": 200}

# A generic lexicon; words used anywhere by the demo tasks are removed below (see `corpus_words`).
_LEXICON = (
    "old new boat lake river hill tree house road car train city town farm field garden window "
    "door "
    "table chair book paper letter pen cup plate spoon glass water milk tea coffee rain snow wind "
    "sun "
    "moon star cloud sky morning evening night day week year summer winter spring autumn man woman "
    "child boy girl friend teacher doctor farmer driver king queen horse cow sheep goat fish duck "
    "walked drifted climbed opened closed carried found lost built painted read wrote cooked "
    "washed "
    "slowly quickly quietly loudly gently early late often never always soon across under over "
    "near behind beside into from with without before after during green yellow white black brown "
    "warm cold wet dry soft hard tall low bright dark quiet busy empty full young ancient heavy "
    "light"
)
SENTINEL = "[{}]"
MAX_SENTINELS = 2


def _task_vocabulary() -> set[str]:
  """Every lower-cased word the demo tasks can produce: fillers, keywords, templates, choices."""
  words = set(demo.FILLER) | set(demo.POSITIVE) | set(demo.NEGATIVE) | set(demo.NEGATIONS)
  for lexicon in demo.TOPICS.values():
    words |= set(lexicon)
  for task in demo.TASKS.values():
    words |= set(task.choices or ())
    for prompt in task.prompts:
      words |= set(re.findall(r"[a-z]+", prompt.template.lower()))
  return words


def corpus_words() -> tuple[str, ...]:
  """The corpus lexicon: generic words that no demo task uses."""
  banned = _task_vocabulary()
  return tuple(w for w in dict.fromkeys(_LEXICON.split()) if w not in banned)


def span_corruption(words: list[str], rng: random.Random) -> tuple[str, str]:
  """(inputs, targets): 1-2 spans of 1-2 words replaced by numbered sentinels, as T5 does.

  Span starts are 3 words apart, so spans never touch.
  """
  num_spans = rng.randint(1, min(MAX_SENTINELS, max(1, len(words) // 3)))
  starts = sorted(rng.sample(range(0, len(words), 3), num_spans))
  inputs, targets, pos = [], [], 0
  for i, start in enumerate(starts):
    end = min(len(words), start + rng.randint(1, 2))
    inputs += words[pos:start] + [SENTINEL.format(i)]
    targets += [SENTINEL.format(i)] + words[start:end]
    pos = end
  inputs += words[pos:]
  return " ".join(inputs), " ".join(targets)


def corpus_example(split: str, index: int, seed: int = 0) -> dict[str, Any]:
  """Corpus row `index` of `split`: a pure function of (seed, split, index)."""
  rng = random.Random(f"{seed}/corpus/{split}/{index}")
  lexicon = corpus_words()
  words = [rng.choice(lexicon) for _ in range(rng.randint(5, 12))]
  inputs, targets = span_corruption(words, rng)
  return examples_lib.make_example(inputs=inputs, targets=targets, answer_choices=[],
                                   example_id=index, dataset=CORPUS_TASK, subset="",
                                   prompt="span_corruption", label_index=-1)


def iter_corpus(split: str, seed: int = 0) -> Iterator[dict[str, Any]]:
  for i in range(CORPUS_SPLITS[split]):
    yield corpus_example(split, i, seed)


def _pipeline_prompts(continual: bool) -> list[str]:
  out = []
  for name in demo.train_score_eval_tasks():
    task, prompt = demo.resolve(name)
    if task.pipeline and prompt.pipeline and task.continual == continual:
      out.append(name[:-len("_score_eval")])
  return out


def expert_train_tasks() -> list[str]:
  """The training prompts with answer choices (one prompt expert each), before the continual
  stage."""
  return _pipeline_prompts(continual=False)


def continual_tasks() -> list[str]:
  """The training prompts added after the library is built (one prompt expert each)."""
  return _pipeline_prompts(continual=True)


def heldout_tasks() -> list[str]:
  """The held-out eval prompts (`_score_eval`) the demo evaluates."""
  out = []
  for name in demo.heldout_tasks():
    task, prompt = demo.resolve(name)
    if task.pipeline and prompt.pipeline:
      out.append(name)
  return out


def dataset_tasks() -> dict[str, list[str]]:
  """{`demo_<task>_all_prompts`: its member training prompts} for tasks with answer choices."""
  out: dict[str, list[str]] = {}
  for name in expert_train_tasks():
    base, _ = demo.resolve(name)
    out.setdefault(demo.PREFIX + base.name + ALL_PROMPTS_SUFFIX, []).append(name)
  return out


def iter_all_prompts(members: list[str], split: str) -> Iterator[dict[str, Any]]:
  """The member prompts' examples, one prompt after another (as T0's `_all_prompts`)."""
  return itertools.chain.from_iterable(demo.generate(m, split) for m in members)


def register() -> list[str]:
  """Registers the corpus, the dataset tasks and the multitask mixture with seqio (idempotent: the
  demo and its tests call it again in one process, replacing the identical tasks)."""
  from seqio_tasks import provenance, registry, vocab  # pylint: disable=g-import-not-at-top
  from seqio_tasks.sources import canonical  # pylint: disable=g-import-not-at-top
  added = []
  corpus = canonical.CanonicalSource(
      name=CORPUS_TASK, splits=tuple(CORPUS_SPLITS), python_fn=iter_corpus, dataset=CORPUS_TASK,
      subset=None, prompt="span_corruption", dir_names=(CORPUS_TASK,))
  registry.add_task(
      provenance.TaskInfo(name=CORPUS_TASK, kind="demo", source="demo", dataset=CORPUS_TASK,
                          prompt="span_corruption", role="pretrain", splits=tuple(CORPUS_SPLITS),
                          vocabulary="bytes"),
      corpus, vocabulary=vocab.DEMO_VOCABULARY, scoring=False, replace=True)
  added.append(CORPUS_TASK)
  for name, members in dataset_tasks().items():
    base, _ = demo.resolve(members[0])
    source = canonical.CanonicalSource(
        name=name, splits=tuple(demo.SPLIT_SIZES),
        python_fn=lambda split, m=tuple(members): iter_all_prompts(list(m), split),
        dataset=demo.PREFIX + base.name, subset=None, prompt="", dir_names=(name,))
    info = provenance.TaskInfo(
        name=name, kind="all_prompts", source="demo", dataset=demo.PREFIX + base.name,
        prompt=None, role="train", eval_dataset=demo.PREFIX + base.name, has_choices=False,
        splits=tuple(demo.SPLIT_SIZES), vocabulary="bytes", prompts=tuple(members))
    registry.add_task(info, source, vocabulary=vocab.DEMO_VOCABULARY, scoring=False, replace=True)
    added.append(name)
  registry.add_mixture(MULTITASK_MIXTURE, expert_train_tasks(), replace=True)
  registry.add_mixture(CONTINUAL_MIXTURE, continual_tasks(), replace=True)
  registry.add_mixture(ALL_MIXTURE, expert_train_tasks() + continual_tasks(), replace=True)
  added += list(MIXTURES)
  return added
