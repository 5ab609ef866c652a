"""Evaluation with Retrieval of Experts: retrieve (or merge) library experts per eval prompt,
evaluate.

`expert-t5x eval --library LIB --roe` (or `--merge`), `expert_t5x.eval.evaluate(routing=
RoEConfig(library=...))` and gin's `runs/eval_roe.gin` run the paper's protocol
(reference/elm_method §6-7) end to end:

1. **Retrieve.** For each eval prompt (task), Q unlabeled queries, the first Q of a seeded
   permutation of its eval examples (labels are stripped before retrieval), vote for library
   experts through `retrieval.Retriever` (instance-level nearest keys, task-level majority, the
   contamination guard). The full results go to `retrieval.json`.
2. **Route.** `roe`: the prompt uses its top-voted expert (the fallback when abstaining), or with
   `level` 'dataset' the dataset expert of that expert's dataset (the paper's rule; votes pooled
   per dataset with `dataset_rule` 'pooled'), or with 'instance' each example its own nearest
   key's expert (every example is then a query). `merge`:
   its top-k candidates are merged by `merging.merge_expert_dirs` (uniform by default) into
   `merged/<id>/`, reused by reruns. Given several top-k or λ values, the setting whose merge has
   the lowest mean entropy of softmax(choice scores) on the same queries is chosen per prompt
   (`merging.select_label_free`, scored by the evaluator's `Scorer`): no label is read.
3. **Evaluate.** One `evaluation.evaluate` call with a `Routing`: prompts routed to the same expert
   (or merge) are scored in one pass under it, and the routed entry (`roe` or `merge`) aggregates
   like any other.

`results.json['routing']` records, per prompt, the experts used, the votes, confidence, margin,
abstention, excluded experts and query indices; and the settings: embedder identity, text format,
Q, seed, guard mode, merge method and parameters. Given an earlier run's results.json
(`previous_results`), prompts whose experts changed are listed under `routing['changes']`
(reported, never asserted: adding experts to a library may change routing, never old experts).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from expert_t5x import base_models
from expert_t5x import eval_experts
from expert_t5x import eval_tasks
from expert_t5x import evaluation
from expert_t5x import expert_format
from expert_t5x import library as library_lib
from expert_t5x import merging
from expert_t5x import partitioning
from expert_t5x import results as results_lib
from expert_t5x import retrieval
from expert_t5x import routing as routing_lib
from expert_t5x import scoring
from expert_t5x import validation

MODES = ("roe", "merge")
# Whose expert a prompt's examples use (the paper's retrieval variants): the task-level vote's
# winner (the paper's RoE), its dataset's expert (DE-level), or each example's own nearest key's
# expert (instance-level).
LEVELS = ("task", "dataset", "instance")
FALLBACKS = ("base", "merge")
RETRIEVAL_FILE = "retrieval.json"
MERGED_DIR = "merged"

@dataclasses.dataclass
class RoEConfig:
  """Retrieval and merging settings of a routed evaluation (all recorded in results).

  Attributes:
    mode: 'roe' (the top-voted expert) or 'merge' (a merge of the top-k candidates).
    level: with 'roe': 'task' (the prompt's vote winner), 'dataset' (the winner's dataset expert,
      an expert trained on several prompts of one dataset; the winner itself where the library has
      none, recorded) or 'instance' (every eval example retrieves for itself: its nearest key's
      expert evaluates it; all examples are queries).
    dataset_rule: with level 'dataset', whose dataset: 'winner' (the paper: the task-level
      winner's) or 'pooled' (the dataset with the most votes over its prompt experts).
    embedder: 'minilm', 't5' (the evaluated base's encoder) or 'bm25'.
    minilm_dir: all-MiniLM-L6-v2 sentence-transformers directory (default: the fetched copy).
    max_seq_length: truncation of keys and queries.
    text_format: key/query text format (`retrieval.TEXT_FORMATS`).
    num_queries: Q, unlabeled queries per prompt (32 in the paper).
    seed: seed of the query permutation.
    votes_per_query: keys per query that vote (1 in the paper).
    guard: contamination guard mode (`library.GUARD_MODES`).
    allow_unknown_provenance: under the zero_shot guard, admit experts whose training data is
      unknown (refused by default: they may have been trained on the eval dataset).
    abstain_threshold: abstain below this vote share; then `fallback` ('base' or 'merge').
    merge_method: `merging.METHODS`; 'weighted' weighs the inputs by their votes.
    merge_top_k: k, or several values to choose from label-free.
    merge_lam: λ of task_arithmetic/ties/dare (None: the method's default), or several values.
    merge_params: other method parameters (density, per_tensor, sign_method, drop, seed, combine).
    adapter_reference: task-vector reference of adapter inputs ('auto', 'init', 'zero').
    library: the expert library directory (or URL) retrieved from (`evaluate`'s `library`).
  """
  mode: str = "roe"
  level: str = "task"
  dataset_rule: str = retrieval.DEFAULT_DATASET_RULE
  embedder: str = "minilm"
  minilm_dir: Optional[str] = None
  max_seq_length: int = 256
  text_format: str = retrieval.DEFAULT_TEXT_FORMAT
  num_queries: int = retrieval.DEFAULT_NUM_QUERIES
  seed: int = 0
  votes_per_query: int = 1
  guard: str = "zero_shot"
  abstain_threshold: float = 0.0
  fallback: str = "base"
  merge_method: str = "uniform"
  merge_top_k: Sequence[int] = (3,)
  merge_lam: Sequence[Optional[float]] = (None,)
  merge_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  adapter_reference: str = "auto"
  allow_unknown_provenance: bool = False
  library: Optional[str] = None

  # The CLI flags of fields not named `--<field>` (`validation.label`); mode is --roe / --merge.
  FLAGS = {"level": "--roe_level", "max_seq_length": "--retrieval_max_seq_length",
           "seed": "--retrieval_seed", "mode": None, "merge_params": None}
  _UNIT_PARAMS = ("density", "drop")  # merge_params in [0, 1]

  def __post_init__(self):
    self.merge_top_k = _as_tuple(self.merge_top_k)
    self.merge_params = dict(self.merge_params or {})  # None (gin's MERGE_PARAMS) is no params
    self.merge_lam = _as_tuple(self.merge_lam)
    label = functools.partial(validation.label, self)
    for field in ("num_queries", "votes_per_query", "max_seq_length"):
      validation.positive_int(label(field), getattr(self, field))
    validation.finite(label("abstain_threshold"), self.abstain_threshold,
                      fix="it is a vote share in [0, 1]")
    for k in self.merge_top_k:
      validation.positive_int(label("merge_top_k"), k)
    validation.no_duplicates(label("merge_top_k"), self.merge_top_k)
    validation.finite_all(label("merge_lam"), [x for x in self.merge_lam if x is not None])
    for name in self._UNIT_PARAMS:
      if self.merge_params.get(name) is not None:
        validation.finite(f"--merge_{name} / RoEConfig.merge_params[{name!r}]",
                          self.merge_params[name], 0.0, 1.0)
    checks = [
        (self.mode in MODES, f"mode must be one of {MODES}; got {self.mode!r}."),
        (self.level in LEVELS, f"level must be one of {LEVELS}; got {self.level!r}."),
        (self.dataset_rule in retrieval.DATASET_RULES,
         f"dataset_rule must be one of {retrieval.DATASET_RULES}; got {self.dataset_rule!r}."),
        (self.level == "task" or self.mode == "roe",
         f"level {self.level!r} routes to single experts; use it with mode 'roe', not 'merge'."),
        (self.level != "instance" or (self.abstain_threshold == 0.0 and self.votes_per_query == 1),
         "level 'instance' has no vote to abstain from and uses each example's nearest key; drop "
         "abstain_threshold and votes_per_query."),
        (self.embedder in retrieval.EMBEDDERS,
         f"embedder must be one of {retrieval.EMBEDDERS}; got {self.embedder!r}."),
        (self.text_format in retrieval.TEXT_FORMATS,
         f"text_format must be one of {retrieval.TEXT_FORMATS}; got {self.text_format!r}."),
        (self.guard in library_lib.GUARD_MODES,
         f"guard must be one of {library_lib.GUARD_MODES}; got {self.guard!r}."),
        (self.fallback
         in FALLBACKS, f"fallback must be one of {FALLBACKS}; got {self.fallback!r}."),
        (self.merge_method in merging.METHODS,
         f"merge_method must be one of {merging.METHODS}; got {self.merge_method!r}."),
        (0.0 <= self.abstain_threshold <= 1.0,
         f"abstain_threshold is a vote share in [0, 1]; got {self.abstain_threshold}."),
        (bool(self.merge_top_k) and all(isinstance(k, int) and k >= 1 for k in self.merge_top_k),
         f"merge_top_k must be one or more integers >= 1; got {self.merge_top_k}."),
        (bool(self.merge_lam), "merge_lam must hold at least one value (None for the default)."),
        (self.merge_method not in ("uniform", "weighted") or self.merge_lam == (None,),
         f"merge_lam {self.merge_lam} applies to task_arithmetic, ties and dare, not "
         f"{self.merge_method!r}; drop it or choose one of those methods."),
        ("weights" not in self.merge_params and "lam" not in self.merge_params,
         "merge_params may not set weights (votes weigh 'weighted' merges) or lam (use merge_lam)."
        ),
    ]
    for ok, message in checks:
      if not ok:
        raise validation.UsageError(f"RoE setting: {message}")

  def check_paths(self) -> None:
    """The library is a directory (a URL is read later); the MiniLM directory exists."""
    check_library(self.library)
    if self.minilm_dir and not validation.is_remote(self.minilm_dir):
      validation.existing_dir(validation.label(self, "minilm_dir"), self.minilm_dir,
                              "an all-MiniLM-L6-v2 directory")

  @property
  def merges(self) -> bool:
    """Whether any prompt may be merged (a merge fallback needs a threshold to abstain below)."""
    return self.mode == "merge" or (self.fallback == "merge" and self.abstain_threshold > 0)

  def to_json(self) -> dict[str, Any]:
    out = {
        "mode":
            self.mode, "level":
                self.level, "dataset_rule":
                    self.dataset_rule, "embedder_name":
                        self.embedder, "max_seq_length":
                            self.max_seq_length, "text_format":
                                self.text_format, "num_queries":
                                    self.num_queries, "seed":
                                        self.seed, "votes_per_query":
                                            self.votes_per_query, "guard_mode":
                                                self.guard, "abstain_threshold":
                                                    self.abstain_threshold, "fallback":
                                                        self.fallback,
        **({"allow_unknown_provenance": True} if self.allow_unknown_provenance else {}),
        "queries": ("every eval example (instance-level), labels unread" if self.level == "instance"
                    else "the first Q of a seeded permutation of each prompt's eval examples, "
                    "labels unread")
    }
    if self.merges:
      out["merge"] = {"method": self.merge_method, "top_k": list(self.merge_top_k),
                      "lam": list(self.merge_lam), "params": dict(self.merge_params),
                      "adapter_reference": self.adapter_reference,
                      "selection": ("label-free: lowest mean entropy of softmax(choice scores) "
                                    "on the retrieval queries")
                                   if self.num_candidates > 1 else "fixed"}
    return out

  @property
  def num_candidates(self) -> int:
    return len(self.merge_top_k) * len(self.merge_lam)


def check_library(path: Optional[str]) -> None:
  """`RoEConfig.library` is a directory (a URL is read later)."""
  if path and not validation.is_remote(path):
    validation.existing_dir(validation.label(RoEConfig, "library"), path, "an expert library")


def _as_tuple(value: Any) -> tuple:
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return (value,)


class CachedTaskSource:
  """A task source whose examples are read once (retrieval and evaluation read the same)."""

  def __init__(self, source: eval_tasks.TaskSource):
    self._source = source
    self._examples: dict[tuple, list[dict]] = {}
    self.example_subset = getattr(source, "example_subset", "first")  # recorded in results

  def resolve(self, spec):
    return self._source.resolve(spec)

  def meta(self, task: str) -> eval_tasks.TaskMeta:
    return self._source.meta(task)

  def vocabulary(self, task: str):
    return self._source.vocabulary(task)

  def examples(self, task: str, split: str, max_examples: Optional[int]) -> list[dict]:
    key = (task, split, max_examples)
    if key not in self._examples:
      self._examples[key] = self._source.examples(task, split, max_examples)
    return self._examples[key]


def compact(result: Mapping[str, Any]) -> dict[str, Any]:
  """The per-prompt routing record kept in results.json (the full one is in retrieval.json)."""
  out = {"winner": result["winner"], "selected": result["selected"],
         "votes": {c["expert"]: c["votes"] for c in result["candidates"] if c["votes"]},
         "total_votes": result["total_votes"], "confidence": result["confidence"],
         "margin": result["margin"], "abstained": result["abstained"],
         "identical_key_votes": result["identical_key_votes"],
         "guard": {"mode": result["guard"]["mode"],
                   "excluded": [x["id"] for x in result["guard"]["excluded"]]},
         "query_indices": result["query_indices"], "dataset_level": result.get("dataset_level")}
  if "warning" in result:
    out["warning"] = result["warning"]
  return out


def routing_changes(previous: Mapping[str, Any], routing: routing_lib.Routing,
                    tasks: Sequence[str], where: str = "previous results") -> dict[str, Any]:
  """Prompts whose experts differ from an earlier routed run (a report, not a check)."""
  before = (previous.get("routing") or {}).get("tasks")
  if not before:
    raise ValueError(f"{where} hold no routing; pass the results.json of an earlier "
                     "`eval --roe` or `--merge` run.")
  compared = [t for t in tasks if t in before]
  changed = [{"task": t, "before": before[t]["expert_ids"], "after": routing.used(t)}
             for t in compared if list(before[t]["expert_ids"]) != routing.used(t)]
  return {"previous": where, "num_compared": len(compared), "num_changed": len(changed),
          "changed": changed}


class _Merges:
  """Merged experts of retrieved candidates, written once under `<output_dir>/merged/<id>`."""

  def __init__(self, lib: library_lib.Library, output_dir: str, config: RoEConfig,
               base: base_models.BaseModel):
    self.lib, self.config, self.base = lib, config, base
    self.root = os.path.join(output_dir, MERGED_DIR)

  def get(self, result: Mapping[str, Any], top_k: int, lam: Optional[float]
          ) -> tuple[str, str, list[str], dict[str, Any]]:
    """(merge id, directory, input expert ids, recipe) for the top-k of a retrieval result."""
    chosen = result["candidates"][:top_k]
    ids = [c["expert"] for c in chosen]
    dirs = [self.lib.expert_dir(i) for i in ids]
    metas = [expert_format.read_metadata(d) for d in dirs]
    method, params = self.config.merge_method, dict(self.config.merge_params)
    if lam is not None:
      params["lam"] = lam
    if method == "weighted":
      params["weights"] = [c["votes"] for c in chosen]
      if sum(params["weights"]) <= 0:  # No input was voted for: weigh them equally.
        params["weights"] = [1.0] * len(chosen)
    text = json.dumps([method, params, [m["content_hash"] for m in metas],
                       self.config.adapter_reference], sort_keys=True)
    merge_id = "merge-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    path = os.path.join(self.root, merge_id)
    if not expert_format.is_expert_dir(path):  # Reruns reuse the merge (same inputs, same recipe).
      base_params = init = None
      if method not in ("uniform", "weighted"):
        base_params = self.base.params
        if self.config.adapter_reference != "zero":
          init = merging.adapter_init_params(metas, self.base.params, self.base.config)
      merging.merge_expert_dirs(dirs, path, method, base_params=base_params, init_params=init,
                                adapter_reference=self.config.adapter_reference,
                                input_names=ids, **params)
    return merge_id, path, ids, expert_format.read_metadata(path)["merge"]


def query_choice_scores(scorer: scoring.Scorer, expert_dir: str, examples: Sequence[Mapping],
                        vocabulary: Any, feature_lengths: Mapping[str, Optional[int]],
                        batch_size: int) -> np.ndarray:
  """`[Q, K]` choice scores of unlabeled queries under one expert, as the evaluator scores them.

  Absent choices are -inf; queries without choices are left out.
  """
  queries = [dict(q, label_index=-1, targets="") for q in retrieval.unlabeled(examples)
             if q.get("answer_choices")]
  if not queries:
    return np.zeros((0, 0), np.float32)
  scorer.set_chunk(eval_experts.expert_chunk(expert_dir, "candidate"))
  encoded, _ = scoring.encode_examples(queries, vocabulary, feature_lengths, True)
  scores = scorer.score_encoded(encoded, batch_size)
  rows = [scoring.choice_scores(scores[i][0], q["answer_choices"], scorer.options)
          for i, q in enumerate(queries)]
  out = np.full((len(rows), max(len(r) for r in rows)), -np.inf, np.float64)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def _check_library_base(lib: library_lib.Library, base: base_models.BaseModel,
                        allow_mismatch: bool) -> None:
  theirs = lib.base_fingerprint()
  if theirs and base.fingerprint and theirs != base.fingerprint and not allow_mismatch:
    raise ValueError(
        f"Library '{lib.root}' holds experts of base {theirs[:16]}... but the evaluated "
        f"base is {base.fingerprint[:16]}...; pass the base the library was built on, "
        "or allow_base_mismatch=True (--allow_base_mismatch).")


def evaluate(*, tasks: str | Sequence[str], output_dir: str, base: base_models.BaseModel,
             config: RoEConfig, library: Optional[str] = None,
             task_source: Optional[eval_tasks.TaskSource] = None, split: str = "validation",
             max_examples: Optional[int] = None, batch_size: int = 32,
             options: scoring.ScoringOptions = scoring.ScoringOptions(),
             feature_lengths: Optional[Mapping[str, Optional[int]]] = None,
             include_base: bool = False,
             partitioner: Optional[partitioning.PjitPartitioner] = None,
             allow_base_mismatch: bool = False, previous_results: Optional[str] = None,
             embedder: Any = None, lookup: Optional[retrieval.TemplateLookup] = None,
             scorer: Optional[scoring.Scorer] = None, **evaluate_kwargs: Any) -> dict[str, Any]:
  """Retrieves (and merges) per eval prompt, then evaluates; returns results.json's object.

  Args:
    tasks: a suite, a task, or a list / comma-separated string of them.
    output_dir: the evaluation directory (resumed when it exists).
    base: the frozen base (`base_models.load_base`); its fingerprint must match the library's.
    config: retrieval and merging settings.
    library: the expert library directory (default: `config.library`).
    task_source: tasks and examples (default: the registered seqio_tasks).
    split, max_examples, batch_size, options, feature_lengths, partitioner,
    allow_base_mismatch: as `evaluation.evaluate`.
    include_base: also evaluate the base alone on every prompt.
    previous_results: an earlier routed run's results.json: report routing changes against it.
    embedder: an embedder object to use instead of `config.embedder` (tests, custom encoders).
    lookup: template lookup for `choice` text formats (default: promptsource's templates).
    scorer: a `Scorer` to reuse (same base and options; its compiled functions are kept), for
      label-free merge selection and the evaluation.
    **evaluate_kwargs: passed to `evaluation.evaluate` (bootstrap_samples, seed, progress, ...).
  """
  if library and config.library and library != config.library:
    raise ValueError(f"Two libraries given: library {library!r} and config.library "
                     f"{config.library!r}; pass one of them.")
  library = library or config.library
  if not library:
    raise ValueError("RoE and merge evaluation need an expert library (--library LIB).")
  lib = library_lib.Library(library)
  _check_library_base(lib, base, allow_base_mismatch)
  source = CachedTaskSource(task_source or eval_tasks.SeqioTaskSource())
  task_names = source.resolve(tasks)
  examples = {t: source.examples(t, split, max_examples) for t in task_names}
  if embedder is None:
    embedder = retrieval.make_embedder(
        config.embedder, minilm_dir=config.minilm_dir, max_seq_length=config.max_seq_length,
        t5_base=(base.params, base.config, source.vocabulary(task_names[0])))
  if lookup is None and config.text_format.startswith("choice"):
    lookup = retrieval.promptsource_lookup()
  retriever = retrieval.Retriever(lib, embedder, text_format=config.text_format, lookup=lookup)
  # Instance-level: every example is a query (the seeded permutation then covers them all).
  num_queries = (max(len(examples[t]) for t in task_names) if config.level == "instance"
                 else config.num_queries)
  results = retriever.retrieve_many([retrieval.unlabeled(examples[t]) for t in task_names],
                                    guard=config.guard,
                                    allow_unknown_provenance=config.allow_unknown_provenance,
                                    num_queries=num_queries,
                                    seed=config.seed,
                                    votes_per_query=config.votes_per_query,
                                    abstain_threshold=config.abstain_threshold,
                                    fallback=config.fallback,
                                    dataset_rule=config.dataset_rule)
  library_info = {
      "path": lib.url if lib.remote else lib.root, "num_experts": len(retriever.entries),
      "num_keys": len(retriever.keys.texts)
  }
  del retriever  # frees its key embeddings and score buffer before the models load
  retrieved = dict(zip(task_names, results))
  for t in task_names:
    retrieved[t]["task"] = t
  os.makedirs(output_dir, exist_ok=True)
  info = dict(config.to_json(), embedder=embedder.identity, library=library_info)
  results_lib.write_json(os.path.join(output_dir, RETRIEVAL_FILE),
                         dict(info, results=[retrieved[t] for t in task_names]))

  feature_lengths = dict(evaluation.DEFAULT_FEATURE_LENGTHS if feature_lengths is None
                         else feature_lengths)
  if scorer is None and config.merges and config.num_candidates > 1:
    scorer = scoring.Scorer(base.config, base.params,
                               partitioner or partitioning.PjitPartitioner(), options)
  merges = _Merges(lib, output_dir, config, base)
  routes, used, details, dirs = {}, {}, {}, {}
  for t in task_names:
    result, detail = retrieved[t], compact(retrieved[t])
    selected = result["selected"]  # The winner, or the fallback when abstaining.
    if config.level == "instance":
      routes[t] = instance_routes(result, examples[t])
      dirs.update({e: lib.expert_dir(e) for e in set(routes[t].values())})
      detail.pop("query_indices")  # every example; its expert is in predictions.jsonl
    elif config.level == "dataset" and selected == result["winner"]:
      routes[t] = dataset_expert(result, detail)
      dirs[routes[t]] = lib.expert_dir(routes[t])
    elif selected == eval_experts.BASE_ID:
      routes[t] = eval_experts.BASE_ID
    elif config.mode == "roe" and selected != "merge":
      routes[t], dirs[selected] = selected, lib.expert_dir(selected)
    else:
      top_k, lam = _choose_merge(config, merges, result, scorer, examples[t], source, t,
                                 feature_lengths, batch_size, detail)
      merge_id, path, inputs, recipe = merges.get(result, top_k, lam)
      routes[t], used[t], dirs[merge_id] = merge_id, inputs, path
      detail["merge"] = {"id": merge_id, "inputs": inputs, "top_k": len(inputs), "lam": lam,
                         "method": recipe["method"], "output_hash": recipe["output_hash"]}
    details[t] = detail
  routing = routing_lib.Routing(name=config.mode, routes=routes, expert_ids=used,
                                details=details, info=info)
  if previous_results:
    routing.info["changes"] = routing_changes(results_lib.read_results(previous_results),
                                              routing, task_names, previous_results)
  ids = sorted(dirs)
  return evaluation.evaluate(
      tasks=task_names, output_dir=output_dir, base=base, expert_paths=[dirs[i] for i in ids],
      expert_names=ids, include_base=include_base, split=split, max_examples=max_examples,
      batch_size=batch_size, options=options, feature_lengths=feature_lengths,
      partitioner=partitioner, allow_base_mismatch=allow_base_mismatch,
      task_source=source, routing=routing, scorer=scorer, **evaluate_kwargs)


def instance_routes(result: Mapping[str, Any], examples: Sequence[Mapping[str, Any]]
                    ) -> dict[Any, str]:
  """{example_id: the expert of its nearest key}: instance-level RoE from a retrieval whose queries
  were all of the prompt's examples."""
  if len(result["query_indices"]) != len(examples):
    raise ValueError(f"Instance-level routing needs every example as a query; the retrieval has "
                     f"{len(result['query_indices'])} of {len(examples)}.")
  return {examples[i]["example_id"]: expert
          for i, expert in zip(result["query_indices"], result["instance_level"])}


def dataset_expert(result: Mapping[str, Any], detail: dict[str, Any]) -> str:
  """DE-level RoE: the dataset expert of the vote's dataset (by the retrieval's `dataset_rule`),
  else the task-level winner, with the reason recorded in `detail`."""
  level = result["dataset_level"]
  if level.get("expert"):
    return level["expert"]
  why = (f"the library has no dataset expert for {level['dataset']!r}" if level["dataset"]
         else f"no voted expert records a dataset (rule {level.get('rule')!r})")
  detail["dataset_level_fallback"] = f"{why}; used the task-level winner"
  return result["winner"]


def _choose_merge(config: RoEConfig, merges: _Merges, result: Mapping[str, Any],
                  scorer: Optional[scoring.Scorer], examples: Sequence[Mapping], source: Any,
                  task: str, feature_lengths: Mapping[str, Optional[int]], batch_size: int,
                  detail: dict[str, Any]) -> tuple[int, Optional[float]]:
  """(top-k, λ): the only setting, or the label-free choice on the retrieval's own queries."""
  candidates = [(k, lam) for k in config.merge_top_k for lam in config.merge_lam]
  queries = [examples[i] for i in result["query_indices"]]
  if len(candidates) == 1 or not any(q.get("answer_choices") for q in queries):
    if len(candidates) > 1:
      detail["label_free"] = {"skipped": "the queries have no answer choices"}
    return candidates[0]
  vocabulary = source.vocabulary(task)

  def score_fn(candidate: tuple[int, Optional[float]]) -> np.ndarray:
    _, path, _, _ = merges.get(result, *candidate)
    return query_choice_scores(scorer, path, queries, vocabulary, feature_lengths, batch_size)

  best, table = merging.select_label_free(candidates, score_fn)
  detail["label_free"] = {
      "criterion": "mean entropy of softmax(choice scores) on the retrieval queries",
      "table": [{"top_k": c["candidate"][0], "lam": c["candidate"][1], "entropy": c["entropy"]}
                for c in table],
      "selected": {"top_k": best[0], "lam": best[1]}}
  return best
