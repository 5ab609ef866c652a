"""The zero-shot evaluator: rank classification (and decoding) of a base model, experts and merges.

Data flow, once per task::

  canonical grouped examples -> tokens (EOS appended) -> length-bucketed batches
    -> `model.score_choices` (each input encoded once, all its choices in one decoder pass),
       jitted and sharded data-parallel over the ('data', 'model') mesh
    -> argmax per example -> one result shard per (expert chunk, task) -> aggregation

Many experts are scored in one pass: experts of one kind and shape are stacked (a leading `expert`
axis) and every example is repeated once per expert of the chunk with a per-row `expert_index`, so
the data are read and tokenized once per task whatever the number of experts. `experts_per_pass`
bounds device memory. A merged expert is just another Expert format v1 directory.

A `Routing` evaluates one composed entry instead (RoE, per-prompt merges; see `expert_t5x.roe`):
each task only under the expert routed to it, one chunk per expert over all of its tasks.

Shards are written atomically under `<output_dir>/shards/`; a rerun skips every shard whose header
matches (same task, experts, protocol), so an interrupted evaluation resumes where it stopped.
Final files are computed from the shards alone (see `expert_t5x.results`).

Protocol (the paper's, see `expert_t5x.aggregation`): summed target log-probs including EOS, no
length normalisation, argmax with ties to the lowest index. `scoring='mean'` (per target token),
`'per_char'` (lm-eval `acc_norm`) and `logit_vocab_limit` are named options recorded in every
result. Every answer choice is scored whatever their number; an example without choices, or whose
target is not among them, is counted and reported (`excluded` in predictions), never dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expert_t5x import aggregation
from expert_t5x import expert_format
from expert_t5x import experts as experts_lib
from expert_t5x import models
from expert_t5x import network
from expert_t5x import partitioning
from expert_t5x import results as results_lib

PyTree = Any
SHARDS_DIR = "shards"
BASE_ID = "base"
GOLD_POLICIES = ("exclude", "count_wrong")
DEFAULT_FEATURE_LENGTHS = {"inputs": 512, "targets": None}
# The paper's input lengths (`max_source_length`; its code evaluates a run with the config it
# trained with): 256 in the prompt-expert configs (228 of the 296 PEs, hence its per-expert unseen,
# seen and RoE numbers, RoE being a lookup of those), 512 elsewhere (T0-3B, the 68 long-input PEs
# of cnn_dailymail, common_gen, duorc, hotpot_qa, multi_news, samsum, wiki_bio, wiki_qa and xsum,
# the RoE merge configs, the continual cT0 configs).
PAPER_INPUT_LENGTHS = {"pe_256": 256, "long_512": 512}
MIN_BUCKET = 8


# ------------------------------------------------------------------------------------ options


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
  """The named scoring protocol, recorded in every shard and result.

  Attributes:
    scoring: 'sum' (the paper), 'mean' (per target token) or 'per_char' (lm-eval acc_norm).
    logit_vocab_limit: normalise log-probs over the first N logits (the paper's code: 32100).
    gold_not_in_choices: 'exclude' (counted, reported, left out of accuracy) or 'count_wrong'
      (counted as an error, as string matching in the paper's code did).
  """
  scoring: str = "sum"
  logit_vocab_limit: Optional[int] = None
  gold_not_in_choices: str = "exclude"

  def __post_init__(self):
    aggregation.check_scoring(self.scoring)
    if self.gold_not_in_choices not in GOLD_POLICIES:
      raise ValueError(f"gold_not_in_choices must be one of {GOLD_POLICIES}; got "
                       f"{self.gold_not_in_choices!r}.")
    if self.logit_vocab_limit is not None and self.logit_vocab_limit < 2:
      raise ValueError(f"logit_vocab_limit must be None or >= 2; got {self.logit_vocab_limit}.")

  def to_json(self) -> dict[str, Any]:
    return {"scoring": self.scoring, "logit_vocab_limit": self.logit_vocab_limit,
            "gold_not_in_choices": self.gold_not_in_choices, "include_eos": True,
            "tie_break": "lowest_index"}


# -------------------------------------------------------------------------------------- tasks


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
  the first `max_examples`, 300 by default, of torch's seed-42 permutation; `seqio_tasks.seen_eval`).
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
    dataset = info.eval_dataset or (f"{info.dataset}_{info.subset}" if info.subset else info.dataset)
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


def vocabulary_fingerprint(vocabulary: Any) -> Optional[str]:
  """A comparable id of a vocabulary (SentencePiece file sha256, or a bytes tag), if known."""
  if not type(vocabulary).__module__.startswith(("seqio", "seqio_tasks")):
    return None  # Not a seqio vocabulary (tests, custom sources): size alone is checked.
  from seqio_tasks import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  return normalize_vocab_fingerprint(vocab_lib.vocabulary_fingerprint(vocabulary))


def normalize_vocab_fingerprint(value: Optional[str]) -> Optional[str]:
  """'spm:<sha>' and '<sha>' name the same SentencePiece file."""
  if not value:
    return None
  return value[4:] if value.startswith("spm:") else value


# ---------------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass
class Encoded:
  """One tokenized example: `inputs [Li]`, `choices` (K arrays) or `targets` for generation."""
  index: int
  inputs: np.ndarray
  choices: list[np.ndarray]
  targets: Optional[np.ndarray] = None


def _with_eos(ids: Sequence[int], eos_id: int, max_length: Optional[int]) -> tuple[np.ndarray, bool]:
  """Tokens + EOS, truncated to `max_length` (EOS kept last, like seqio's append_eos_after_trim)."""
  ids = list(ids)
  truncated = max_length is not None and len(ids) + 1 > max_length
  if truncated:
    ids = ids[:max_length - 1]
  return np.asarray(ids + [eos_id], np.int32), truncated


def encode_examples(examples: Sequence[Mapping[str, Any]], vocabulary: Vocabulary,
                    feature_lengths: Mapping[str, Optional[int]], scoring: bool
                    ) -> tuple[list[Encoded], dict[str, int]]:
  """Tokenizes inputs and every answer choice once; returns the encodings and truncation counts."""
  eos = int(vocabulary.eos_id)
  cache: dict[str, tuple[np.ndarray, bool]] = {}
  counts = {"inputs_truncated": 0, "targets_truncated": 0}

  def target(text: str) -> np.ndarray:
    if text not in cache:  # Choice sets repeat across examples ("yes"/"no"...).
      cache[text] = _with_eos(vocabulary.encode(text), eos, feature_lengths.get("targets"))
    ids, truncated = cache[text]
    counts["targets_truncated"] += int(truncated)
    return ids

  out = []
  for i, ex in enumerate(examples):
    inputs, truncated = _with_eos(vocabulary.encode(ex["inputs"]), eos, feature_lengths.get("inputs"))
    counts["inputs_truncated"] += int(truncated)
    if scoring:
      out.append(Encoded(i, inputs, [target(c) for c in ex["answer_choices"]]))
    else:
      out.append(Encoded(i, inputs, [], target(ex["targets"])))
  return out, counts


def bucket(length: int, minimum: int = MIN_BUCKET) -> int:
  """Padded length: the next power of two (bounds the number of compiled shapes)."""
  return max(minimum, 1 << max(0, int(length) - 1).bit_length())


@dataclasses.dataclass
class Batch:
  """A padded batch: `rows` example positions (-1 = padding), `inputs [B, Li]`,
  `choices [B, K, Lt]` (all-zero rows = absent choices)."""
  rows: np.ndarray
  inputs: np.ndarray
  choices: Optional[np.ndarray]


def make_batches(encoded: Sequence[Encoded], batch_size: int, scoring: bool = True) -> list[Batch]:
  """Length-bucketed batches of exactly `batch_size` rows (the last one padded).

  Examples are sorted by (input length, longest choice), so each batch pads little; lengths are
  padded to powers of two and the number of choices to the batch's maximum.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  todo = [e for e in encoded if e.choices or not scoring]

  def key(e: Encoded):
    longest = max((len(c) for c in e.choices), default=0)
    return (len(e.inputs), longest, len(e.choices), e.index)

  todo.sort(key=key)
  batches = []
  for start in range(0, len(todo), batch_size):
    members = todo[start:start + batch_size]
    li = bucket(max(len(e.inputs) for e in members))
    inputs = np.zeros((batch_size, li), np.int32)
    inputs[:, 0] = 1  # Padding rows hold a lone EOS so every encoder row attends to something.
    rows = np.full((batch_size,), -1, np.int64)
    choices = None
    if scoring:
      k = max(len(e.choices) for e in members)
      lt = bucket(max(len(c) for e in members for c in e.choices))
      choices = np.zeros((batch_size, k, lt), np.int32)
    for r, e in enumerate(members):
      rows[r] = e.index
      inputs[r, :] = 0
      inputs[r, :len(e.inputs)] = e.inputs
      if scoring:
        for j, c in enumerate(e.choices):
          choices[r, j, :len(c)] = c
    batches.append(Batch(rows, inputs, choices))
  return batches


# ------------------------------------------------------------------------------------ experts


@dataclasses.dataclass
class ExpertSpec:
  """An expert to evaluate: its id, directory and metadata (tensors are read per chunk)."""
  id: str
  path: str
  metadata: dict[str, Any]

  @property
  def config(self) -> experts_lib.ExpertConfig:
    return experts_lib.config_from_json(self.metadata["config"])

  @property
  def stack_key(self) -> str:
    """Experts with equal keys stack: same kind and every config field but the init seed."""
    cfg = {k: v for k, v in self.metadata["config"].items() if k != "init_seed"}
    return json.dumps(cfg, sort_keys=True)

  def describe(self) -> dict[str, Any]:
    meta = self.metadata
    return {"id": self.id, "path": os.path.abspath(self.path), "type": meta["type"],
            "config": meta["config"], "content_hash": meta.get("content_hash"),
            "base": meta.get("base"), "provenance": meta.get("provenance"),
            "merge": meta.get("merge") or (meta.get("training") or {}).get("merge")}


def load_expert_specs(paths: Sequence[str], names: Optional[Sequence[str]] = None
                      ) -> list[ExpertSpec]:
  """Reads each expert's metadata; ids default to the directory names and must be unique."""
  names = list(names) if names else [os.path.basename(os.path.normpath(p)) for p in paths]
  if len(names) != len(paths):
    raise ValueError(f"{len(names)} expert names for {len(paths)} expert paths; give one name per "
                     "path or none.")
  specs, seen = [], {}
  for name, path in zip(names, paths):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"Expert directory '{path}' does not exist; pass directories written "
                              "by training, import or merge (Expert format v1).")
    if name in seen or name == BASE_ID:
      raise ValueError(f"Expert id {name!r} is used twice ('{seen.get(name, BASE_ID)}' and "
                       f"'{path}'); pass distinct names (expert_names / --expert_names).")
    seen[name] = path
    specs.append(ExpertSpec(name, path, expert_format.read_metadata(path)))
  return specs


def read_expert_list(path: str) -> list[str]:
  """Expert directories listed one per line in a text file ('#' comments, relative to the file)."""
  root = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        out.append(line if os.path.isabs(line) else os.path.join(root, line))
  return out


@dataclasses.dataclass
class Chunk:
  """Experts scored together in one pass (or the base alone: `specs` empty)."""
  specs: list[ExpertSpec]

  @property
  def ids(self) -> list[str]:
    return [s.id for s in self.specs] or [BASE_ID]

  @property
  def config(self) -> Optional[experts_lib.ExpertConfig]:
    return self.specs[0].config if self.specs else None

  @property
  def key(self) -> str:
    """The shard directory name: stable for the same experts (ids and content hashes)."""
    if not self.specs:
      return BASE_ID
    text = json.dumps([[s.id, s.metadata.get("content_hash")] for s in self.specs])
    return "experts-" + hashlib.sha256(text.encode()).hexdigest()[:16]

  def load(self) -> tuple[Optional[PyTree], bool]:
    """(expert tree, stacked): stacked when several experts share this pass."""
    if not self.specs:
      return None, False
    trees = [expert_format.load_expert(s.path)[0] for s in self.specs]
    if len(trees) == 1:
      return trees[0], False
    return experts_lib.stack_experts(trees), True


def make_chunks(specs: Sequence[ExpertSpec], experts_per_pass: int) -> list[Chunk]:
  """Groups experts that can be stacked (same kind and config) into chunks of at most
  `experts_per_pass`; full-delta experts are evaluated one at a time (they are folded)."""
  if experts_per_pass < 1:
    raise ValueError(f"experts_per_pass must be >= 1; got {experts_per_pass}.")
  groups: dict[str, list[ExpertSpec]] = {}
  for s in specs:
    groups.setdefault(s.stack_key, []).append(s)
  chunks = []
  for members in groups.values():
    size = 1 if members[0].metadata["type"] == "full" else experts_per_pass
    chunks.extend(Chunk(members[i:i + size]) for i in range(0, len(members), size))
  return chunks


def check_expert_bases(specs: Sequence[ExpertSpec], base_fingerprint: Optional[str],
                       allow_mismatch: bool = False) -> None:
  """Refuses experts trained on another base (their `base.fingerprint` differs)."""
  for s in specs:
    theirs = (s.metadata.get("base") or {}).get("fingerprint")
    if base_fingerprint and theirs and theirs != base_fingerprint:
      message = (f"Expert {s.id!r} ('{s.path}') was trained on base {theirs[:16]}... but the "
                 f"evaluated base is {base_fingerprint[:16]}...; pass the base checkpoint it was "
                 "trained on, or allow_base_mismatch=True (--allow_base_mismatch) to evaluate anyway.")
      if not allow_mismatch:
        raise ValueError(message)
      logging.warning("%s", message)


def check_vocabulary(task: str, vocabulary: Vocabulary, model_vocab_size: int,
                     options: ScoringOptions, known: Mapping[str, Optional[str]]) -> None:
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
  fingerprint = vocabulary_fingerprint(vocabulary)
  for who, theirs in known.items():
    theirs = normalize_vocab_fingerprint(theirs)
    if fingerprint and theirs and fingerprint != theirs:
      raise ValueError(f"Vocabulary mismatch: task {task!r} uses vocabulary {fingerprint[:24]} but "
                       f"{who} was built with {theirs[:24]}; point seqio_tasks.vocab.VOCABULARY_PATH "
                       "at the model's spiece.model.")


# ------------------------------------------------------------------------------------- scorer


# (kind, expert config, stacked, T5 config, options, mesh, rules) -> partitioned function.
_COMPILED: dict[Any, Callable] = {}


class Scorer:
  """Jitted, sharded scoring and decoding of batches under the base and expert chunks.

  Args:
    t5_config: the network config.
    params: base parameters (placed on the mesh once, sharded by their logical axes).
    partitioner: mesh and rules; batches are split along 'data'.
    options: the scoring protocol.
  """

  def __init__(self, t5_config: network.T5Config, params: PyTree,
               partitioner: partitioning.PjitPartitioner, options: ScoringOptions):
    self.t5_config = t5_config
    self.partitioner = partitioner
    self.options = options
    model = models.EncoderDecoderModel(network.Transformer(t5_config))
    abstract = jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (1, MIN_BUCKET),
                                "decoder_input_tokens": (1, MIN_BUCKET)}))
    self.flat_axes = partitioning.params_logical_axes(abstract)
    self.param_sharding = partitioner.sharding_for(
        partitioning.logical_axes_tree(params, self.flat_axes))
    self.params = jax.device_put(params, self.param_sharding)
    self._expert: Optional[PyTree] = None
    self._chunk: Optional[Chunk] = None

  # -- experts

  def set_chunk(self, chunk: Chunk) -> None:
    """Loads a chunk's experts onto the mesh (full experts are folded into the base once)."""
    if self._chunk is chunk:
      return
    self._chunk, self._expert, self._expert_sharding = chunk, None, None
    self._params_for_chunk = self.params
    tree, stacked = chunk.load()
    self._stacked = stacked
    self._config = chunk.config
    if tree is None:
      return
    if isinstance(self._config, experts_lib.FullConfig):
      fold = jax.jit(lambda p, e: experts_lib.effective_params(p, e, self._config),
                     out_shardings=self.param_sharding)
      with jax.set_mesh(self.partitioner.mesh):
        self._params_for_chunk = fold(self.params, tree)
      self._config = None  # Folded: the network runs as the base.
      return
    specs = jax.tree.map(lambda a: jax.sharding.PartitionSpec(*a),
                         experts_lib.logical_axes(tree, self.flat_axes, stacked=stacked),
                         is_leaf=lambda x: isinstance(x, tuple))
    sharding = self.partitioner.sharding_for(specs)
    self._expert = jax.device_put(jax.tree.map(jnp.asarray, tree), sharding)
    self._expert_sharding = sharding

  def _model(self) -> models.EncoderDecoderModel:
    return models.EncoderDecoderModel(network.Transformer(self.t5_config),
                                      decode_fn="temperature_sample", expert_config=self._config)

  def _compiled(self, kind: str) -> Callable:
    # One compiled function per (kind, expert config, stacked): chunks of the same kind reuse it
    # (jit retraces only for new shapes).
    config_key = None if self._config is None else self._chunk.specs[0].stack_key
    key = (kind, config_key, self._stacked, self.t5_config, self.options,
           self.partitioner.mesh, tuple(map(tuple, self.partitioner.rules)))
    if key in _COMPILED:  # Shared across evaluations in one process (e.g. several runs).
      return _COMPILED[key]
    model, options = self._model(), self.options
    normalize = "mean" if options.scoring == "mean" else "sum"
    data = self.partitioner.data_sharding
    expert_sharding = self._expert_sharding
    if kind == "score":
      def fn(params, expert, inputs, choices, expert_index):
        return model.score_choices(params, inputs, choices, expert=expert,
                                   expert_index=expert_index, normalize=normalize,
                                   logit_vocab_limit=options.logit_vocab_limit)
      in_sh = (self.param_sharding, expert_sharding, data, data,
               data if self._stacked else None)
    else:
      def fn(params, expert, inputs, decoder_inputs, expert_index):
        batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs}
        if expert_index is not None:
          batch["expert_index"] = expert_index
        return model.predict_batch(params, batch, None, expert=expert,
                                   decoder_params={"temperature": 0.0})
      in_sh = (self.param_sharding, expert_sharding, data, data,
               data if self._stacked else None)
    _COMPILED[key] = self.partitioner.partition(fn, in_sh, data)
    return _COMPILED[key]

  def _rows(self, array: np.ndarray) -> tuple[jax.Array, Optional[jax.Array], int]:
    """Repeats each example once per stacked expert; returns (rows, expert_index, experts)."""
    num = len(self._chunk.specs) if self._stacked else 1
    if not self._stacked:
      return array, None, 1
    rows = np.repeat(array, num, axis=0)  # [B * E, ...], example-major
    index = np.tile(np.arange(num, dtype=np.int32), array.shape[0])
    return rows, index, num

  def _put(self, x: Optional[np.ndarray]) -> Optional[jax.Array]:
    if x is None:
      return None
    return jax.device_put(x, self.partitioner.data_sharding)

  def score(self, batch: Batch) -> np.ndarray:
    """`[B, E, K]` float32 choice scores (E = experts in the chunk, 1 for the base)."""
    inputs, index, num = self._rows(batch.inputs)
    choices, _, _ = self._rows(batch.choices)
    out = self._compiled("score")(self._params_for_chunk, self._expert, self._put(inputs),
                                  self._put(choices), self._put(index))
    return np.asarray(out).reshape(batch.inputs.shape[0], num, -1)

  def generate(self, batch: Batch, max_length: int) -> np.ndarray:
    """`[B, E, max_length]` greedy decodes."""
    inputs, index, num = self._rows(batch.inputs)
    decoder_inputs = np.zeros((inputs.shape[0], max_length), np.int32)
    out = self._compiled("generate")(self._params_for_chunk, self._expert, self._put(inputs),
                                     self._put(decoder_inputs), self._put(index))
    return np.asarray(out).reshape(batch.inputs.shape[0], num, max_length)


