"""Retrieval of Experts (RoE): key texts as the paper, cached key embeddings, voting and
diagnostics.

(Over 600 lines on purpose: the key texts, the key-embedding cache, the vote and its diagnostics are
one protocol, read together against the paper's retrieval code.)

Task-level RoE (reference/elm_method §6): take Q (32) unlabeled instances of the eval prompt (the
first Q of a seeded permutation, recorded), let each vote for the expert of its nearest key(s), and
pick the majority. Ties go to the expert whose best voted key has the lowest key id, then to the
lowest expert id (the paper's code broke ties by insertion order and by float-keyed dicts). The
result carries the ranked candidate list with vote counts (for top-k merging), a confidence
(winner's vote share) with an optional abstain threshold and fallback, and a warning when winning
votes came from key texts shared by several experts (e.g. all generative experts under `label`
formats). Instance-level and dataset-expert-level variants are provided. Search is one BLAS matrix
product for all prompts that see the same experts.

Key texts (`format_text`), exactly the paper's `get_text_format` (retrieval/make_index.py for keys,
retrieval/run_retrieval.py for queries):
  instance        "Instance: {inputs}"
  label           "Answer Choices: {', '.join(answer_choices)}"     (empty when there are no
  choices) choice          "Answer Choices: {raw promptsource answer_choices expression}"   ("None"
  when the
                  template has none: the paper formats Python's None)
  label_instance  "Answer Choices: {labels}, Instance: {inputs}"    (default)
  choice_instance "Answer Choices: {choices}, Instance: {inputs}"
  *_new           the same without prefixes, "</s>" joining choices and instance.
Experts without answer choices (generative prompts) thus all share the key text prefix
"Answer Choices: , Instance: " under `label_instance`, as in the paper.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from expert_t5x import embedders as embedders_lib
from expert_t5x import file_io
from expert_t5x import library as library_lib
from expert_t5x import validation

TEXT_FORMATS = ("instance", "label", "choice", "label_instance", "choice_instance", "instance_new",
                "label_new", "choice_new", "label_instance_new", "choice_instance_new")
DEFAULT_TEXT_FORMAT = "label_instance"
DEFAULT_NUM_QUERIES = 32
# Dataset-expert-level RoE: which dataset's expert a prompt uses. 'winner' (the paper,
# run_task_32.py: `picked_expert.split('@')[0]`): the dataset of the task-level vote's winner;
# 'pooled': the dataset whose prompt experts got the most votes together.
DATASET_RULES = ("winner", "pooled")
DEFAULT_DATASET_RULE = "winner"

# (dataset, subset, prompt) -> the template's raw answer_choices expression (None if it has none).
TemplateLookup = Callable[[str | None, str | None, str | None], str | None]


class RetrievalError(ValueError):
  """Bad retrieval input (the message says what to do)."""


# ----------------------------------------------------------------------------
# Key and query texts.
# ----------------------------------------------------------------------------


def _labels(row: Mapping[str, Any]) -> str:
  # The paper: `label_list = '' if label_list == None else ", ".join(label_list)`.
  return ", ".join(str(c) for c in row.get("answer_choices") or ())


def _raw_choices(row: Mapping[str, Any], lookup: TemplateLookup | None) -> str:
  if "answer_choices_template" in row:
    raw = row["answer_choices_template"]
  elif lookup is not None:
    try:
      raw = lookup(row.get("dataset"), row.get("subset"), row.get("prompt"))
    except (LookupError, FileNotFoundError) as e:
      raise RetrievalError(
          f"Template lookup failed for ({row.get('dataset')}, {row.get('subset')}, "
          f"{row.get('prompt')!r}): {e}. `choice` formats need the promptsource template; "
          f"use a label format or fix the prompt name.") from e
  else:
    raise RetrievalError(
        f"Text format 'choice*' needs the raw answer_choices expression of prompt "
        f"{row.get('prompt')!r}: keys/queries lack 'answer_choices_template' and no "
        f"template lookup was given. Use a label format (e.g. label_instance).")
  # The paper formats the template's `answer_choices` as is: None (no choices) becomes "None".
  return f"{raw}"


def format_text(row: Mapping[str, Any], text_format: str = DEFAULT_TEXT_FORMAT,
                lookup: TemplateLookup | None = None) -> str:
  """The string fed to the encoder for a key or query `row` (canonical example fields)."""
  if text_format not in TEXT_FORMATS:
    raise RetrievalError(f"Unknown text format {text_format!r}; expected one of {TEXT_FORMATS}.")
  base = text_format[:-len("_new")] if text_format.endswith("_new") else text_format
  new = base != text_format
  source = str(row.get("inputs", ""))
  choices = ""
  if base.startswith("label"):
    choices = _labels(row)
  elif base.startswith("choice"):
    choices = _raw_choices(row, lookup)
  if base == "instance":
    return source if new else f"Instance: {source}"
  if base in ("label", "choice"):
    return choices if new else f"Answer Choices: {choices}"
  return f"{choices}</s>{source}" if new else f"Answer Choices: {choices}, Instance: {source}"


# What retrieval may read of an eval example: never its label or target. A whitelist: a field added
# to examples later stays hidden until it is known to be label-free.
UNLABELED_FIELDS = ("inputs", "answer_choices", "answer_choices_template", "dataset", "subset",
                    "prompt", "task", "example_id")


def unlabeled(examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The examples without labels or targets (what retrieval and label-free selection may see)."""
  return [{k: ex[k] for k in UNLABELED_FIELDS if k in ex} for ex in examples]


