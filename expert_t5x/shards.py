"""Result shards: one JSON Lines file per (expert chunk, task), the unit of resumable work.

A shard lives at `<output_dir>/shards/<chunk key>/<task>[@<routed subset>].jsonl`. Its first line
holds the `header` (task, experts, content hashes, settings, number and digest of the examples),
the truncation `stats`, the number of records and their sha256; then one prediction record per
(expert, example), expert-major. Shards are written atomically. On resume a shard whose header
matches is reused; one written with other settings is refused (a new output directory, or delete
the shards); a damaged one (unreadable header, missing or garbled records, records that do not
match their digest) is logged in one warning line and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from expert_t5x import aggregation
from expert_t5x import results as results_lib
from expert_t5x import scoring
from expert_t5x.eval_experts import BASE_ID, Chunk
from expert_t5x.eval_tasks import TaskMeta, Vocabulary
from expert_t5x.routing import Routing

SHARDS_DIR = "shards"


def shard_path(output_dir: str, chunk: Chunk, task: str, subset: str = "") -> str:
  """Where the shard of (`chunk`, `task`[, routed `subset`]) lives."""
  return os.path.join(output_dir, SHARDS_DIR, chunk.key, task + subset + ".jsonl")


def routed_subset(routing: Optional[Routing], include_base: bool, chunk: Chunk, task: str) -> str:
  """'' when `chunk` scores every example of `task`; else (a task routed per example) a tag of the
  example ids routed to its expert, so another routing writes its own shard instead of clashing."""
  if routing is None or not routing.per_example(task) or (include_base and chunk.ids == [BASE_ID]):
    return ""
  ids = sorted(str(i) for i, e in routing.routes[task].items() if e == chunk.ids[0])
  return "@" + hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]


def shard_header(task: TaskMeta, chunk: Chunk, examples: Sequence[Mapping[str, Any]],
                 settings: Mapping[str, Any]) -> dict[str, Any]:
  """What a shard must have been computed from to be reused."""
  digest = hashlib.sha256()
  for ex in examples:  # The examples themselves, so changed data never reuse an old shard.
    digest.update(json.dumps([ex["example_id"], ex["inputs"], ex.get("answer_choices"),
                              ex.get("label_index"), ex.get("targets")]).encode())
  return {"schema_version": results_lib.SCHEMA_VERSION, "task": task.name,
          "expert_ids": chunk.ids,
          "content_hashes": [s.metadata.get("content_hash") for s in chunk.specs],
          "settings": dict(settings), "num_examples": len(examples),
          "examples_sha256": digest.hexdigest()}


def _records_digest(lines: bytes) -> str:
  return hashlib.sha256(lines).hexdigest()


def read_shard(path: str) -> tuple[dict[str, Any], list[dict]]:
  """A completed shard's first line (`header` and truncation `stats`) and its records."""
  lines = results_lib.read_jsonl(path)
  if not lines or "header" not in lines[0]:
    raise ValueError(f"Shard '{path}' has no header line; delete it to recompute it.")
  return lines[0], lines[1:]


def shard_done(path: str, header: Mapping[str, Any]) -> bool:
  """Whether a completed, intact shard for `header` exists. A shard written with another header is
  refused rather than silently recomputed or mixed in; a damaged one is logged and recomputed."""
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    first, records = f.readline(), f.read()
  try:
    line = json.loads(first)
    theirs = line["header"]
    if not isinstance(theirs, dict):
      raise TypeError("header is not an object")
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
    return _damaged(path, "its header line is unreadable")
  if results_lib.dumps(theirs) != results_lib.dumps(header):
    diff = sorted(k for k in set(theirs) | set(header)
                  if results_lib.dumps(theirs.get(k)) != results_lib.dumps(header.get(k)))
    raise ValueError(f"Shard '{path}' was written with different {diff}; use a new output "
                     "directory, or delete the shards directory to recompute.")
  why = _records_problem(line, records, int(header["num_examples"]) * len(header["expert_ids"]))
  return _damaged(path, why) if why else True


def _records_problem(first: Mapping[str, Any], records: bytes, expected: int) -> Optional[str]:
  """Why a shard's records cannot be trusted, or None."""
  try:
    rows = [json.loads(r) for r in records.decode("utf-8").splitlines() if r.strip()]
  except (UnicodeDecodeError, json.JSONDecodeError):
    return "a record is not valid JSON"
  if len(rows) != expected or first.get("num_records", expected) != expected:
    return f"it holds {len(rows)} records where its header implies {expected}"
  if not all(isinstance(r, dict) and "example_id" in r for r in rows):
    return "a record is not a prediction record"
  digest = first.get("records_sha256")  # (Shards written before digests were kept have none.)
  if digest is not None and _records_digest(records) != digest:
    return "its records do not match their sha256"
  return None


def _damaged(path: str, why: str) -> bool:
  logging.warning("Shard '%s' is damaged (%s); recomputing it.", path, why)
  return False


def write_shard(path: str, header: Mapping[str, Any], stats: Mapping[str, int],
                records: Sequence[Mapping[str, Any]]) -> None:
  """Writes a shard atomically; its first line records the records' number and sha256."""
  lines = "".join(results_lib.dumps(r) + "\n" for r in records)
  first = {"header": header, "stats": stats, "num_records": len(records),
           "records_sha256": _records_digest(lines.encode("utf-8"))}
  results_lib.write_jsonl(path, [first] + list(records))


def rank_records(task: TaskMeta, chunk: Chunk, examples: Sequence[Mapping[str, Any]],
                 scores: Mapping[int, np.ndarray], options: scoring.ScoringOptions) -> list[dict]:
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
      row = scoring.choice_scores(scores[i][e], choices, options)
      excluded = "gold_not_in_choices" if gold < 0 else None
      out.append(results_lib.prediction_record(choice_scores=row.tolist(),
                                               pred=int(aggregation.predict(row)), gold=gold,
                                               excluded=excluded, **common))
  return out


def generation_records(task: TaskMeta, chunk: Chunk, examples: Sequence[Mapping[str, Any]],
                       texts: Mapping[int, list[str]]) -> list[dict]:
  """Prediction records (expert-major, examples in order) from one decode per expert."""
  out = []
  for e, expert_id in enumerate(chunk.ids):
    for i, ex in enumerate(examples):
      out.append(results_lib.prediction_record(
          task=task.name, dataset=task.dataset, prompt=task.prompt, example_id=ex["example_id"],
          expert_ids=[] if expert_id == BASE_ID else [expert_id], choice_scores=[],
          pred=texts[i][e], gold=ex["targets"], scoring="generate"))
  return out


def run_shard(scorer: scoring.Scorer, task: TaskMeta, chunk: Chunk,
              examples: Sequence[Mapping[str, Any]], encoded: Sequence[scoring.Encoded],
              vocabulary: Vocabulary, batch_size: int, generation_max_length: int,
              progress: Any = None) -> list[dict]:
  """Scores (or decodes) one task under one chunk; returns its prediction records."""
  scorer.set_chunk(chunk)
  if task.scoring:
    scores = scorer.score_encoded(encoded, batch_size, progress)
    if progress is not None:  # Examples without choices are not scored but are done.
      progress.update(sum(1 for e in encoded if not e.choices) * len(chunk.ids))
    return rank_records(task, chunk, examples, scores, scorer.options)
  texts = scorer.generate_encoded(encoded, vocabulary, batch_size, generation_max_length, progress)
  return generation_records(task, chunk, examples, texts)