# -------------------------------------------------------------------------------- shard work


def _shard_path(output_dir: str, chunk: Chunk, task: str, subset: str = "") -> str:
  return os.path.join(output_dir, SHARDS_DIR, chunk.key, task + subset + ".jsonl")


def _check_example_routes(routing: Routing, task: str, examples: Sequence[Mapping[str, Any]]) -> None:
  """A per-example routing must route exactly the examples evaluated."""
  ids = [ex["example_id"] for ex in examples]
  unrouted = [i for i in ids if i not in routing.routes[task]]
  if unrouted:
    raise ValueError(f"Routing {routing.name!r} routes task {task!r} per example but not its examples "
                     f"{unrouted[:5]}; route every example (or the whole task).")
  unknown = sorted(set(routing.routes[task]) - set(ids), key=str)
  if unknown:
    raise ValueError(f"Routing {routing.name!r} routes examples {unknown[:5]} that task {task!r} does not "
                     f"have here (another split or max_examples?); route only the evaluated examples.")


def _routed_subset(routing: Optional[Routing], include_base: bool, chunk: Chunk, task: str) -> str:
  """'' when `chunk` scores every example of `task`; else (a task routed per example) a tag of the
  example ids routed to its expert, so another routing writes its own shard instead of clashing."""
  if routing is None or not routing.per_example(task) or (include_base and chunk.ids == [BASE_ID]):
    return ""
  ids = sorted(str(i) for i, e in routing.routes[task].items() if e == chunk.ids[0])
  return "@" + hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]