def select_queries(num_examples: int,
                   num_queries: int = DEFAULT_NUM_QUERIES,
                   seed: int = 0) -> list[int]:
  """Indices of the unlabeled queries: the first Q of a seeded permutation of the eval split."""
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [int(i) for i in perm[:num_queries]]


# ----------------------------------------------------------------------------
# Voting on a score matrix (pure functions).
# ----------------------------------------------------------------------------


def top_keys(scores: np.ndarray, k: int = 1) -> np.ndarray:
  """Indices [Q, k] of each query's k best keys; equal scores go to the lowest key id."""
  scores = np.asarray(scores)
  n = scores.shape[1]
  k = min(k, n)
  if k == 1:
    return np.argmax(scores, axis=1)[:, None]  # argmax returns the first (lowest) index among ties
  out = np.empty((scores.shape[0], k), np.int64)
  for q, row in enumerate(scores):
    kth = np.partition(row, n - k)[n - k]
    cand = np.nonzero(row >= kth)[0]  # all ties at the boundary, then order by (-score, id)
    out[q] = cand[np.lexsort((cand, -row[cand]))][:k]
  return out


def top_key_by_expert(scores: np.ndarray, best: np.ndarray, key_offsets: np.ndarray) -> np.ndarray:
  """[Q] each query's best key, found through its per-expert maxima `best` [Q, E]
  (`per_expert_max`).

  Equals `top_keys(scores, 1)[:, 0]` exactly, ties included: keys are ordered by expert, so the
  lowest key holding the maximum lies in the lowest expert whose maximum it is, and only that
  expert's keys are searched. This reads Q x (keys per expert) scores instead of all Q x N a second
  time.
  """
  winner = np.argmax(best, axis=1)
  starts = key_offsets[winner]
  counts = key_offsets[winner + 1] - starts
  within = np.arange(int(counts.max()))
  inside = within[None, :] < counts[:, None]
  columns = np.where(inside, starts[:, None] + within[None, :], starts[:, None])
  values = np.take_along_axis(scores, columns, axis=1)
  values[~inside] = -np.inf
  return starts + np.argmax(values, axis=1)


def vote(scores: np.ndarray, key_expert: np.ndarray, num_experts: int,
         votes_per_query: int = 1, top: np.ndarray | None = None) -> dict[str, Any]:
  """Task-level vote: each query's top keys vote for their experts; ranked by (-votes, best key,
  expert).

  Args:
    scores: [Q, N] query-key similarities.
    key_expert: [N] expert index of each key.
    num_experts: number of experts E.
    votes_per_query: keys per query that vote (1 = the paper).
    top: the [Q, votes_per_query] voting keys when already known (default: `top_keys(scores, ...)`).

  Returns:
    {'votes' [E], 'ranked' [expert indices with votes, best first], 'top' [Q, k] key ids,
     'first_key' [E] lowest voted key id per expert (N if none)}.
  """
  top = top_keys(scores, votes_per_query) if top is None else top
  votes, first_key = _vote_counts(top, np.asarray(key_expert), np.zeros(len(top), np.int64), 1,
                                  num_experts, scores.shape[1])
  return {
      "votes": votes[0], "ranked": _ranked(votes[0], first_key[0]), "top": top,
      "first_key": first_key[0]
  }


