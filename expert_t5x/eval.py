r"""Zero-shot evaluation entry point (T5X style): a base model, experts or a merge on a suite.

(Over 600 lines on purpose: the typed configs, the gin main and the command line that builds the
same configs sit together, so that each setting is declared once beside the flag that sets it.)

Gin (as T5X's `eval.py`; `gin/runs/eval.gin` composes the objects below)::

    python -m expert_t5x.eval --gin_file=runs/eval.gin \
      --gin.CHECKPOINT_PATH="'/ckpt/t5-xl-lm-adapt'" \
      --gin.MIXTURE_OR_TASK_NAME="'t0_eval_score_eval'" \
      --gin.EVAL_OUTPUT_DIR="'/tmp/eval'" \
      --gin.EXPERT_PATHS="['/lib/experts/cosmos_qa_pe']"

A partitioning preset after the run gin shards evaluation as it shards training
(`--gin_file=partitioning/model_parallel_2.gin`).

Command line (the same objects, built from argparse flags)::

    expert-t5x eval --checkpoint_path /ckpt/t5-xl-lm-adapt --tasks t0_eval_score_eval \
      --output_dir /tmp/eval --experts /lib/experts/a /lib/experts/b

Python::

    eval.evaluate(base=eval.BaseConfig(checkpoint_path='/ckpt/t5-xl-lm-adapt'),
                  dataset_cfg=eval.DatasetConfig('t0_eval_score_eval'),
                  output_cfg=eval.OutputConfig('/tmp/eval'),
                  experts=eval.ExpertsConfig(expert_paths=['/lib/experts/a']),
                  partitioner=partitioning.PjitPartitioner(num_partitions=2))

Retrieval of Experts from a library (`expert_t5x.routed_evaluation`): each eval prompt retrieves its
expert from its own unlabeled examples (or merges the top-k) and is evaluated with it (Python:
`routing=routed_evaluation.RoEConfig(library='/lib', ...)` in place of `experts`' paths)::

    expert-t5x eval --checkpoint_path /ckpt/t5-xl-lm-adapt --tasks t0_eval_score_eval \
      --output_dir /tmp/roe --library /lib --roe --embedder minilm
    expert-t5x eval ... --library /lib --merge --merge_top_k 1 3 5   # top-k chosen label-free
    expert-t5x eval ... --library /lib --roe --roe_level instance    # or dataset (DE-level)

The oracle (best expert per prompt, uses labels) of an evaluated expert x prompt matrix::

    expert-t5x eval --oracle /tmp/eval/grid          # or .../matrix.npz

Writes `predictions.jsonl`, `results.json`, `results.csv`, `results.md` and (several experts)
`matrix.npz` and its oracle under the output directory; an interrupted run resumes from its
shards. With `expected` (an anchors file, see `gin/runs/anchors/`), also writes `anchors.md` and
fails (exit 1) when a number is outside its tolerance.

Every setting has its default once, on its config's field: argparse reads the defaults from the
fields, and the gin files' macros are checked against them by the tests. Its checks are declared
once too, on the configs (`expert_t5x.validation`): a bad value is the same one-line error from
the flags, gin and Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence

from expert_t5x import base_models
from expert_t5x import eval_experts
from expert_t5x import eval_tasks
from expert_t5x import evaluation
from expert_t5x import scoring as scoring_lib
from expert_t5x import partitioning
from expert_t5x import validation

if TYPE_CHECKING:
  from expert_t5x import routed_evaluation as roe_lib

ANCHORS_FILE = "anchors.md"
DTYPES = ("float32", "bfloat16")
EXAMPLE_SUBSETS = ("first", "paper")


# ----------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class BaseConfig:
  """The frozen base model: a checkpoint, or a named config with random weights.

  Attributes:
    checkpoint_path: an HF T5 directory or a T5X checkpoint.
    model_config: a named T5 config; with `random_init_seed` and no checkpoint, random weights.
    random_init_seed: seed of random base weights (plumbing checks and demos only).
    config_overrides: T5Config fields to override (e.g. {'vocab_size': 259} for byte tasks).
    dtype: activation dtype, 'float32' or 'bfloat16'.
    vocabulary_path: the SentencePiece model of the T5 tasks (default: the checkpoint's own
      spiece.model when the vocabulary is not configured otherwise); infer also takes 'bytes'.
  """
  checkpoint_path: Optional[str] = None
  model_config: Optional[str] = None
  random_init_seed: Optional[int] = None
  config_overrides: Optional[Mapping[str, Any]] = None
  dtype: str = "float32"
  vocabulary_path: Optional[str] = None

  FLAGS: ClassVar[Mapping[str, Optional[str]]] = {"config_overrides": "--vocab_size"}

  def __post_init__(self):
    validation.one_of(validation.label(self, "dtype"), self.dtype, DTYPES)
    if self.random_init_seed is not None:
      validation.non_negative_int(validation.label(self, "random_init_seed"),
                                  self.random_init_seed)
    vocab_size = (self.config_overrides or {}).get("vocab_size")
    if vocab_size is not None:
      validation.positive_int(validation.label(self, "config_overrides") + "['vocab_size']",
                              vocab_size)

  def check_paths(self) -> None:
    """The vocabulary file exists ('bytes' names the byte vocabulary, a URL is read later)."""
    path = self.vocabulary_path
    if path and path != "bytes" and not validation.is_remote(path):
      validation.existing_file(validation.label(self, "vocabulary_path"), path)

  def load(self) -> base_models.BaseModel:
    return base_models.load_base(self.checkpoint_path, self.model_config, self.random_init_seed,
                                self.dtype, self.config_overrides)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """The evaluated tasks and how their examples are read (T5X's `dataset_cfg`).

  Attributes:
    mixture_or_task_name: a suite (t0_eval_score_eval, bigbench_13, ct0_continual,
      t0_train_score_eval, demo_heldout), a task, or a list / comma-separated string of them.
    split: the eval split ('validation' for the paper's held-out protocol).
    max_examples: the first N examples of each task (None: all).
    example_subset: 'first' (the first `max_examples`) or 'paper' (the paper's evaluation subset:
      the first `max_examples`, 300 by default, of torch.randperm with seed 42 over the split,
      after the paper's row slice where it took one; `seqio_tasks.seen_eval`). Recorded.
    batch_size: examples per device call, a multiple of the data-parallel size.
    task_feature_lengths: {'inputs': N, 'targets': M or None}. Without 'inputs' (or None), the
      paper's choice for the run (`evaluation.paper_input_length`): 256, its prompt-expert configs'
      length, when experts are evaluated or retrieved; else 512 (the base alone, merges; T0-3B's).
      The long-input PEs used 512 (gin `runs/eval_input_long_512.gin`).
    generation_max_length: decode length of generative tasks.
    bertscore_model, bertscore_layers: the BERTScore model directory and layer of the tasks scored
      with it (ct0_target_eval's covid_qa, eli5, empathetic_dialogues, esnli, twitter_top20).
  """
  mixture_or_task_name: str | Sequence[str]
  split: str = "validation"
  max_examples: Optional[int] = None
  example_subset: str = "first"
  batch_size: int = 32
  task_feature_lengths: Optional[Mapping[str, Optional[int]]] = None
  generation_max_length: int = 128
  bertscore_model: Optional[str] = None
  bertscore_layers: Optional[int] = None

  FLAGS: ClassVar[Mapping[str, Optional[str]]] = {"mixture_or_task_name": "--tasks"}
  _LENGTH_FLAGS: ClassVar[Mapping[str, str]] = {"inputs": "--max_input_length",
                                                "targets": "--max_target_length"}

  def __post_init__(self):
    label = functools.partial(validation.label, self)
    names = self.mixture_or_task_name
    validation.non_empty(label("mixture_or_task_name"),
                         [names] if isinstance(names, str) and names.strip(",") else
                         [] if isinstance(names, str) else list(names),
                         "name a suite or tasks")
    validation.one_of(label("example_subset"), self.example_subset, EXAMPLE_SUBSETS)
    for name in ("max_examples", "bertscore_layers"):
      validation.optional_positive_int(label(name), getattr(self, name))
    for name in ("batch_size", "generation_max_length"):
      validation.positive_int(label(name), getattr(self, name))
    for feature, length in (self.task_feature_lengths or {}).items():
      flag = self._LENGTH_FLAGS.get(feature)
      name = f"{flag} / " if flag else ""
      validation.optional_positive_int(
          f"{name}DatasetConfig.task_feature_lengths[{feature!r}]", length)


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
  """The evaluated experts (or merges: a merge is an expert directory too).

  Attributes:
    expert_paths: Expert format v1 directories (trained, imported or merged experts).
    expert_list_file: a text file listing more expert directories, one per line.
    expert_names: ids for the experts in results (default: directory names).
    include_base: also evaluate the base alone (default: only when no expert is given; with
      routing, only where a prompt is routed to it).
    experts_per_pass: stacked experts per pass (bounds device memory).
    allow_base_mismatch: evaluate experts (or a library) trained on another base.
  """
  expert_paths: Sequence[str] = ()
  expert_list_file: Optional[str] = None
  expert_names: Optional[Sequence[str]] = None
  include_base: Optional[bool] = None
  experts_per_pass: int = 8
  allow_base_mismatch: bool = False

  FLAGS: ClassVar[Mapping[str, Optional[str]]] = {"expert_paths": "--experts",
                                                  "expert_list_file": "--expert_list"}

  def __post_init__(self):
    validation.positive_int(validation.label(self, "experts_per_pass"), self.experts_per_pass)
    if isinstance(self.expert_paths, str):
      raise validation.UsageError(
          f"{validation.label(self, 'expert_paths')}={self.expert_paths!r} is one string; pass a "
          "list of expert directories.")

  def check_paths(self) -> None:
    """Each expert is a directory, the expert list a file (URLs are read later)."""
    for path in self.expert_paths or []:
      if not validation.is_remote(path):
        validation.existing_dir(validation.label(self, "expert_paths"), path,
                                "an expert directory")
    if self.expert_list_file and not validation.is_remote(self.expert_list_file):
      validation.existing_file(validation.label(self, "expert_list_file"), self.expert_list_file)

  def paths(self) -> list[str]:
    """The expert directories: `expert_paths`, then those of `expert_list_file`."""
    paths = list(self.expert_paths or [])
    if self.expert_list_file:
      paths += eval_experts.read_expert_list(self.expert_list_file)
    return paths


@dataclasses.dataclass(frozen=True)
class OutputConfig:
  """Where results go and what is reported.

  Attributes:
    output_dir: the evaluation directory (resumed when it exists).
    write_predictions: write predictions.jsonl (large for many experts).
    progress: show a progress bar with rate and ETA.
    bootstrap_samples: bootstrap resamples of the confidence intervals; 0 skips them.
    seed: the bootstrap seed.
    expected: an anchors JSON file to compare with (pass/fail table in anchors.md).
    previous_results: an earlier routed run's results.json: routing changes are reported.
  """
  output_dir: str
  write_predictions: bool = True
  progress: bool = True
  bootstrap_samples: int = 1000
  seed: int = 0
  expected: Optional[str] = None
  previous_results: Optional[str] = None

  FLAGS: ClassVar[Mapping[str, Optional[str]]] = {"write_predictions": "--no_predictions",
                                                  "progress": "--no_progress"}

  def __post_init__(self):
    if not self.output_dir:
      raise validation.UsageError(f"{validation.label(self, 'output_dir')}={self.output_dir!r} "
                                  "is empty; pass the evaluation directory to write.")
    validation.non_negative_int(validation.label(self, "bootstrap_samples"),
                                self.bootstrap_samples, "0: no confidence intervals")

  def check_paths(self, inputs: Sequence[str] = ()) -> None:
    """The output is a directory and none of `inputs`; the files it reads exist."""
    validation.output_dir(validation.label(self, "output_dir"), self.output_dir, inputs)
    if self.expected and not validation.is_remote(self.expected):
      _resolve_expected(self.expected)
    if self.previous_results and not validation.is_remote(self.previous_results):
      validation.existing_file(validation.label(self, "previous_results"), self.previous_results,
                               "an earlier routed run's results.json")


def routing_mode(roe: bool = False, merge: bool = False) -> str:
  """`RoEConfig.mode` from the two switches users set (--roe / --merge, gin ROE / MERGE)."""
  if roe and merge:
    raise validation.UsageError("Pass one of roe (--roe) or merge (--merge), not both.")
  if not (roe or merge):
    raise validation.UsageError(
        "A library is only used with roe (--roe) or merge (--merge); pass one, or "
        "evaluate expert directories with --experts.")
  return "roe" if roe else "merge"


# ---------------------------------------------------------------------------------- evaluate


def evaluate(*, base: BaseConfig, dataset_cfg: DatasetConfig, output_cfg: OutputConfig,
             experts: ExpertsConfig = ExpertsConfig(),
             routing: Optional[roe_lib.RoEConfig] = None,
             scoring: scoring_lib.ScoringOptions = scoring_lib.ScoringOptions(),
             partitioner: Optional[partitioning.PjitPartitioner] = None,
             task_source: Optional[eval_tasks.TaskSource] = None) -> dict[str, Any]:
  """Loads the base and experts, evaluates, writes the result files; returns results.json's object.

  Args:
    base: the base model.
    dataset_cfg: the tasks and how their examples are read.
    output_cfg: the output directory and what is written and reported.
    experts: the evaluated experts (with `routing`: only include_base and allow_base_mismatch).
    routing: Retrieval of Experts (`routed_evaluation.RoEConfig`, with its library): each prompt is
    evaluated
      with the experts retrieved for it instead of `experts`' paths.
    scoring: the scoring protocol.
    partitioner: the mesh and logical axis rules (default: `PjitPartitioner()`, data parallel
      over every device); a gin partitioning preset configures it.
    task_source: tasks (default: the registered seqio_tasks).
  """
  _check_paths(base, output_cfg, experts, routing)
  paths = experts.paths()
  if routing is not None:
    if not routing.library:
      raise validation.UsageError("RoE and merge evaluation need an expert library (--library "
                                  "LIB).")
    if paths:
      raise validation.UsageError("RoE and merge evaluation use the library's experts; drop "
                                  "expert_paths (--experts / --expert_list).")
  task_feature_lengths = dict(dataset_cfg.task_feature_lengths or {"targets": None})
  task_feature_lengths.setdefault("inputs", evaluation.paper_input_length(
      experts=bool(paths) or (routing is not None and routing.mode == "roe")))
  loaded = base.load()
  _configure_vocabulary(base.vocabulary_path, base.checkpoint_path, task_source)
  if task_source is None:
    task_source = eval_tasks.SeqioTaskSource(dataset_cfg.example_subset)
  elif dataset_cfg.example_subset != getattr(task_source, "example_subset", "first"):
    raise ValueError(f"example_subset {dataset_cfg.example_subset!r} applies to the registered "
                     "tasks; a given task_source selects its own examples (pass it the subset, or "
                     "drop one).")
  common = dict(
      tasks=dataset_cfg.mixture_or_task_name, output_dir=output_cfg.output_dir, base=loaded,
      task_source=task_source, split=dataset_cfg.split, max_examples=dataset_cfg.max_examples,
      batch_size=dataset_cfg.batch_size, options=scoring, feature_lengths=task_feature_lengths,
      partitioner=partitioner, allow_base_mismatch=experts.allow_base_mismatch,
      generation_max_length=dataset_cfg.generation_max_length,
      bootstrap_samples=output_cfg.bootstrap_samples, seed=output_cfg.seed,
      write_predictions=output_cfg.write_predictions, progress=output_cfg.progress)
  if routing is not None:
    from expert_t5x import routed_evaluation  # pylint: disable=g-import-not-at-top
    results = routed_evaluation.evaluate(config=routing, include_base=bool(experts.include_base),
                           previous_results=output_cfg.previous_results, **common)
  else:
    results = evaluation.evaluate(
        expert_paths=paths, expert_names=experts.expert_names, include_base=experts.include_base,
        experts_per_pass=experts.experts_per_pass, bertscore_model=dataset_cfg.bertscore_model,
        bertscore_layers=dataset_cfg.bertscore_layers, **common)
  return _finish(results, output_cfg.output_dir, output_cfg.expected)


def _check_paths(base: BaseConfig, output_cfg: OutputConfig, experts: ExpertsConfig,
                 routing: Optional[roe_lib.RoEConfig]) -> None:
  """The configs' path checks, before anything is loaded or written (the output is no input)."""
  experts.check_paths()
  output_cfg.check_paths(inputs=list(experts.expert_paths or []))
  base.check_paths()
  if routing is not None:
    routing.check_paths()


def _finish(results: dict[str, Any], output_dir: str, expected: Optional[str]) -> dict[str, Any]:
  """Logs each entry's means and compares with an anchors file when given."""
  for entry in results["entries"]:
    logging.info("%s: mean %.2f, median %.2f over %d datasets", entry["id"],
                 entry["overall"]["mean"] or float("nan"),
                 entry["overall"]["median"] or float("nan"), entry["overall"]["num_datasets"])
  results["output_dir"] = output_dir
  if expected:
    from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
    report = results_lib.compare_expected(results, results_lib.read_expected(
        _resolve_expected(expected)))
    results_lib.write_text(os.path.join(output_dir, ANCHORS_FILE), report["markdown"])
    results["anchors"] = report
  return results


def _resolve_expected(path: str) -> str:
  """An anchors file: as given, else relative to the shipped gin folder (runs/anchors/...)."""
  if os.path.isfile(path):
    return path
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  shipped = os.path.join(gin_utils.shipped_gin_dir(), path)
  if os.path.isfile(shipped):
    return shipped
  raise validation.DataError(
      f"{validation.label(OutputConfig, 'expected')} {path!r} does not exist (also looked in "
      f"'{gin_utils.shipped_gin_dir()}'); pass the path of an anchors expected.json.")


def _configure_vocabulary(vocabulary_path: Optional[str], checkpoint_path: Optional[str],
                          task_source: Any) -> None:
  """Points the lazy T5 vocabulary of seqio_tasks at `vocabulary_path` (or the checkpoint's)."""
  if task_source is not None:
    return
  from expert_t5x import checkpoint_importer  # pylint: disable=g-import-not-at-top
  from seqio_tasks import vocab  # pylint: disable=g-import-not-at-top
  if vocabulary_path:
    vocab.set_vocabulary_path(vocabulary_path)
    return
  configured = vocab.VOCABULARY_PATH or os.environ.get(vocab.VOCAB_ENV)
  found = checkpoint_importer.find_vocab(checkpoint_path) if checkpoint_path else None
  if not configured and found:
    vocab.set_vocabulary_path(found)


# ------------------------------------------------------------------------------------- gin


def main(argv: Sequence[str]) -> None:
  """absl main for `python -m expert_t5x.eval --gin_file=...`."""
  del argv
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  results = gin_utils.call_configured(evaluate, "expert_t5x.eval")
  if results is None:  # --gin_parse_only
    return
  print(open(os.path.join(results["output_dir"], "results.md"), encoding="utf-8").read())
  if results.get("anchors"):
    print(results["anchors"]["markdown"])
    if not results["anchors"]["passed"]:
      raise SystemExit(1)


def gin_main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the gin entry point with `argv` (program name first)."""
  from expert_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  return gin_utils.run_for_exit_code(main, argv)


# ------------------------------------------------------------------------------------- CLI


def field_default(cls: type, name: str) -> Any:
  """The default of a dataclass field: flags take their defaults from the configs' fields."""
  field = {f.name: f for f in dataclasses.fields(cls)}[name]
  if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
    return field.default_factory()  # type: ignore[misc]
  return field.default


_MERGE_PARAM_FLAGS = ("density", "per_tensor", "sign_method", "drop", "seed", "combine")


def _parser() -> argparse.ArgumentParser:
  from expert_t5x import merging  # pylint: disable=g-import-not-at-top
  from expert_t5x import routed_evaluation as roe_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  p = argparse.ArgumentParser(
      prog="expert-t5x eval",
      description="Zero-shot rank-classification evaluation of a base model, experts or a merge "
      "(the paper's protocol: summed log-probs incl. EOS, argmax, ties to the lowest index). "
      "With --gin_file, runs the gin entry point instead.")
  default = field_default
  p.add_argument("--tasks", required=True,
                 help="suite (t0_eval_score_eval, bigbench_13, ct0_continual, t0_train_score_eval, "
                 "demo_heldout) or comma-separated task names")
  p.add_argument("--output_dir", required=True, help="evaluation directory (resumed if present)")
  base = p.add_argument_group("base model")
  base.add_argument("--checkpoint_path", help="HF T5 directory or T5X checkpoint")
  base.add_argument("--model_config", help="named T5 config (tiny, small, base, large, xl, xxl)")
  base.add_argument("--random_init_seed", type=int,
                    help="random base weights with this seed (plumbing checks only)")
  base.add_argument("--vocab_size", type=int, help="override the config's vocab_size")
  base.add_argument("--dtype", default=default(BaseConfig, "dtype"), choices=DTYPES)
  base.add_argument("--vocabulary_path", help="SentencePiece model of the T5 tasks")
  ex = p.add_argument_group("experts")
  ex.add_argument("--experts", nargs="*", default=list(default(ExpertsConfig, "expert_paths")),
                  help="expert directories (or a merge's)")
  ex.add_argument("--expert_list", help="file listing expert directories, one per line")
  ex.add_argument("--expert_names", nargs="*", help="ids for the experts (default: dir names)")
  ex.add_argument("--include_base", action="store_true", help="also evaluate the base alone")
  ex.add_argument("--experts_per_pass", type=int,
                  default=default(ExpertsConfig, "experts_per_pass"),
                  help="stacked experts per pass (bounds device memory)")
  ex.add_argument("--allow_base_mismatch", action="store_true",
                  help="evaluate experts trained on another base")
  pr = p.add_argument_group("protocol")
  pr.add_argument("--split", default=default(DatasetConfig, "split"))
  pr.add_argument("--max_examples", type=int,
                  help="first N examples of each task (with --example_subset paper: N of the "
                       "paper's subset, 300 by default)")
  pr.add_argument("--example_subset", default=default(DatasetConfig, "example_subset"),
                  choices=("first", "paper"),
                  help="first: the first --max_examples; paper: the paper's evaluation subset "
                       "(first 300 of torch.randperm with seed 42, ELM's seen_eval_300)")
  pr.add_argument("--scoring", default=default(scoring_lib.ScoringOptions, "scoring"),
                  choices=("sum", "mean", "per_char"))
  pr.add_argument("--logit_vocab_limit", type=int, help="e.g. 32100 (the paper's code)")
  pr.add_argument("--gold_not_in_choices",
                  default=default(scoring_lib.ScoringOptions, "gold_not_in_choices"),
                  choices=("exclude", "count_wrong"))
  pr.add_argument("--max_input_length", type=int,
                  help="default: the paper's per run, 256 (its PE configs) when evaluating or "
                       "retrieving experts, else 512 (base, merges)")
  pr.add_argument("--max_target_length", type=int, help="truncate choices/targets (default: no)")
  pr.add_argument("--generation_max_length", type=int,
                  default=default(DatasetConfig, "generation_max_length"))
  pr.add_argument("--bootstrap_samples", type=int,
                  default=default(OutputConfig, "bootstrap_samples"))
  pr.add_argument("--seed", type=int, default=default(OutputConfig, "seed"), help="bootstrap seed")
  pr.add_argument("--bertscore_model",
                  help="transformers directory of microsoft/deberta-large-mnli (BERTScore tasks)")
  pr.add_argument("--bertscore_layers", type=int, help="its hidden layer (default 18)")
  pr.add_argument("--expected", help="anchors JSON to compare with (exit 1 when outside tolerance)")
  rl = p.add_argument_group("retrieval of experts (with --library)")
  rl.add_argument("--library", help="expert library to retrieve from (with --roe or --merge)")
  rl.add_argument("--roe", action="store_true",
                  help="evaluate each prompt with its top-voted expert (the paper's RoE)")
  rl.add_argument("--merge", action="store_true",
                  help="evaluate each prompt with a merge of its top-k retrieved experts")
  roe_config = roe_lib.RoEConfig
  rl.add_argument("--roe_level", default=default(roe_config, "level"), choices=roe_lib.LEVELS,
                  help="with --roe: the prompt's vote winner (task), its dataset expert (dataset) "
                       "or each example's nearest key's expert (instance)")
  rl.add_argument("--dataset_rule", default=default(roe_config, "dataset_rule"),
                  choices=("winner", "pooled"),
                  help="with --roe_level dataset: the vote winner's dataset (the paper) or the "
                       "dataset with the most votes pooled over its prompt experts")
  rl.add_argument("--embedder", default=default(roe_config, "embedder"),
                  choices=("minilm", "t5", "bm25"), help="t5 = the evaluated base's encoder")
  rl.add_argument("--minilm_dir", help="all-MiniLM-L6-v2 sentence-transformers directory")
  rl.add_argument("--retrieval_max_seq_length", type=int,
                  default=default(roe_config, "max_seq_length"))
  rl.add_argument("--text_format", default=default(roe_config, "text_format"),
                  help="key/query text format")
  rl.add_argument("--num_queries", type=int, default=default(roe_config, "num_queries"),
                  help="unlabeled queries per prompt (Q)")
  rl.add_argument("--retrieval_seed", type=int, default=default(roe_config, "seed"),
                  help="seed of the query permutation")
  rl.add_argument("--votes_per_query", type=int, default=default(roe_config, "votes_per_query"))
  rl.add_argument("--guard", default=default(roe_config, "guard"),
                  choices=("zero_shot", "seen", "off"),
                  help="contamination guard: zero_shot for held-out suites, seen for seen tasks")
  rl.add_argument("--allow_unknown_provenance", action="store_true",
                  default=default(roe_config, "allow_unknown_provenance"),
                  help="zero_shot guard: admit experts whose training data is unknown (they may "
                       "have been trained on the eval dataset; refused by default)")
  rl.add_argument("--abstain_threshold", type=float,
                  default=default(roe_config, "abstain_threshold"),
                  help="abstain below this vote share and use --fallback")
  rl.add_argument("--fallback", default=default(roe_config, "fallback"), choices=("base", "merge"))
  rl.add_argument("--merge_method", default=default(roe_config, "merge_method"),
                  choices=merging.METHODS)
  rl.add_argument("--merge_top_k", type=int, nargs="+",
                  default=list(default(roe_config, "merge_top_k")),
                  help="k; several values are chosen per prompt label-free")
  rl.add_argument("--merge_lam", type=float, nargs="+",
                  help="λ (task_arithmetic, ties, dare); several values are chosen label-free")
  rl.add_argument("--merge_density", type=float, help="TIES density")
  rl.add_argument("--merge_per_tensor", action="store_true",
                  help="TIES: trim per tensor instead of per expert")
  rl.add_argument("--merge_sign_method", choices=merging.SIGN_METHODS, help="TIES sign election")
  rl.add_argument("--merge_drop", type=float, help="DARE drop probability")
  rl.add_argument("--merge_seed", type=int, help="DARE mask seed")
  rl.add_argument("--merge_combine", choices=merging.DARE_COMBINES,
                  help="DARE: combine linearly or TIES-style")
  rl.add_argument("--adapter_reference", default=default(roe_config, "adapter_reference"),
                  choices=merging.ADAPTER_REFERENCES)
  rl.add_argument("--previous_results",
                  help="an earlier --roe/--merge results.json: report routing changes")
  rt = p.add_argument_group("runtime")
  rt.add_argument("--batch_size", type=int, default=default(DatasetConfig, "batch_size"))
  rt.add_argument("--num_partitions", type=int,
                  default=default(partitioning.PjitPartitioner, "num_partitions"),
                  help="model-parallel devices (the 'model' mesh axis); gin partitioning presets "
                       "(--gin_file=partitioning/*.gin) also set the logical axis rules")
  rt.add_argument("--no_predictions", action="store_true", help="skip predictions.jsonl")
  rt.add_argument("--no_progress", action="store_true")
  return p


def configs_from_args(args: argparse.Namespace) -> dict[str, Any]:
  """`evaluate`'s keyword arguments (the config objects) from parsed `expert-t5x eval` flags."""
  lengths = {"targets": args.max_target_length}
  if args.max_input_length:
    lengths["inputs"] = args.max_input_length
  configs = dict(
      base=BaseConfig(
          checkpoint_path=args.checkpoint_path, model_config=args.model_config,
          random_init_seed=args.random_init_seed,
          config_overrides={"vocab_size": args.vocab_size} if args.vocab_size else None,
          dtype=args.dtype, vocabulary_path=args.vocabulary_path),
      dataset_cfg=DatasetConfig(
          mixture_or_task_name=args.tasks, split=args.split, max_examples=args.max_examples,
          example_subset=args.example_subset, batch_size=args.batch_size,
          task_feature_lengths=lengths, generation_max_length=args.generation_max_length,
          bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers),
      output_cfg=OutputConfig(
          output_dir=args.output_dir, write_predictions=not args.no_predictions,
          progress=not args.no_progress, bootstrap_samples=args.bootstrap_samples, seed=args.seed,
          expected=args.expected, previous_results=args.previous_results),
      experts=ExpertsConfig(
          expert_paths=args.experts, expert_list_file=args.expert_list,
          expert_names=args.expert_names, include_base=True if args.include_base else None,
          experts_per_pass=args.experts_per_pass, allow_base_mismatch=args.allow_base_mismatch),
      scoring=scoring_lib.ScoringOptions(scoring=args.scoring,
                                        logit_vocab_limit=args.logit_vocab_limit,
                                        gold_not_in_choices=args.gold_not_in_choices),
      partitioner=partitioning.PjitPartitioner(num_partitions=args.num_partitions))
  if args.roe or args.merge or args.library:
    configs["routing"] = _roe_config_from_args(args)
  return configs


def _roe_config_from_args(args: argparse.Namespace) -> roe_lib.RoEConfig:
  from expert_t5x import routed_evaluation as roe_lib  # pylint: disable=g-import-not-at-top,redefined-outer-name
  fields = {f.name for f in dataclasses.fields(roe_lib.RoEConfig)} - {"mode", "merge_params"}
  flags = roe_lib.RoEConfig.FLAGS  # fields whose flag has another name
  kwargs = {name: getattr(args, flags.get(name, f"--{name}")[2:]) for name in fields}
  if args.merge_lam is None:  # not given: the config's default
    del kwargs["merge_lam"]
  params = {name: getattr(args, f"merge_{name}") for name in _MERGE_PARAM_FLAGS}
  params["per_tensor"] = params["per_tensor"] or None  # a store_true flag: only when set
  roe_lib.check_library(args.library)  # a wrong path before the missing --roe / --merge
  return roe_lib.RoEConfig(mode=routing_mode(args.roe, args.merge),
                           merge_params={k: v for k, v in params.items() if v is not None},
                           **kwargs)


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """`expert-t5x eval ...` (argparse flags; `--gin_file` switches to the gin entry point)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a.startswith("--gin_file") for a in argv):
    return gin_main(["expert-t5x eval"] + argv)
  if any(a == "--oracle" or a.startswith("--oracle=") for a in argv):
    return oracle_main(argv)
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    results = evaluate(**configs_from_args(args))
  except (ValueError, KeyError, OSError) as e:
    return validation.report("expert-t5x eval", e, default=2)  # setup errors: 2
  print(open(os.path.join(args.output_dir, "results.md"), encoding="utf-8").read())
  if results.get("anchors"):
    print(results["anchors"]["markdown"])
    return 0 if results["anchors"]["passed"] else 1
  return 0


# ---------------------------------------------------------------------------------- oracle


def oracle(path: str) -> dict[str, Any]:
  """The oracle of an evaluated expert x prompt matrix (an eval directory or its matrix.npz).

  Datasets come from the results.json beside the matrix.
  """
  from expert_t5x import aggregation  # pylint: disable=g-import-not-at-top
  from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
  matrix = os.path.join(path, results_lib.MATRIX_FILE) if os.path.isdir(path) else path
  results_path = os.path.join(os.path.dirname(matrix), results_lib.RESULTS_FILE)
  for needed in (matrix, results_path):
    if not os.path.isfile(needed):
      raise FileNotFoundError(f"'{needed}' not found; --oracle takes the output directory (or "
                              "matrix.npz) of an evaluation of several experts.")
  acc, expert_ids, prompt_ids = results_lib.read_matrix(matrix)
  tasks = results_lib.read_results(results_path)["tasks"]
  out = aggregation.oracle(acc, expert_ids, prompt_ids, {t["name"]: t["dataset"] for t in tasks})
  out["matrix"] = os.path.abspath(matrix)
  return out


def oracle_markdown(result: Mapping[str, Any]) -> str:
  """The oracle as a Markdown table: per prompt its best expert, then the dataset means."""
  def fmt(x):
    return "n/a" if x is None or x != x else f"{x:.2f}"
  lines = ["| prompt | dataset | best expert | accuracy |", "|---|---|---|---:|"]
  lines += [f"| {p['task']} | {p['dataset']} | {p['expert']} | {fmt(p['accuracy'])} |"
            for p in result["prompts"]]
  lines += ["", "| dataset | mean | median |", "|---|---:|---:|"]
  lines += [f"| {d} | {fmt(v['mean'])} | {fmt(v['median'])} |"
            for d, v in result["datasets"].items()]
  lines += ["", f"Oracle over {result['num_experts']} experts (uses labels: an upper bound): mean "
            f"{fmt(result['mean'])}, median {fmt(result['median'])} over "
            f"{result['num_datasets']} datasets.", ""]
  return "\n".join(lines)


def oracle_main(argv: Sequence[str]) -> int:
  """`expert-t5x eval --oracle DIR_OR_MATRIX [--output oracle.json]`."""
  p = argparse.ArgumentParser(prog="expert-t5x eval --oracle",
                              description="Best expert per prompt of an evaluated matrix.npz.")
  p.add_argument("--oracle", required=True, help="eval output directory or its matrix.npz")
  p.add_argument("--output", help="also write the oracle as JSON here")
  args = p.parse_args(argv)
  try:
    result = oracle(args.oracle)
  except (ValueError, KeyError, FileNotFoundError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"expert-t5x eval --oracle: {message}", file=sys.stderr)
    from expert_t5x import validation  # pylint: disable=g-import-not-at-top
    return validation.exit_code(e, default=2)  # a damaged matrix.npz: 1
  if args.output:
    from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
    results_lib.write_json(args.output, result)
  print(oracle_markdown(result))
  return 0


if __name__ == "__main__":
  # Run the canonical module's main so that gin binds `expert_t5x.eval.evaluate` (the gin files
  # import it by that name), not a second copy living in __main__.
  from expert_t5x import eval as _eval_module  # pylint: disable=g-import-not-at-top,redefined-builtin
  sys.exit(_eval_module.gin_main(sys.argv))