def _shard_header(task: TaskMeta, chunk: Chunk, examples: Sequence[Mapping[str, Any]],
                  settings: Mapping[str, Any]) -> dict[str, Any]:
  digest = hashlib.sha256()
  for ex in examples:  # The examples themselves, so changed data never reuse an old shard.
    digest.update(json.dumps([ex["example_id"], ex["inputs"], ex.get("answer_choices"),
                              ex.get("label_index"), ex.get("targets")]).encode())
  return {"schema_version": results_lib.SCHEMA_VERSION, "task": task.name,
          "expert_ids": chunk.ids,
          "content_hashes": [s.metadata.get("content_hash") for s in chunk.specs],
          "settings": dict(settings), "num_examples": len(examples),
          "examples_sha256": digest.hexdigest()}


def read_shard(path: str) -> tuple[dict[str, Any], list[dict]]:
  """A completed shard's first line (`header` and truncation `stats`) and its records."""
  lines = results_lib.read_jsonl(path)
  if not lines or "header" not in lines[0]:
    raise ValueError(f"Shard '{path}' has no header line; delete it to recompute it.")
  return lines[0], lines[1:]


def shard_done(path: str, header: Mapping[str, Any]) -> bool:
  """Whether a completed shard for `header` exists (reads its first line only); a shard written
  with another header is refused rather than silently recomputed or mixed in."""
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    first = f.readline()
  try:
    theirs = json.loads(first)["header"]
  except (json.JSONDecodeError, KeyError, TypeError):
    raise ValueError(f"Shard '{path}' has no header line; delete it to recompute it.") from None
  if results_lib.dumps(theirs) != results_lib.dumps(header):
    diff = sorted(k for k in set(theirs) | set(header)
                  if results_lib.dumps(theirs.get(k)) != results_lib.dumps(header.get(k)))
    raise ValueError(f"Shard '{path}' was written with different {diff}; use a new output "
                     "directory, or delete the shards directory to recompute.")
  return True