def _vote_counts(top: np.ndarray, key_expert: np.ndarray, prompt_of_row: np.ndarray,
                 num_prompts: int, num_experts: int,
                 num_keys: int) -> tuple[np.ndarray, np.ndarray]:
  """([P, E] votes, [P, E] lowest voted key id, N if none) of several prompts' queries at once."""
  cell = (prompt_of_row[:, None] * num_experts + key_expert[top]).ravel()
  votes = np.bincount(cell, minlength=num_prompts * num_experts).reshape(num_prompts, num_experts)
  first_key = np.full(num_prompts * num_experts, num_keys, np.int64)
  np.minimum.at(first_key, cell, top.ravel())
  return votes, first_key.reshape(num_prompts, num_experts)


def _ranked(votes: np.ndarray, first_key: np.ndarray) -> list[int]:
  """Experts with votes by (-votes, lowest voted key, expert id): lexsort's last key is the
  primary."""
  voted = np.flatnonzero(votes)
  return voted[np.lexsort((voted, first_key[voted], -votes[voted]))].tolist()


def per_expert_max(scores: np.ndarray, key_offsets: np.ndarray) -> np.ndarray:
  """[Q, E] each query's best key score per expert (keys of expert e: offsets[e]:offsets[e+1]).

  Experts without keys get -inf.
  """
  starts = key_offsets[:-1]
  nonempty = key_offsets[1:] > starts
  best = np.full((scores.shape[0], len(starts)), -np.inf, np.float32)
  best[:, nonempty] = np.maximum.reduceat(scores, starts[nonempty], axis=1)
  return best


def expert_similarity(scores: np.ndarray, key_offsets: np.ndarray) -> np.ndarray:
  """[E] mean over queries of each expert's best key score (keys of expert e:
  offsets[e]:offsets[e+1]);
  `summarize` reports it as each candidate's `similarity`."""
  return _mean_per_prompt(per_expert_max(scores, key_offsets), np.array([0, len(scores)]))[0]


def _mean_per_prompt(best: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """[P, E] mean over each prompt's rows (starts[p]:starts[p+1]) of [R, E] maxima, summed in
  float64."""
  return np.add.reduceat(best.astype(np.float64), starts[:-1], axis=0) / np.diff(starts)[:, None]


# ----------------------------------------------------------------------------
# Key sets and the embedding cache.
# ----------------------------------------------------------------------------


class KeySet:
  """The keys of some library experts, in library order: texts, expert index per key, offsets."""

  def __init__(self, expert_ids: Sequence[str], texts_per_expert: Sequence[Sequence[str]],
               rows_per_expert: Sequence[Sequence[Mapping[str, Any]]]):
    self.expert_ids = list(expert_ids)
    self.texts_per_expert = [list(t) for t in texts_per_expert]
    self.texts = [t for ts in self.texts_per_expert for t in ts]
    self.rows = [r for rs in rows_per_expert for r in rs]
    counts = np.array([len(t) for t in self.texts_per_expert], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(counts)])
    self.key_expert = np.repeat(np.arange(len(counts)), counts)
    # Which experts share each key text (identical keys cannot discriminate between them).
    owners: dict[str, set[int]] = {}
    for e, texts in enumerate(self.texts_per_expert):
      for t in texts:
        owners.setdefault(t, set()).add(e)
    self.shared = np.array([len(owners[t]) > 1 for t in self.texts], bool)


def build_key_set(lib: library_lib.Library, expert_ids: Sequence[str], text_format: str,
                  lookup: TemplateLookup | None = None) -> KeySet:
  """Reads each expert's keys.jsonl and formats them; experts without keys are refused."""
  texts, rows = [], []
  for eid in expert_ids:
    keys = lib.keys(eid)
    if not keys:
      raise RetrievalError(f"Expert '{eid}' has no retrieval keys; its keys.jsonl is empty.")
    rows.append(keys)
    texts.append([format_text(k, text_format, lookup) for k in keys])
  return KeySet(expert_ids, texts, rows)


def _texts_hash(texts: Sequence[str]) -> str:
  return hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()[:32]


