"""Retrieval of Experts at the paper's scale, embedding excluded: 113 eval prompts x 32 queries
against 296 experts x 100 keys (29,600 keys), 384-d unit vectors (all-MiniLM-L6-v2's width).

  python bench/bench_retrieval.py [--repeats 5] [--dim 384]

Builds a real library of 296 experts with 100 keys each (tiny tensors) in a temporary directory and
a lookup embedder that returns fixed random unit vectors per text (its time is measured and
subtracted, so only retrieval is timed): guard, query selection and formatting, scores, votes and
diagnostics for every prompt. Prints a table with the median seconds of `Retriever.retrieve` called
once per prompt and of `Retriever.retrieve_many` (one matrix product for all prompts), and the bare
matrix product into a preallocated array as the floor.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from expert_t5x import expert_format
from expert_t5x import library as library_lib
from expert_t5x import retrieval

NUM_EXPERTS, KEYS_PER_EXPERT, NUM_PROMPTS, NUM_QUERIES = 296, 100, 113, 32


class LookupEmbedder:
  """Random unit vectors fixed per text: embedding costs a dict lookup, so it is excluded."""
  kind = "dense"
  identity = "bench-lookup"

  def __init__(self, dim: int):
    self.dim = dim
    self.table: dict[str, np.ndarray] = {}
    self.rng = np.random.default_rng(0)
    self.seconds = 0.0  # time spent embedding, subtracted from the timings (the goal excludes it)

  def embed(self, texts):
    start = time.perf_counter()
    out = self._embed(texts)
    self.seconds += time.perf_counter() - start
    return out

  def _embed(self, texts):
    out = np.empty((len(texts), self.dim), np.float32)
    for i, t in enumerate(texts):
      v = self.table.get(t)
      if v is None:
        v = self.rng.standard_normal(self.dim).astype(np.float32)
        v /= np.linalg.norm(v)
        self.table[t] = v
      out[i] = v
    return out


def build_library(root: str) -> library_lib.Library:
  lib = library_lib.Library.init(os.path.join(root, "lib"))
  for e in range(NUM_EXPERTS):
    task = f"train{e // 8}_p{e % 8}"
    keys = [{"inputs": f"expert {e} key {k}", "targets": "a", "answer_choices": ["a", "b"],
             "example_id": k, "task": task, "dataset": f"train{e // 8}", "subset": None,
             "prompt": f"p{e % 8}"} for k in range(KEYS_PER_EXPERT)]
    meta = expert_format.build_metadata("adapter", {"kind": "adapter"},
                                        base_fingerprint="bench",
                                        base_config_name="tiny",
                                        provenance=[{
                                            "task": task, "dataset": f"train{e // 8}",
                                            "subset": None, "prompt": f"p{e % 8}", "role": "train"
                                        }])
    path = os.path.join(root, "experts", task)
    expert_format.save_expert(path, {"encoder/x/kernel": np.full((2, 2), e, np.float32)}, meta,
                              keys)
    lib.add(path, copy=False)
  return lib


def eval_prompts() -> list[list[dict]]:
  return [[{"inputs": f"eval prompt {p} example {i}", "answer_choices": ["yes", "no"],
            "dataset": f"heldout{p // 10}", "subset": None, "prompt": f"q{p % 10}"}
           for i in range(100)] for p in range(NUM_PROMPTS)]


def timed(fn, repeats: int, embedder: LookupEmbedder | None = None) -> tuple[float, object]:
  """Median seconds of `fn()` after a warm-up, less the time `embedder` spent embedding."""
  out = fn()  # Warm-up.
  times = []
  for _ in range(repeats):
    embedded = embedder.seconds if embedder else 0.0
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start - ((embedder.seconds - embedded) if embedder else 0.0))
  return statistics.median(times), out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dim", type=int, default=384)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as root:
    print(f"building a library of {NUM_EXPERTS} experts x {KEYS_PER_EXPERT} keys ...",
          file=sys.stderr)
    retriever = retrieval.Retriever(build_library(root), LookupEmbedder(args.dim))
    prompts = eval_prompts()
    embedder = retriever.embedder
    per_prompt_s, per_prompt = timed(
        lambda: [retriever.retrieve(rows, num_queries=NUM_QUERIES) for rows in prompts],
        args.repeats, embedder)
    many_s, many = timed(lambda: retriever.retrieve_many(prompts, num_queries=NUM_QUERIES),
                         args.repeats, embedder)
    queries = retriever.embedder.embed([f"eval prompt {p} example {i}" for p in range(NUM_PROMPTS)
                                        for i in range(NUM_QUERIES)])
    # no page faults
    out = np.empty((queries.shape[0], retriever.key_embeddings.shape[0]), np.float32)
    product_s, _ = timed(lambda: np.matmul(queries, retriever.key_embeddings.T, out=out),
                         args.repeats)
  assert [r["winner"] for r in per_prompt] == [r["winner"] for r in many]
  assert [r["candidates"] for r in per_prompt] == [r["candidates"] for r in many]
  load = os.getloadavg()[0]
  print(
      f"RoE: {NUM_PROMPTS} prompts x {NUM_QUERIES} queries vs {NUM_EXPERTS * KEYS_PER_EXPERT} "
      "keys, "
      f"dim {args.dim}, embedding excluded (median of {args.repeats}; goal < 0.5 s; "
      f"load average after: {load:.2f})")
  print("| variant | seconds | speed-up |\n|---|---|---|")
  for name, t in (("Retriever.retrieve, once per prompt", per_prompt_s),
                  ("Retriever.retrieve_many (one product)", many_s),
                  ("bare [3616 x 384] @ [384 x 29600] product (floor)", product_s)):
    print(f"| {name} | {t:.3f} | {per_prompt_s / t:.2f}x |")


if __name__ == "__main__":
  main()