def _write_shard(path: str, header: Mapping[str, Any], stats: Mapping[str, int],
                 records: Sequence[Mapping[str, Any]]) -> None:
  results_lib.write_jsonl(path, [{"header": header, "stats": stats}] + list(records))


def _rank_records(task: TaskMeta, chunk: Chunk, examples: Sequence[Mapping[str, Any]],
                  scores: Mapping[int, np.ndarray], options: ScoringOptions) -> list[dict]:
  """Prediction records (expert-major, examples in order) from `[E, K]` scores per example."""
  out = []
  for e, expert_id in enumerate(chunk.ids):
    expert_ids = [] if expert_id == BASE_ID else [expert_id]
    for i, ex in enumerate(examples):
      choices = ex["answer_choices"]
      gold = int(ex["label_index"])
      common = dict(task=task.name, dataset=task.dataset, prompt=task.prompt,
                    example_id=ex["example_id"], expert_ids=expert_ids, scoring=options.scoring)
      if not choices:
        out.append(results_lib.prediction_record(choice_scores=[], pred=-1, gold=gold,
                                                 excluded="no_choices", **common))
        continue
      row = np.asarray(scores[i][e][:len(choices)], np.float64)
      if options.scoring == "per_char":
        row = aggregation.per_char_scores(row, choices)
      excluded = "gold_not_in_choices" if gold < 0 else None
      out.append(results_lib.prediction_record(choice_scores=row.tolist(),
                                               pred=int(aggregation.predict(row)), gold=gold,
                                               excluded=excluded, **common))
  return out


def _generation_records(task: TaskMeta, chunk: Chunk, examples: Sequence[Mapping[str, Any]],
                        texts: Mapping[int, list[str]]) -> list[dict]:
  out = []
  for e, expert_id in enumerate(chunk.ids):
    for i, ex in enumerate(examples):
      out.append(results_lib.prediction_record(
          task=task.name, dataset=task.dataset, prompt=task.prompt, example_id=ex["example_id"],
          expert_ids=[] if expert_id == BASE_ID else [expert_id], choice_scores=[],
          pred=texts[i][e], gold=ex["targets"], scoring="generate"))
  return out


def _decode_text(vocabulary: Vocabulary, ids: np.ndarray) -> str:
  ids = [int(t) for t in ids]
  eos = int(vocabulary.eos_id)
  if eos in ids:
    ids = ids[:ids.index(eos)]
  return vocabulary.decode([t for t in ids if t > 0]).strip()


def run_shard(scorer: Scorer, task: TaskMeta, chunk: Chunk, examples: Sequence[Mapping[str, Any]],
              encoded: Sequence[Encoded], vocabulary: Vocabulary, batch_size: int,
              generation_max_length: int, progress: Any = None) -> list[dict]:
  """Scores (or decodes) one task under one chunk; returns its prediction records."""
  scorer.set_chunk(chunk)
  num = len(chunk.ids)
  if task.scoring:
    scores: dict[int, np.ndarray] = {}
    for batch in make_batches(encoded, batch_size, scoring=True):
      out = scorer.score(batch)  # [B, E, K]
      for r, row in enumerate(batch.rows):
        if row >= 0:
          scores[int(row)] = out[r]
      if progress is not None:
        progress.update(int((batch.rows >= 0).sum()) * num)
    if progress is not None:  # Examples without choices are not scored but are done.
      progress.update(sum(1 for e in encoded if not e.choices) * num)
    return _rank_records(task, chunk, examples, scores, scorer.options)
  texts: dict[int, list[str]] = {}
  for batch in make_batches(encoded, batch_size, scoring=False):
    out = scorer.generate(batch, generation_max_length)  # [B, E, L]
    for r, row in enumerate(batch.rows):
      if row >= 0:
        texts[int(row)] = [_decode_text(vocabulary, out[r, e]) for e in range(num)]
    if progress is not None:
      progress.update(int((batch.rows >= 0).sum()) * num)
  return _generation_records(task, chunk, examples, texts)


# ------------------------------------------------------------------------------- base models


@dataclasses.dataclass
class BaseModel:
  """The frozen base: parameters, network config and what identifies it."""
  params: PyTree
  config: network.T5Config
  description: str
  fingerprint: Optional[str]
  vocab_fingerprint: Optional[str] = None


def _dtype(name: str) -> Any:
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in table:
    raise ValueError(f"dtype must be one of {sorted(table)}; got {name!r}.")
  return table[name]


_INITS: dict[network.T5Config, Callable] = {}


def _random_init(config: network.T5Config) -> Callable:
  """The jitted parameter initialiser of a config (compiled once per process)."""
  if config not in _INITS:
    model = models.EncoderDecoderModel(network.Transformer(config))
    _INITS[config] = jax.jit(lambda rng: model.get_initial_variables(
        rng, {"encoder_input_tokens": (1, MIN_BUCKET),
              "decoder_input_tokens": (1, MIN_BUCKET)})["params"])
  return _INITS[config]