def _embedding_digest(identity: str, name: str, block: np.ndarray) -> str:
  """sha256 of a cache block's bytes, shape and dtype, its embedder identity and its file name."""
  digest = hashlib.sha256(json.dumps([identity, name, list(block.shape), block.dtype.str]).encode())
  digest.update(np.ascontiguousarray(block).tobytes())
  return digest.hexdigest()


def _read_cached_block(path: str, identity: str, count: int) -> np.ndarray | None:
  """A cache file's [count, D] block, or None when it is absent or damaged (damage is warned about).

  The stored digest catches what the file format cannot: garbled vectors under an intact header.
  """
  if not os.path.isfile(path):
    return None
  name = os.path.basename(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      block, stored = data["embeddings"], str(data["digest"])
  except Exception as e:  # pylint: disable=broad-except  # a cache is only a speed-up: recompute it
    why = f"unreadable: {validation.one_line(e)}"
  else:
    if (block.ndim == 2 and block.dtype == np.float32 and block.shape[0] == count
        and stored == _embedding_digest(identity, name, block)):
      return block
    why = f"{block.shape} {block.dtype} array whose digest does not match"
  print(f"warning: embedding cache '{path}' is damaged ({why}); recomputing it.", file=sys.stderr)
  return None


def _write_cached_block(path: str, identity: str, block: np.ndarray) -> bool:
  """Writes a cache file with its digest -> whether it could (a read-only library: no, warned
  about once). Modes follow the library's: a group-shared library's members share the cache."""
  directory = os.path.dirname(path)
  shared = library_lib.group_shared(os.path.dirname(directory))
  digest = np.array(_embedding_digest(identity, os.path.basename(path), block))

  try:
    if not os.path.isdir(directory):
      os.makedirs(directory, exist_ok=True)
      if shared:
        os.chmod(directory, file_io.creation_mode(True, True))
    file_io.atomic_write(path, lambda f: np.savez(f, embeddings=block, digest=digest), mode="wb",
                         file_mode=file_io.creation_mode(False, shared))
  except OSError as e:
    print(f"warning: embedding cache '{path}' not written ({validation.one_line(e)}); key "
          f"embeddings are not cached in this run.", file=sys.stderr)
    return False
  return True


def cached_key_embeddings(lib: library_lib.Library, embedder: Any, keys: KeySet) -> np.ndarray:
  """[N, D] key embeddings, cached per expert in the library under the embedder's identity.

  Cache files are named by a hash of the expert's formatted key texts, so adding experts embeds only
  the new keys and a changed text format or key file never reuses stale vectors. Each holds its
  vectors and their digest; a file that fails the check is recomputed, never used.
  """
  directory = os.path.join(lib.root, library_lib.EMBEDDINGS_DIR, embedder.identity)
  blocks, writable = [], True
  for texts in keys.texts_per_expert:
    path = os.path.join(directory, f"{_texts_hash(texts)}.npz")
    block = _read_cached_block(path, embedder.identity, len(texts))
    if block is None:
      block = np.asarray(embedder.embed(texts), np.float32)
      writable = writable and _write_cached_block(path, embedder.identity, block)
    blocks.append(block)
  return np.concatenate(blocks, axis=0) if blocks else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------
# Retrieval for eval prompts.
# ----------------------------------------------------------------------------


def reduce_scores(scores: np.ndarray,
                  keys: KeySet,
                  votes_per_query: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """What a summary needs of an [R, N] score matrix: [R, E] per-expert maxima and [R, k] voting
  keys.

  Rows are independent, so a matrix may be reduced in row blocks and the results concatenated.
  """
  if scores.shape[1] == 0:
    raise RetrievalError("No keys to retrieve from (every expert excluded by the guard?).")
  best = per_expert_max(scores, keys.offsets)
  # One vote per query (the paper): find the nearest key through `best` rather than a second full
  # pass.
  top = (top_key_by_expert(scores, best, keys.offsets)[:, None] if votes_per_query == 1
         else top_keys(scores, votes_per_query))
  return best, top


def summarize(scores: np.ndarray,
              keys: KeySet,
              *,
              votes_per_query: int = 1,
              **options: Any) -> dict[str, Any]:
  """Task-level decision, ranked candidates and diagnostics from one prompt's [Q, N] score
  matrix."""
  best, top = reduce_scores(scores, keys, votes_per_query)
  return summarize_reduced(best, top, keys, np.array([0, scores.shape[0]]), **options)[0]


def summarize_reduced(best: np.ndarray, top: np.ndarray, keys: KeySet, starts: np.ndarray, *,
                      abstain_threshold: float = 0.0, fallback: str = "base",
                      dataset_experts: Mapping[str, str] | None = None,
                      dataset_rule: str = DEFAULT_DATASET_RULE) -> list[dict[str, Any]]:
  """Per-prompt results from `reduce_scores`' output for P prompts (rows starts[p]:starts[p+1]).

  Vote counts, similarities and the similarity order are computed for all prompts in a few array
  operations; only the result records are built per prompt.
  """
  num_prompts, num_experts = len(starts) - 1, len(keys.expert_ids)
  counts = np.diff(starts)
  votes, first_key = _vote_counts(top, keys.key_expert, np.repeat(np.arange(num_prompts), counts),
                                  num_prompts, num_experts, keys.key_expert.size)
  similarity = _mean_per_prompt(best, starts)
  # Unvoted experts by (-similarity, id), every prompt at once: lexsort's last key is the primary
  # one.
  by_similarity = np.lexsort((np.broadcast_to(np.arange(num_experts),
                                              similarity.shape), -similarity))
  voted_expert = keys.key_expert[top]
  results = []
  for p in range(num_prompts):
    v, rows = votes[p], slice(starts[p], starts[p + 1])
    ranked = _ranked(v, first_key[p])
    order = ranked + by_similarity[p][v[by_similarity[p]] == 0].tolist()
    total = int(counts[p]) * top.shape[1]
    winner = ranked[0]
    runner_up = v[ranked[1]] if len(ranked) > 1 else 0
    confidence = float(v[winner]) / total
    winning = voted_expert[rows] == winner
    identical = int(np.sum(keys.shared[top[rows]] & winning))
    result = {
        "winner": keys.expert_ids[winner],
        "candidates": [{"expert": keys.expert_ids[e], "votes": n, "similarity": sim}
                       for e, n, sim in zip(order, v[order].tolist(), similarity[p,
                                                                                 order].tolist())],
        "total_votes": total,
        "confidence": confidence,
        "margin": float(v[winner] - runner_up) / total,
        "abstained": confidence < abstain_threshold,
        "identical_key_votes": identical,
        "instance_level": [keys.expert_ids[e] for e in voted_expert[rows, 0].tolist()],
    }
    result["selected"] = fallback if result["abstained"] else result["winner"]
    if identical:
      sharing = sorted({keys.expert_ids[e] for k in top[rows][winning] for e in range(num_experts)
                        if keys.shared[k] and keys.texts[k] in keys.texts_per_expert[e]})
      result["warning"] = (
          f"{identical} of the winner's {int(v[winner])} votes came from key texts "
          f"shared with other experts ({', '.join(sharing[:5])}); those votes cannot "
          f"discriminate.")
    if dataset_experts is not None:
      result["dataset_level"] = dataset_vote(result["candidates"], dataset_experts, dataset_rule)
    results.append(result)
  return results


def dataset_vote(candidates: Sequence[Mapping[str, Any]], dataset_of: Mapping[str, str],
                 rule: str = DEFAULT_DATASET_RULE) -> dict[str, Any]:
  """Dataset-expert-level RoE: the dataset whose expert the prompt uses, by `rule`
  (`DATASET_RULES`).

  'winner' (the paper) takes the dataset of the top-ranked candidate, the task-level winner;
  'pooled' sums each prompt expert's votes per dataset (ties to the first ranked). Both record the
  pooled totals. `candidates` are in `summarize`'s order: experts with votes first, so the loop
  stops at the first without.
  """
  if rule not in DATASET_RULES:
    raise RetrievalError(f"Unknown dataset rule {rule!r}; expected one of {DATASET_RULES}.")
  totals: dict[str, int] = {}
  for c in itertools.takewhile(lambda c: c["votes"], candidates):
    d = dataset_of.get(c["expert"])
    if d is not None:
      totals[d] = totals.get(d, 0) + c["votes"]
  if rule == "winner":
    best = dataset_of.get(
        candidates[0]["expert"]) if candidates and candidates[0]["votes"] else None
  else:
    best = max(totals, key=lambda d: totals[d]) if totals else None  # dict order breaks ties
  return {"rule": rule, "dataset": best, "votes": totals}


def _entry_dataset(entry: Mapping[str, Any]) -> str | None:
  pairs = {
      library_lib.normalize_dataset(p.get("dataset"), p.get("subset")) for p in entry["provenance"]
  }
  if len(pairs) != 1:
    return None
  ds, sub = next(iter(pairs))
  return None if ds is None else ds + (f"/{sub}" if sub else "")


def dataset_expert_map(
    entries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
  """(expert id -> its dataset, dataset -> its dataset expert id); a DE covers one dataset, >1
  prompt."""
  dataset_of, experts_of = {}, {}
  for e in entries:
    d = _entry_dataset(e)
    if d is None:
      continue
    dataset_of[e["id"]] = d
    if len({p.get("prompt") for p in e["provenance"]}) > 1:
      experts_of.setdefault(d, e["id"])
  return dataset_of, experts_of


class Retriever:
  """Task-level RoE over a library with one embedder and text format.

  Usage:
    r = Retriever(Library('lib'), MiniLMEmbedder('minilm'))
    result = r.retrieve(query_rows, dataset='super_glue', subset='rte', guard='zero_shot')
  """

  def __init__(self,
               lib: library_lib.Library,
               embedder: Any,
               *,
               text_format: str = DEFAULT_TEXT_FORMAT,
               lookup: TemplateLookup | None = None):
    if text_format not in TEXT_FORMATS:
      raise RetrievalError(f"Unknown text format {text_format!r}; expected one of {TEXT_FORMATS}.")
    self.lib = lib
    self.embedder = embedder
    self.text_format = text_format
    self.lookup = lookup
    self.entries = [e for e in lib.entries() if e["num_keys"] > 0]
    self.keys = build_key_set(lib, [e["id"] for e in self.entries], text_format, lookup)
    dense = getattr(embedder, "kind", "dense") == "dense"
    self.key_embeddings = cached_key_embeddings(lib, embedder, self.keys) if dense else None
    self.dataset_of, self.dataset_experts = dataset_expert_map(self.entries)
    self._verdicts: dict[tuple[Any, ...], library_lib.GuardResult] = {}
    self._buffer = np.empty(0, np.float32)

  def _subset_keys(self, allowed: Sequence[str]) -> tuple[KeySet, np.ndarray | None]:
    allowed_set = set(allowed)
    idx = [i for i, eid in enumerate(self.keys.expert_ids) if eid in allowed_set]
    if len(idx) == len(self.keys.expert_ids):
      return self.keys, self.key_embeddings
    sub = KeySet([self.keys.expert_ids[i] for i in idx],
                 [self.keys.texts_per_expert[i] for i in idx],
                 [self.keys.rows[self.keys.offsets[i]:self.keys.offsets[i + 1]] for i in idx])
    if self.key_embeddings is None:
      return sub, None
    offsets = self.keys.offsets
    rows = (np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]) if idx
            else np.zeros(0, np.int64))
    return sub, self.key_embeddings[rows]

  def retrieve(self, examples: Sequence[Mapping[str, Any]], *, dataset: str | None = None,
               subset: str | None = None, **options: Any) -> dict[str, Any]:
    """Retrieves for one eval prompt from its (unlabeled) examples; see `retrieve_many`."""
    return self.retrieve_many([examples], datasets=[(dataset, subset)], **options)[0]

  def retrieve_many(self, prompts: Sequence[Sequence[Mapping[str, Any]]], *,
                    datasets: Sequence[tuple[str | None, str | None]] | None = None,
                    guard: str = "zero_shot", num_queries: int = DEFAULT_NUM_QUERIES, seed: int = 0,
                    votes_per_query: int = 1, abstain_threshold: float = 0.0,
                    fallback: str = "base", dataset_rule: str = DEFAULT_DATASET_RULE,
                    allow_unknown_provenance: bool = False) -> list[dict[str, Any]]:
    """Retrieves for several eval prompts at once; records queries and guard mode in each result.

    All prompts' queries are embedded in one call, and prompts whose guard leaves the same experts
    share one matrix product against those keys (one large product is several times faster than one
    per
    prompt: the keys stream through the cache once, not once per prompt).

    Args:
      prompts: each eval prompt's (unlabeled) examples.
      datasets: (dataset, subset) per prompt for the guard (default: from each prompt's first
      example). guard, num_queries, seed, votes_per_query, abstain_threshold, fallback,
      dataset_rule,
        allow_unknown_provenance: as the CLI flags.
    """
    if dataset_rule not in DATASET_RULES:
      raise RetrievalError(
          f"Unknown dataset rule {dataset_rule!r}; expected one of {DATASET_RULES}.")
    plans = []
    for p, examples in enumerate(prompts):
      if not examples:
        raise RetrievalError(
            f"No query examples given for prompt {p}; pass the eval prompt's examples.")
      dataset, subset = datasets[p] if datasets else (None, None)
      if dataset is None:
        dataset, subset = examples[0].get("dataset"), examples[0].get("subset")
      verdict = self._guard(dataset, subset, guard, allow_unknown_provenance)
      indices = select_queries(len(examples), num_queries, seed)
      plans.append((dataset, subset, verdict, indices,
                    [format_text(examples[i], self.text_format, self.lookup) for i in indices]))
    results: list[Any] = [None] * len(plans)
    for members, keys, best, top in self._reduced([plan[4] for plan in plans],
                                                  [plan[2].allowed for plan in plans],
                                                  votes_per_query):
      starts = np.concatenate([[0], np.cumsum([len(plans[p][4]) for p in members])])
      summaries = summarize_reduced(best, top, keys, starts, abstain_threshold=abstain_threshold,
                                    fallback=fallback, dataset_experts=self.dataset_of,
                                    dataset_rule=dataset_rule)
      for p, result in zip(members, summaries):
        dataset, subset, verdict, indices, _ = plans[p]
        d = result["dataset_level"]["dataset"]
        result["dataset_level"]["expert"] = self.dataset_experts.get(d) if d else None
        result.update({"dataset": dataset, "subset": subset, "guard": verdict.to_json(),
                       "query_indices": indices, "num_queries": len(indices), "seed": seed,
                       "votes_per_query": votes_per_query})
        results[p] = result
    return results

  def _score_buffer(self, rows: int, cols: int) -> np.ndarray:
    """A [rows, cols] float32 view of one buffer kept between calls (at most `MAX_SCORES` floats).

    Fresh pages cost the kernel a zeroing pass over them (~5% of a full-library search), so the
    buffer only grows; dropping the retriever frees it.
    """
    if self._buffer.size < rows * cols:
      self._buffer = np.empty(rows * cols, np.float32)
    return self._buffer[:rows * cols].reshape(rows, cols)

  def _guard(self, dataset: str | None, subset: str | None, mode: str,
             allow_unknown_provenance: bool = False) -> library_lib.GuardResult:
    """The guard's verdict, computed once per eval (dataset, subset): prompts of a dataset share
    it."""
    key = (dataset, subset, mode, allow_unknown_provenance)
    if key not in self._verdicts:
      self._verdicts[key] = library_lib.apply_guard(
          self.entries, dataset, subset, mode, allow_unknown_provenance=allow_unknown_provenance)
    return self._verdicts[key]

  def _reduced(self, texts: Sequence[Sequence[str]], allowed: Sequence[Sequence[str]],
               votes_per_query: int) -> Iterator[tuple[list[int], KeySet, np.ndarray, np.ndarray]]:
    """Yields (prompts, key set, [R, E] per-expert maxima, [R, k] voting keys) per distinct allowed
    set of experts, the rows being those prompts' queries in order.

    Each set's queries are scored by one BLAS product per block of rows (at most `MAX_SCORES`
    floats, so memory stays bounded however many queries a prompt has) and reduced at once.
    """
    dense = self.key_embeddings is not None
    flat = [t for ts in texts for t in ts]
    query_emb = np.asarray(self.embedder.embed(flat), np.float32) if dense and flat else None
    starts = np.concatenate([[0], np.cumsum([len(ts) for ts in texts])]).astype(np.int64)
    groups: dict[tuple[str, ...], list[int]] = {}
    for p, ids in enumerate(allowed):
      groups.setdefault(tuple(sorted(ids)), []).append(p)
    for ids, members in groups.items():
      keys, key_emb = self._subset_keys(ids)
      rows = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in members])
      step = max(1, MAX_SCORES // max(keys.key_expert.size, 1))
      parts = []
      for block_rows in (rows[i:i + step] for i in range(0, rows.size, step)):
        if dense:
          block = np.matmul(query_emb[block_rows], key_emb.T,
                            out=self._score_buffer(block_rows.size, key_emb.shape[0]))
        else:
          block = np.asarray(self.embedder.scores([flat[r] for r in block_rows], keys.texts),
                             np.float32)
        parts.append(reduce_scores(block, keys, votes_per_query))
      yield members, keys, np.concatenate([b for b, _ in parts
                                          ]), np.concatenate([t for _, t in parts])


# Floats of one block of query-key scores (256 MB): the product's working memory.
MAX_SCORES = 64 * 2**20


# ----------------------------------------------------------------------------
# CLI: expert-t5x retrieve
# ----------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict[str, Any]]:
  return file_io.read_jsonl(path, RetrievalError)


EMBEDDERS = ("minilm", "t5", "bm25")


def make_embedder(name: str,
                  *,
                  minilm_dir: str | None = None,
                  max_seq_length: int = embedders_lib.DEFAULT_MAX_SEQ_LENGTH,
                  base_path: str | None = None,
                  base_config: str = "xl",
                  vocab_path: str | None = None,
                  vocabulary: Any = None,
                  t5_base: tuple[Any, Any, Any] | None = None,
                  fetch_minilm: Callable[[], str] | None = None) -> Any:
  """Builds an embedder by name (the one embedder factory: CLI, RoE evaluation and demo).

  Args:
    name: 'minilm', 't5' or 'bm25'.
    minilm_dir: sentence-transformers directory of all-MiniLM-L6-v2 (default:
    $EXPERT_T5X_MINILM_DIR,
      else where `expert-t5x data fetch minilm` puts it).
    max_seq_length: truncation of keys and queries.
    base_path, base_config, vocab_path: the t5 embedder's base checkpoint, its config name if the
      checkpoint does not record one, and its spiece.model.
    vocabulary: instead of `vocab_path`, a vocabulary object with encode().
    t5_base: instead, an already loaded base for the t5 embedder: (params, T5Config, vocabulary
      object with encode()).
    fetch_minilm: called (and its directory used) when MiniLM is missing, instead of an error.
  """
  if name == "bm25":
    return embedders_lib.BM25Scorer()
  if name == "minilm":
    directory = minilm_dir or os.environ.get("EXPERT_T5X_MINILM_DIR")
    if not directory:
      from seqio_tasks import fetch  # where `expert-t5x data fetch minilm` puts it
      directory = fetch.minilm_dir()
    if not os.path.isdir(directory) and fetch_minilm is not None:
      directory = fetch_minilm()
    if not os.path.isdir(directory):
      raise RetrievalError(
          f"all-MiniLM-L6-v2 not found at '{directory}'; run `expert-t5x data fetch minilm`, "
          f"or pass --minilm-dir (a sentence-transformers directory).")
    return embedders_lib.MiniLMEmbedder(directory, max_seq_length=max_seq_length)
  if name == "t5":
    if t5_base is not None:
      params, t5_config, vocabulary = t5_base
      return embedders_lib.T5EncoderEmbedder(params, t5_config, vocabulary=vocabulary,
                                             max_seq_length=max_seq_length)
    if not base_path or (vocab_path is None) == (vocabulary is None):
      raise RetrievalError("The t5 embedder needs --base CHECKPOINT and --vocab spiece.model.")
    from expert_t5x import checkpoint_importer, network
    params, t5_config, _ = checkpoint_importer.load_params(base_path)
    t5_config = t5_config or network.get_config(base_config)
    return embedders_lib.T5EncoderEmbedder(params, t5_config, vocab_path, vocabulary=vocabulary,
                                           max_seq_length=max_seq_length)
  raise RetrievalError(f"Unknown embedder {name!r}; expected one of {EMBEDDERS}.")


def promptsource_lookup(templates_dir: str | None = None) -> TemplateLookup:
  """A template lookup over promptsource templates (default: the fetched promptsource directory)."""
  from seqio_tasks import settings, templates
  directory = templates_dir or settings.get_path("PROMPTSOURCE_DIR")

  def lookup(dataset: str | None, subset: str | None, prompt: str | None) -> str | None:
    return templates.get_template(directory, dataset, subset, prompt).answer_choices

  return lookup


def retrieve_main(argv: Sequence[str] | None = None) -> int:
  """`expert-t5x retrieve` (the CLI lives in `retrieval_cli`)."""
  from expert_t5x import retrieval_cli  # pylint: disable=g-import-not-at-top
  return retrieval_cli.main(argv)


if __name__ == "__main__":
  sys.exit(retrieve_main())
