"""Retrieval of Experts at the paper's scale, embedding excluded: 113 eval prompts x 32 queries
against 296 experts x 100 keys (29,600 keys), 384-d unit vectors (all-MiniLM-L6-v2's width).

  python bench/bench_retrieval.py [--repeats 5] [--dim 384]

Prints a table: median seconds for the whole RoE pass (scores + votes + diagnostics for every
prompt), per prompt as `Retriever` runs it, and with all prompts' queries in one matrix product.
"""

import argparse
import statistics
import time

import numpy as np

from expert_t5x import retrieval


def make_problem(num_experts: int, keys_per_expert: int, num_prompts: int, queries: int, dim: int):
  rng = np.random.default_rng(0)
  texts = [[f"expert {e} key {k}" for k in range(keys_per_expert)] for e in range(num_experts)]
  keys = retrieval.KeySet([f"e{e}" for e in range(num_experts)], texts, [[{}] * keys_per_expert] * num_experts)
  key_emb = rng.standard_normal((num_experts * keys_per_expert, dim)).astype(np.float32)
  key_emb /= np.linalg.norm(key_emb, axis=1, keepdims=True)
  q = rng.standard_normal((num_prompts, queries, dim)).astype(np.float32)
  q /= np.linalg.norm(q, axis=2, keepdims=True)
  return keys, key_emb, q


def per_prompt(keys, key_emb, q):
  return [retrieval.summarize(q[p] @ key_emb.T, keys) for p in range(q.shape[0])]


def batched(keys, key_emb, q):
  scores = q.reshape(-1, q.shape[-1]) @ key_emb.T
  per = q.shape[1]
  return [retrieval.summarize(scores[p * per:(p + 1) * per], keys) for p in range(q.shape[0])]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dim", type=int, default=384)
  args = parser.parse_args()
  keys, key_emb, q = make_problem(296, 100, 113, 32, args.dim)
  rows = []
  for name, fn in (("per prompt (Retriever)", per_prompt), ("one matrix product", batched)):
    fn(keys, key_emb, q)  # Warm-up.
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn(keys, key_emb, q)
      times.append(time.perf_counter() - start)
    rows.append((name, statistics.median(times)))
  assert [r["winner"] for r in per_prompt(keys, key_emb, q)] == \
      [r["winner"] for r in batched(keys, key_emb, q)]
  base = rows[0][1]
  print(f"RoE: {q.shape[0]} prompts x {q.shape[1]} queries vs {key_emb.shape[0]} keys, dim {args.dim}"
        f" (median of {args.repeats}; goal < 0.5 s)")
  print(f"| variant | seconds | speed-up |\n|---|---|---|")
  for name, t in rows:
    print(f"| {name} | {t:.3f} | {base / t:.2f}x |")


if __name__ == "__main__":
  main()