def load_base(checkpoint_path: Optional[str] = None, model_config: Optional[str] = None,
              random_init_seed: Optional[int] = None, dtype: str = "float32",
              config_overrides: Optional[Mapping[str, Any]] = None) -> BaseModel:
  """Loads a base checkpoint (HF T5 or T5X), or builds random parameters for a named config.

  Args:
    checkpoint_path: an HF T5 directory or a T5X checkpoint (`checkpoint_importer.load_params`).
    model_config: a `network.get_config` name ('tiny', 'small', ..., 'xl'); needed for random
      parameters, optional for checkpoints (T5X checkpoints carry no config: it is inferred).
    random_init_seed: with no checkpoint, initialise random parameters with this seed (demos,
      tests, plumbing checks; the numbers mean nothing).
    dtype: activation dtype ('float32' or 'bfloat16'); parameters stay float32.
    config_overrides: T5Config fields to override (e.g. vocab_size for a byte vocabulary).
  """
  from expert_t5x import checkpoint_importer  # pylint: disable=g-import-not-at-top
  overrides = dict(config_overrides or {})
  overrides["dtype"] = _dtype(dtype)
  if checkpoint_path:
    params, config, info = checkpoint_importer.load_params(checkpoint_path)
    if config is None:
      config = (network.get_config(model_config) if model_config
                else checkpoint_importer.infer_t5_config(params))
    config = config.replace(**overrides)
    vocab = checkpoint_importer.vocab_fingerprint(info.get("vocab_path")) if info.get("vocab_path") else None
    return BaseModel(params, config, os.path.abspath(checkpoint_path),
                     checkpoint_importer.base_fingerprint(params), vocab)
  if model_config is None or random_init_seed is None:
    raise ValueError("No base model: pass checkpoint_path (--checkpoint_path, an HF T5 directory or "
                     "a T5X checkpoint), or model_config and random_init_seed for random parameters.")
  config = network.get_config(model_config, **overrides)
  params = jax.tree.map(np.asarray, _random_init(config)(jax.random.PRNGKey(random_init_seed)))
  return BaseModel(params, config, f"random:{model_config}:seed={random_init_seed}",
                   checkpoint_importer.base_fingerprint(params))


# ----------------------------------------------------------------------------------- routing


@dataclasses.dataclass
class Routing:
  """A composed entry whose tasks (or examples) each use their own expert (RoE, merges, oracles).

  Each task is scored only under the expert it was routed to, and each expert once for all of its
  tasks (one chunk per expert), so the work is one pass per distinct expert, not experts x tasks.
  A task routed per example (instance-level RoE) is split: each expert scores only its examples.

  Attributes:
    name: the composed entry's id in results (e.g. 'roe', 'merge').
    routes: {task: id of the expert that evaluates it (an expert id of this run, or 'base'), or
      {example_id: expert id} to route each example of the task on its own}.
    expert_ids: {task: the experts recorded as used (default: those of `routes`; a merge's inputs)}.
    details: {task: JSON-able record kept with the prompt (votes, confidence, ...)}.
    info: JSON-able settings kept in results['routing'] (embedder, guard mode, ...).
  """
  name: str
  routes: Mapping[str, str | Mapping[Any, str]]
  expert_ids: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  details: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def per_example(self, task: str) -> bool:
    return not isinstance(self.routes[task], str)

  def experts_of(self, task: str) -> list[str]:
    """The distinct experts (or 'base') that evaluate `task`'s examples."""
    route = self.routes[task]
    return [route] if isinstance(route, str) else sorted(set(route.values()))

  def routed_to(self, task: str, expert_id: str, example_id: Any = None) -> bool:
    """Whether `expert_id` evaluates `task` (per-example routes: its example `example_id`)."""
    route = self.routes[task]
    return route == expert_id if isinstance(route, str) else route.get(example_id) == expert_id

  def used(self, task: str) -> list[str]:
    """The experts recorded for `task` ([] for the base)."""
    if task in self.expert_ids:
      return list(self.expert_ids[task])
    return [e for e in self.experts_of(task) if e != BASE_ID]

  def to_json(self, tasks: Sequence[str]) -> dict[str, Any]:
    def evaluated_as(t):
      if not self.per_example(t):
        return self.routes[t]
      counts = collections.Counter(self.routes[t].values())
      return {"per_example": {e: counts[e] for e in sorted(counts)}}
    return {"name": self.name, **dict(self.info),
            "tasks": {t: {"evaluated_as": evaluated_as(t), "expert_ids": self.used(t),
                          **dict(self.details.get(t, {}))} for t in tasks}}


# (chunk, the tasks it evaluates): the unit of planning.
Plan = list[tuple[Chunk, list[str]]]


def make_plan(specs: Sequence[ExpertSpec], task_names: Sequence[str], include_base: bool,
              experts_per_pass: int, routing: Optional[Routing] = None) -> Plan:
  """Every chunk on every task; with `routing`, one chunk per expert on the tasks routed to it."""
  if routing is None:
    chunks = ([Chunk([])] if include_base else []) + make_chunks(specs, experts_per_pass)
    return [(c, list(task_names)) for c in chunks]
  known = {s.id for s in specs} | {BASE_ID}
  missing = [t for t in task_names if t not in routing.routes]
  if missing:
    raise ValueError(f"Routing {routing.name!r} has no expert for tasks {missing[:5]}; route every "
                     "evaluated task.")
  experts_of = {t: routing.experts_of(t) for t in task_names}
  unknown = sorted({e for t in task_names for e in experts_of[t]} - known)
  if unknown:
    raise ValueError(f"Routing {routing.name!r} names experts {unknown[:5]} that are not among the "
                     "evaluated experts; pass their directories too.")
  if routing.name in known:
    raise ValueError(f"Routing entry name {routing.name!r} equals an expert id; choose another name.")
  plan: Plan = []
  base_tasks = [t for t in task_names if include_base or BASE_ID in experts_of[t]]
  if base_tasks:
    plan.append((Chunk([]), base_tasks))
  for s in specs:
    mine = [t for t in task_names if s.id in experts_of[t]]
    if mine:
      plan.append((Chunk([s]), mine))
  return plan


# ---------------------------------------------------------------------------------- evaluate


def _entries(specs: Sequence[ExpertSpec], include_base: bool,
             routing: Optional[Routing] = None) -> list[str]:
  """Result entries: the base (if asked), then each expert, or the one routed entry."""
  rest = [routing.name] if routing is not None else [s.id for s in specs]
  return ([BASE_ID] if include_base else []) + rest


