"""Eval tasks: what the evaluator needs of a task, where tasks come from, and the vocabulary check.

A `TaskSource` resolves suite and task names, gives each task's `TaskMeta`, its canonical examples
(`inputs`, `answer_choices`, `label_index`, `targets`, `example_id`) and its vocabulary.
`SeqioTaskSource` reads the tasks registered by `seqio_tasks`; `InMemoryTaskSource` holds examples
given in memory (tests, ad-hoc sets, other harnesses).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Protocol, Sequence

from expert_t5x import vocab_identity

if TYPE_CHECKING:
  from expert_t5x import scoring


class Vocabulary(Protocol):
  """What the evaluator needs of a (seqio) vocabulary."""
  eos_id: int
  vocab_size: int

  def encode(self, s: str) -> Sequence[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class TaskMeta:
  """What the evaluator needs to know about one eval task."""
  name: str
  dataset: str    # the dataset it aggregates under (ANLI rounds are three datasets)
  prompt: str
  scoring: bool   # rank classification (True) or generation (False)
  metrics: tuple[str, ...] = ()  # extra generation metrics the task asks for (e.g. 'BERTScore')
  # Settings that decided the examples (BIG-bench: format, multiple-gold rule); results record it.
  data_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class TaskSource(Protocol):
  """Where tasks, their canonical examples and vocabularies come from."""

  def resolve(self, spec: str | Sequence[str]) -> list[str]: ...

  def meta(self, task: str) -> TaskMeta: ...

  def examples(self, task: str, split: str, max_examples: Optional[int]) -> list[dict]: ...

  def vocabulary(self, task: str) -> Vocabulary: ...


class SeqioTaskSource:
  """Tasks registered by `seqio_tasks` (imports TensorFlow/seqio on first use).

  `example_subset`: 'first' (the first `max_examples`) or 'paper' (the paper's evaluation subset:
  the first `max_examples`, 300 by default, of torch's seed-42 permutation;
  `seqio_tasks.seen_eval`).
  """

  def __init__(self, example_subset: str = "first"):
    import seqio_tasks  # pylint: disable=g-import-not-at-top
    from seqio_tasks import seen_eval  # pylint: disable=g-import-not-at-top
    if example_subset not in seen_eval.SUBSETS:
      raise ValueError(f"example_subset {example_subset!r} is not one of {seen_eval.SUBSETS}; use "
                       "'first' (the first max_examples) or 'paper' (the paper's 300, seed 42).")
    self._tasks = seqio_tasks
    self.example_subset = example_subset

  def resolve(self, spec: str | Sequence[str]) -> list[str]:
    from seqio_tasks import mixtures  # pylint: disable=g-import-not-at-top
    names = _split_names(spec)
    out: list[str] = []
    for name in names:
      out.extend(mixtures.suite(name) if name in mixtures.SUITES else [name])
    for name in out:
      self._tasks.get_info(name)  # Unknown names raise one line with close matches.
    return list(dict.fromkeys(out))

  def meta(self, task: str) -> TaskMeta:
    info = self._tasks.get_info(task)
    dataset = info.eval_dataset or (f"{info.dataset}_{info.subset}"
                                    if info.subset else info.dataset)
    from seqio_tasks import provenance  # pylint: disable=g-import-not-at-top
    return TaskMeta(name=task, dataset=dataset, prompt=info.prompt or task,
                    scoring=bool(info.has_choices), metrics=tuple(info.metrics),
                    data_options=provenance.data_options(task))

  def examples(self, task: str, split: str, max_examples: Optional[int]) -> list[dict]:
    return self._tasks.load_examples(task, split, max_examples, subset=self.example_subset)

  def vocabulary(self, task: str) -> Vocabulary:
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.get_mixture_or_task(task).output_features["targets"].vocabulary


class InMemoryTaskSource:
  """Tasks given as canonical examples in memory (tests, ad-hoc JSONL sets, other harnesses).

  Args:
    tasks: {task name: (TaskMeta, canonical examples)}.
    vocabulary: the vocabulary that tokenizes every task.
    suites: optional {suite name: task names}.
  """

  def __init__(self, tasks: Mapping[str, tuple[TaskMeta, Sequence[Mapping[str, Any]]]],
               vocabulary: Vocabulary, suites: Optional[Mapping[str, Sequence[str]]] = None):
    self._tasks = dict(tasks)
    self._vocabulary = vocabulary
    self._suites = dict(suites or {})

  def resolve(self, spec: str | Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in _split_names(spec):
      out.extend(self._suites.get(name, [name]))
    for name in out:
      self.meta(name)
    return list(dict.fromkeys(out))

  def meta(self, task: str) -> TaskMeta:
    if task not in self._tasks:
      raise KeyError(f"unknown task {task!r}; known: {sorted(self._tasks)[:10]}.")
    return self._tasks[task][0]

  def examples(self, task: str, split: str, max_examples: Optional[int]) -> list[dict]:
    del split  # One split in memory.
    examples = list(self._tasks[task][1])
    return examples if max_examples is None else examples[:max_examples]

  def vocabulary(self, task: str) -> Vocabulary:
    del task
    return self._vocabulary


def _split_names(spec: str | Sequence[str]) -> list[str]:
  items = [spec] if isinstance(spec, str) else list(spec)
  names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
  if not names:
    raise ValueError("No eval tasks given: pass a suite (e.g. t0_eval_score_eval, demo_heldout) "
                     "or a comma-separated list of task names.")
  return names


def check_vocabulary(task: str, vocabulary: Vocabulary, model_vocab_size: int,
                     options: scoring.ScoringOptions, known: Mapping[str, Optional[str]]) -> None:
  """One error line when the task's vocabulary cannot be the model's (size or file)."""
  size = int(vocabulary.vocab_size)
  if size > model_vocab_size:
    raise ValueError(f"Vocabulary mismatch: task {task!r} uses a vocabulary of {size} ids but the "
                     f"model has vocab_size {model_vocab_size}; evaluate tasks tokenized with the "
                     "model's own vocabulary (set seqio_tasks.vocab.VOCABULARY_PATH to its "
                     "spiece.model).")
  if options.logit_vocab_limit is not None and options.logit_vocab_limit < size:
    raise ValueError(f"logit_vocab_limit {options.logit_vocab_limit} is below task {task!r}'s "
                     f"vocabulary size {size}; use at least {size} (32100 for T5) or None.")
  fingerprint = vocab_identity.known_fingerprint(vocabulary)
  for who, theirs in known.items():
    theirs = vocab_identity.comparable(theirs)
    if fingerprint and theirs and fingerprint != theirs:
      raise ValueError(
          f"Vocabulary mismatch: task {task!r} uses vocabulary {fingerprint[:24]} but "
          f"{who} was built with {theirs[:24]}; point seqio_tasks.vocab.VOCABULARY_PATH "
          "at the model's spiece.model.")
