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

A `Routing` evaluates one composed entry instead (RoE, per-prompt merges; see
`expert_t5x.routed_evaluation`): each task only under the expert routed to it, one chunk per expert
over all of its tasks.

Shards are written atomically under `<output_dir>/shards/`; a rerun skips every intact shard whose
header matches (same task, experts, protocol), so an interrupted evaluation resumes where it
stopped (`expert_t5x.shards`). Final files are computed from the shards alone (see
`expert_t5x.results`).

This module runs an evaluation and assembles its results. Its parts: `scoring` (the options,
tokenizing, batching and the `Scorer`), `eval_tasks` (task sources, the vocabulary check),
`eval_experts` (expert specs and chunks), `routing` (composed entries and the plan), `shards`
and `base_models`.

Protocol (the paper's, see `expert_t5x.aggregation`): summed target log-probs including EOS, no
length normalisation, argmax with ties to the lowest index. `scoring='mean'` (per target token),
`'per_char'` (lm-eval `acc_norm`) and `logit_vocab_limit` are named options recorded in every
result. Every answer choice is scored whatever their number; an example without choices, or whose
target is not among them, is counted and reported (`excluded` in predictions), never dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expert_t5x import aggregation
from expert_t5x import file_io
from expert_t5x import network
from expert_t5x import partitioning
from expert_t5x import results as results_lib
from expert_t5x import shards
from expert_t5x.base_models import BaseModel
from expert_t5x.eval_experts import BASE_ID, ExpertSpec, check_expert_bases, load_expert_specs
from expert_t5x.eval_tasks import SeqioTaskSource, TaskMeta, TaskSource, check_vocabulary
from expert_t5x.routing import Plan, Routing, check_example_routes, make_plan
from expert_t5x.scoring import Scorer, ScoringOptions, encode_examples

DEFAULT_FEATURE_LENGTHS = {"inputs": 512, "targets": None}
# The paper's input lengths (`max_source_length`; its code evaluates a run with the config it
# trained with): 256 in the prompt-expert configs (228 of the 296 PEs, hence its per-expert unseen,
# seen and RoE numbers, RoE being a lookup of those), 512 elsewhere (T0-3B, the 68 long-input PEs
# of cnn_dailymail, common_gen, duorc, hotpot_qa, multi_news, samsum, wiki_bio, wiki_qa and xsum,
# the RoE merge configs, the continual cT0 configs).
PAPER_INPUT_LENGTHS = {"pe_256": 256, "long_512": 512}


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
      check_example_routes(routing, meta.name, loaded[-1][1])
  os.makedirs(output_dir, exist_ok=True)
  todo = [
  ]  # (meta, examples, vocabulary, [(chunk, path, header, rows)]) of shards still to compute.
  for meta, examples, vocabulary in loaded:
    pending = []
    for chunk in (c for c, chunk_tasks in plan if meta.name in chunk_tasks):
      subset = shards.routed_subset(routing, include_base, chunk, meta.name)
      path = shards.shard_path(output_dir, chunk, meta.name, subset)
      rows = (list(range(len(examples))) if not subset else [
          i for i, ex in enumerate(examples)
          if routing.routed_to(meta.name, chunk.ids[0], ex["example_id"])
      ])
      header = shards.shard_header(meta, chunk, [examples[i] for i in rows], settings)
      if not shards.shard_done(path, header):
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
          records = shards.run_shard(
              scorer, meta, chunk, [examples[i] for i in rows],
              [dataclasses.replace(encoded[i], index=j) for j, i in enumerate(rows)],
              vocabulary, batch_size, generation_max_length, bar)
        else:
          records = shards.run_shard(scorer, meta, chunk, examples, encoded, vocabulary,
                                     batch_size, generation_max_length, bar)
        shards.write_shard(path, header, counts, records)
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
    raise ValueError(
        f"{wanted[0]} (and {len(wanted) - 1} more) is scored with BERTScore precision; "
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
  # predictions.jsonl is streamed to a unique temporary file, renamed into place when complete.
  writer = (file_io.atomic_path(predictions_path) if write_predictions
            else contextlib.nullcontext(None))
  with writer as tmp_predictions:
    out = open(tmp_predictions, "w", encoding="utf-8") if tmp_predictions else None
    try:
      for chunk, chunk_tasks in plan:
        # One chunk's shards in memory at a time; records are written entry-major.
        chunk_metas = [m for m in metas if m.name in chunk_tasks]
        by_entry: dict[tuple[str, str], list[dict]] = {}
        for m in chunk_metas:
          subset = shards.routed_subset(routing, BASE_ID in entries, chunk, m.name)
          first, records = shards.read_shard(shards.shard_path(output_dir, chunk, m.name, subset))
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