def evaluate(*, tasks: str | Sequence[str], output_dir: str, base: BaseModel,
             expert_paths: Sequence[str] = (), expert_names: Optional[Sequence[str]] = None,
             include_base: Optional[bool] = None, split: str = "validation",
             max_examples: Optional[int] = None, batch_size: int = 32, experts_per_pass: int = 8,
             options: ScoringOptions = ScoringOptions(),
             feature_lengths: Optional[Mapping[str, Optional[int]]] = None,
             generation_max_length: int = 128, bootstrap_samples: int = 1000, seed: int = 0,
             partitioner: Optional[partitioning.PjitPartitioner] = None,
             num_partitions: Optional[int] = None, allow_base_mismatch: bool = False,
             write_predictions: bool = True, progress: bool = True,
             task_source: Optional[TaskSource] = None, routing: Optional[Routing] = None,
             scorer: Optional[Scorer] = None, bertscore_model: Optional[str] = None,
             bertscore_layers: Optional[int] = None) -> dict[str, Any]:
  """Evaluates the base and/or experts on tasks; writes shards and the final files; returns
  the results object (also written as results.json).

  Args:
    tasks: a suite name, a task name, or a list / comma-separated string of them.
    output_dir: where shards and results go (an existing one is resumed).
    base: the frozen base (`load_base`).
    expert_paths: Expert format v1 directories (trained, imported or merged experts).
    expert_names: their ids in results (default: directory names).
    include_base: also evaluate the base alone (default: only when no expert is given).
    split: the eval split ('validation' for the paper's held-out protocol).
    max_examples: the first N examples of each task (None: all).
    batch_size: examples per device call, a multiple of the data-parallel size; with stacked
      experts each call holds batch_size x experts rows.
    experts_per_pass: stacked experts per pass (bounds device memory).
    options: the scoring protocol.
    feature_lengths: {'inputs': max input tokens incl. EOS, 'targets': max choice/target tokens or
      None (no truncation, unlike the paper's code at 128)}.
    generation_max_length: decode length for generative tasks.
    bootstrap_samples: B; 0 skips intervals.
    seed: the bootstrap seed.
    partitioner: the mesh and logical axis rules (default: `PjitPartitioner()`; a scorer's own
      when `scorer` is given).
    num_partitions: shorthand for `partitioner=PjitPartitioner(num_partitions=N)`.
    allow_base_mismatch: evaluate experts whose recorded base fingerprint differs.
    write_predictions: write predictions.jsonl (large for many experts).
    progress: show a progress bar with rate and ETA.
    task_source: tasks and examples (default: the registered seqio_tasks).
    routing: evaluate one composed entry instead of every expert on every task: each task only
      under its routed expert (see `Routing`); the base is then evaluated only where routed to,
      or everywhere with include_base=True.
    scorer: a `Scorer` to reuse (same base and options), e.g. one that scored retrieval queries.
    bertscore_model: a transformers model directory for the tasks whose metrics include
      'BERTScore' (the paper: microsoft/deberta-large-mnli); required when such a task is evaluated.
    bertscore_layers: its hidden layer (default: bert-score's 18 for deberta-large-mnli).
  """
  if jax.process_count() > 1:
    raise ValueError(f"Evaluation runs in one process (this job has {jax.process_count()}); on a "
                     "multi-host slice run it on one host with its local devices, or split the "
                     "experts or tasks over hosts with one output directory each.")
  feature_lengths = dict(DEFAULT_FEATURE_LENGTHS if feature_lengths is None else feature_lengths)
  specs = load_expert_specs(list(expert_paths), expert_names)
  include_base = (not specs and routing is None) if include_base is None else include_base
  check_expert_bases(specs, base.fingerprint, allow_base_mismatch)
  source = task_source or SeqioTaskSource()
  task_names = source.resolve(tasks)
  metas = [source.meta(t) for t in task_names]
  bertscore = _bertscore_settings(metas, bertscore_model, bertscore_layers)
  if partitioner is not None and num_partitions is not None:
    raise ValueError("Pass partitioner or num_partitions, not both (a partitioner has its own "
                     "num_partitions).")
  if scorer is not None:
    partitioner = scorer.partitioner
  elif partitioner is None:
    partitioner = (partitioning.PjitPartitioner() if num_partitions is None
                   else partitioning.PjitPartitioner(num_partitions=num_partitions))
  if batch_size % partitioner.data_parallel_size:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the data-parallel size "
                     f"{partitioner.data_parallel_size}; use a multiple of it.")
  plan = make_plan(specs, task_names, include_base, experts_per_pass, routing)
  if not plan:
    raise ValueError("Nothing to evaluate: include_base is False and no expert was given.")
  settings = {"split": split, "max_examples": max_examples, "options": options.to_json(),
              "feature_lengths": feature_lengths, "generation_max_length": generation_max_length,
              "base_fingerprint": base.fingerprint, "model_vocab_size": base.config.vocab_size,
              "dtype": jnp.dtype(base.config.dtype).name}
  subset = getattr(source, "example_subset", "first")
  if subset != "first":  # only then in shard headers, so earlier runs still resume
    settings["example_subset"] = subset
  known_vocabs = {"the base checkpoint": base.vocab_fingerprint}
  known_vocabs.update({f"expert {s.id!r}": (s.metadata.get("base") or {}).get("vocab_fingerprint")
                       for s in specs})
  # Every task's examples and vocabulary are checked before any work, so a bad task fails fast.
  loaded = []
  for meta in metas:
    vocabulary = source.vocabulary(meta.name)
    check_vocabulary(meta.name, vocabulary, base.config.vocab_size, options, known_vocabs)
    loaded.append((meta, source.examples(meta.name, split, max_examples), vocabulary))
    if routing is not None and routing.per_example(meta.name):
      _check_example_routes(routing, meta.name, loaded[-1][1])
  os.makedirs(output_dir, exist_ok=True)
  todo = []  # (meta, examples, vocabulary, [(chunk, path, header, rows)]) of shards still to compute.
  for meta, examples, vocabulary in loaded:
    pending = []
    for chunk in (c for c, chunk_tasks in plan if meta.name in chunk_tasks):
      subset = _routed_subset(routing, include_base, chunk, meta.name)
      path = _shard_path(output_dir, chunk, meta.name, subset)
      rows = (list(range(len(examples))) if not subset else
              [i for i, ex in enumerate(examples) if routing.routed_to(meta.name, chunk.ids[0], ex["example_id"])])
      header = _shard_header(meta, chunk, [examples[i] for i in rows], settings)
      if not shard_done(path, header):
        pending.append((chunk, path, header, rows))
    if pending:
      todo.append((meta, examples, vocabulary, pending))
  total = sum(len(rows) * len(c.ids) for _, _, _, pending in todo for c, _, _, rows in pending)
  if scorer is None and todo:
    scorer = Scorer(base.config, base.params, partitioner, options)
  bar = _progress_bar(progress, total)
  try:
    for meta, examples, vocabulary, pending in todo:
      if bar is not None:
        bar.set_postfix_str(meta.name, refresh=False)
      # Tokenized once per task, whatever the number of expert chunks.
      encoded, counts = encode_examples(examples, vocabulary, feature_lengths, meta.scoring)
      _log_truncation(meta.name, counts)
      for chunk, path, header, rows in pending:
        if len(rows) < len(examples):  # routed per example: this expert's examples, renumbered
          records = run_shard(scorer, meta, chunk, [examples[i] for i in rows],
                              [dataclasses.replace(encoded[i], index=j) for j, i in enumerate(rows)],
                              vocabulary, batch_size, generation_max_length, bar)
        else:
          records = run_shard(scorer, meta, chunk, examples, encoded, vocabulary, batch_size,
                              generation_max_length, bar)
        _write_shard(path, header, counts, records)
  finally:
    if bar is not None:
      bar.close()
  return assemble(output_dir=output_dir, metas=metas, plan=plan,
                  entries=_entries(specs, include_base, routing), specs=specs, base=base,
                  settings=settings, options=options, bootstrap_samples=bootstrap_samples,
                  seed=seed, write_predictions=write_predictions, routing=routing,
                  bertscore=bertscore)


def _bertscore_settings(metas: Sequence[TaskMeta], model_dir: Optional[str],
                        num_layers: Optional[int]) -> Optional[dict[str, Any]]:
  """{model, num_layers} when a task asks for BERTScore; one clear error when no model is given."""
  wanted = [m.name for m in metas if not m.scoring and "BERTScore" in m.metrics]
  if not wanted:
    return None
  if not model_dir:
    raise ValueError(f"{wanted[0]} (and {len(wanted) - 1} more) is scored with BERTScore precision; "
                     "pass bertscore_model (--bertscore_model DIR): a transformers directory of "
                     "microsoft/deberta-large-mnli, as the paper used.")
  from seqio_tasks import bertscore as bertscore_lib  # pylint: disable=g-import-not-at-top
  layers = bertscore_lib.DEBERTA_LARGE_MNLI_LAYERS if num_layers is None else num_layers
  return {"model": os.path.abspath(model_dir), "num_layers": int(layers), "tasks": wanted}


def _progress_bar(enabled: bool, total: int):
  """(example x expert) rows still to score, with rate and ETA (resumed work is not counted)."""
  if not enabled or not total:
    return None
  from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
  return tqdm_auto.tqdm(total=total, unit="ex", dynamic_ncols=True, smoothing=0.1,
                        desc="eval", mininterval=1.0)


def _log_truncation(task: str, counts: Mapping[str, int]) -> None:
  if any(counts.values()):
    logging.warning("%s: %d inputs and %d choice/target sequences truncated to the feature "
                    "lengths (raise task_feature_lengths to avoid it).", task,
                    counts["inputs_truncated"], counts["targets_truncated"])


# ---------------------------------------------------------------------------------- assemble


def _generation_metrics(targets: Sequence[str], predictions: Sequence[str],
                        bertscore: Optional[Mapping[str, Any]] = None) -> dict[str, float]:
  """Exact match, mean ROUGE-L F (stemmed) and corpus BLEU (sacrebleu 'intl'), in percent; with
  `bertscore` ({model, num_layers}) also the mean BERTScore precision."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  import sacrebleu  # pylint: disable=g-import-not-at-top
  if not targets:
    return {"exact_match": float("nan"), "rougeL": float("nan"), "bleu": float("nan")}
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  rouge_l = np.mean([scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions)])
  bleu = sacrebleu.corpus_bleu(list(predictions), [list(targets)], tokenize="intl").score
  exact = np.mean([t.strip() == p.strip() for t, p in zip(targets, predictions)])
  out = {"exact_match": 100.0 * float(exact), "rougeL": 100.0 * float(rouge_l), "bleu": float(bleu)}
  if bertscore:
    from seqio_tasks import bertscore as bertscore_lib  # pylint: disable=g-import-not-at-top
    out.update(bertscore_lib.bertscore_precision(targets, predictions, bertscore["model"],
                                                 bertscore["num_layers"]))
  return out


def outcomes_from_records(records: Sequence[Mapping[str, Any]], options: ScoringOptions
                          ) -> tuple[aggregation.PromptOutcomes, dict[str, int]]:
  """One (entry, task)'s rank-classification records -> outcomes and exclusion counts."""
  excluded = {k: 0 for k in results_lib.EXCLUSIONS}
  ids, correct = [], []
  for r in records:
    if r["excluded"] is not None:
      excluded[r["excluded"]] += 1
      if not (r["excluded"] == "gold_not_in_choices"
              and options.gold_not_in_choices == "count_wrong"):
        continue
    ids.append(r["example_id"])
    correct.append(r["pred"] == r["gold"])
  first = records[0] if records else {"task": "", "dataset": "", "prompt": ""}
  return aggregation.PromptOutcomes(first["task"], first["dataset"], first["prompt"],
                                    np.asarray(ids, np.int64), np.asarray(correct, bool)), excluded


def _record_targets(expert_id: str, task: str, entries: Sequence[str],
                    routing: Optional[Routing]) -> list[str]:
  """The result entries that a (chunk expert, task)'s records count for."""
  if routing is None:
    return [expert_id]
  out = [BASE_ID] if expert_id == BASE_ID and BASE_ID in entries else []
  if task in routing.routes and expert_id in routing.experts_of(task):
    out.append(routing.name)
  return out


def assemble(*, output_dir: str, metas: Sequence[TaskMeta], plan: Plan,
             entries: Sequence[str], specs: Sequence[ExpertSpec], base: BaseModel,
             settings: Mapping[str, Any], options: ScoringOptions, bootstrap_samples: int,
             seed: int, write_predictions: bool, routing: Optional[Routing] = None,
             bertscore: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Builds predictions.jsonl, results.json/.csv/.md and matrix.npz from the shards alone.

  With `routing`, the routed entry takes each task's records from its expert's shard; its
  prediction lines carry `entry` and the experts the task used (`Routing.used`).
  """
  outcome_of: dict[tuple[str, str], aggregation.PromptOutcomes] = {}
  excluded: dict[str, dict[str, dict[str, int]]] = {e: {} for e in entries}
  generation_of: dict[tuple[str, str], dict] = {}
  truncation: dict[str, dict[str, int]] = {}
  split_tasks: dict[tuple[str, str], tuple[TaskMeta, list[dict]]] = {}  # routed per example

  def summarize_records(entry: str, meta: TaskMeta, records: Sequence[Mapping[str, Any]]) -> None:
    if meta.scoring:
      o, ex = outcomes_from_records(records, options)
      o.task, o.dataset, o.prompt = meta.name, meta.dataset, meta.prompt
      outcome_of[(entry, meta.name)] = o
      excluded[entry][meta.name] = ex
    else:
      generation_of[(entry, meta.name)] = {
          "task": meta.name, "dataset": meta.dataset, "prompt": meta.prompt,
          "num_examples": len(records),
          "metrics": _generation_metrics(
              [r["gold"] for r in records], [r["pred"] for r in records],
              bertscore if bertscore and meta.name in bertscore["tasks"] else None)}

  predictions_path = os.path.join(output_dir, results_lib.PREDICTIONS_FILE)
  tmp_predictions = predictions_path + ".partial"
  out = open(tmp_predictions, "w", encoding="utf-8") if write_predictions else None
  try:
    for chunk, chunk_tasks in plan:
      # One chunk's shards in memory at a time; records are written entry-major.
      chunk_metas = [m for m in metas if m.name in chunk_tasks]
      by_entry: dict[tuple[str, str], list[dict]] = {}
      for m in chunk_metas:
        first, records = read_shard(_shard_path(
            output_dir, chunk, m.name, _routed_subset(routing, BASE_ID in entries, chunk, m.name)))
        truncation[m.name] = first.get("stats") or {}
        for r in records:
          by_entry.setdefault(((r["expert_ids"] or [BASE_ID])[0], m.name), []).append(r)
      for expert_id in chunk.ids:
        for meta in chunk_metas:
          for entry in _record_targets(expert_id, meta.name, entries, routing):
            records = by_entry.get((expert_id, meta.name), [])
            if entry != expert_id and routing.per_example(meta.name):
              # Each example records its own expert; the task is summarised once all are in.
              records = [dict(r, entry=entry) for r in records
                         if routing.routed_to(meta.name, expert_id, r["example_id"])]
              split_tasks.setdefault((entry, meta.name), (meta, []))[1].extend(records)
            elif entry != expert_id:  # The routed entry: record which experts the task used.
              records = [dict(r, entry=entry, expert_ids=routing.used(meta.name))
                         for r in records]
            if out is not None:
              for r in records:
                out.write(results_lib.dumps(r) + "\n")
            if (entry, meta.name) not in split_tasks:
              summarize_records(entry, meta, records)
  finally:
    if out is not None:
      out.close()
  for (entry, _), (meta, records) in split_tasks.items():
    summarize_records(entry, meta, records)
  if out is not None:
    os.replace(tmp_predictions, predictions_path)
  # Prompts in task order, whatever order the chunks ran in.
  outcomes = {e: [outcome_of[(e, m.name)] for m in metas if (e, m.name) in outcome_of]
              for e in entries}
  generation = {e: [generation_of[(e, m.name)] for m in metas if (e, m.name) in generation_of]
                for e in entries}
  intervals = (aggregation.bootstrap(outcomes, bootstrap_samples, seed)
               if bootstrap_samples and any(outcomes.values()) else {})
  results = build_results(entries=entries, outcomes=outcomes, excluded=excluded,
                          generation=generation, intervals=intervals, metas=metas, specs=specs,
                          base=base, settings=settings, options=options,
                          bootstrap_samples=bootstrap_samples, seed=seed)
  if bertscore:
    results["protocol"]["generation"]["bertscore"] = dict(bertscore)
  results["truncation"] = {t: c for t, c in truncation.items() if any(c.values())}
  if routing is not None:
    results["routing"] = routing.to_json([m.name for m in metas])
    for entry in results["entries"]:
      if entry["id"] == routing.name:
        entry["expert_ids"] = sorted({e for m in metas for e in routing.used(m.name)})
        for prompt in entry["prompts"] + entry["generation"]:
          prompt["expert_ids"] = routing.used(prompt["task"])
  scored = [m.name for m in metas if m.scoring]
  if routing is None and len(specs) > 1 and scored:
    expert_entries = {e: outcomes[e] for e in entries if e != BASE_ID}
    acc, expert_ids, prompt_ids = aggregation.accuracy_matrix(expert_entries, scored)
    results_lib.write_matrix(os.path.join(output_dir, results_lib.MATRIX_FILE), acc, expert_ids,
                             prompt_ids)
    results["oracle"] = aggregation.oracle(acc, expert_ids, prompt_ids,
                                           {m.name: m.dataset for m in metas})
  results_lib.write_json(os.path.join(output_dir, results_lib.RESULTS_FILE), results)
  results_lib.write_csv(os.path.join(output_dir, results_lib.CSV_FILE), results)
  results_lib.write_markdown(os.path.join(output_dir, results_lib.MARKDOWN_FILE), results)
  return results


def build_results(*, entries, outcomes, excluded, generation, intervals, metas, specs, base,
                  settings, options, bootstrap_samples, seed) -> dict[str, Any]:
  """The results.json object (schema `results.SCHEMA_VERSION`)."""
  entry_objs = []
  totals = {k: 0 for k in results_lib.EXCLUSIONS}
  for e in entries:
    summary = aggregation.aggregate(outcomes[e])
    ci = intervals.get(e, {})
    prompts = []
    for o in outcomes[e]:
      ex = excluded[e][o.task]
      for k, v in ex.items():
        totals[k] += v
      prompts.append({"task": o.task, "dataset": o.dataset, "prompt": o.prompt,
                      "accuracy": o.accuracy, "num_examples": int(o.correct.size),
                      "excluded": ex, "ci": ci.get("prompts", {}).get(o.task)})
    datasets = [{"dataset": d, "mean": v["mean"], "median": v["median"],
                 "num_prompts": v["num_prompts"],
                 "ci_mean": ci.get("datasets", {}).get(d, {}).get("mean"),
                 "ci_median": ci.get("datasets", {}).get(d, {}).get("median")}
                for d, v in summary["datasets"].items()]
    overall = {"mean": summary["mean"], "median": summary["median"],
               "num_datasets": summary["num_datasets"], "ci_mean": ci.get("mean"),
               "ci_median": ci.get("median")}
    entry_objs.append({"id": e, "expert_ids": [] if e == BASE_ID else [e], "prompts": prompts,
                       "datasets": datasets, "overall": overall, "generation": generation[e]})
  protocol = dict(options.to_json())
  protocol.update({
      "aggregation": "accuracy per prompt -> mean over a dataset's prompts -> mean over datasets",
      "median": "median over a dataset's prompts -> mean over datasets",
      "datasets_note": "ANLI R1/R2/R3 are three datasets",
      "bootstrap": {"samples": bootstrap_samples, "seed": seed, "percentiles":
                    list(aggregation.PERCENTILES),
                    "resample": "example ids per dataset with replacement, shared by its prompts"},
      "split": settings["split"], "max_examples": settings["max_examples"],
      "example_subset": settings.get("example_subset", "first"),
      "feature_lengths": settings["feature_lengths"],
      "input_length": input_length_record(settings["feature_lengths"].get("inputs")),
      "generation": {"decoding": "greedy", "max_length": settings["generation_max_length"],
                     "metrics": ["exact_match", "rougeL", "bleu"]}})
  return {
      "schema_version": results_lib.SCHEMA_VERSION, "kind": results_lib.RESULTS_KIND,
      "protocol": protocol,
      "model": {"base": base.description, "fingerprint": base.fingerprint,
                "dtype": settings["dtype"], "config": _config_json(base.config)},
      "experts": [s.describe() for s in specs],
      "tasks": [dataclasses.asdict(m) for m in metas],
      "environment": results_lib.environment(),
      "exclusions": totals,
      "entries": entry_objs,
  }


def paper_input_length(*, experts: bool) -> int:
  """The paper's input length for a run: its PE configs' 256 when experts are evaluated one by one
  (or retrieved), else 512 (the base alone, T0-3B, merges)."""
  return PAPER_INPUT_LENGTHS["pe_256" if experts else "long_512"]


def input_length_record(tokens: Optional[int]) -> dict[str, Any]:
  """What results record of the input length: the tokens and which of the paper's settings it is."""
  setting = next((name for name, n in PAPER_INPUT_LENGTHS.items() if n == tokens), None)
  return {"tokens": tokens, "paper_setting": setting}


def _config_json(config: network.T5Config) -> dict[str, Any]:
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    out[f.name] = jnp.dtype(value).name if f.name == "dtype" else (
        list(value) if isinstance(value, tuple) else value)
  return out
