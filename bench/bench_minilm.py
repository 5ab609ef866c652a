"""Benchmarks all-MiniLM-L6-v2 embedding on CPU: expert_t5x's JAX MiniLMEmbedder vs
sentence-transformers.

  python bench/bench_minilm.py --threads 2 --batch_sizes 32,128 --runs 5

Needs the weights (`expert-t5x data fetch minilm`) and sentence-transformers, which only the
`parity` extra installs (`pip install -e ".[parity]"`; the embedder itself never imports it).

Both sides load the same local sentence-transformers directory (never a hub download), truncate at
the same `--max_seq_length` (256, the project's default) and embed the same deterministic texts:
prompt-like "Instance: ... Answer Choices: ..." strings whose bodies are words drawn with a seeded
RNG from the model's own WordPiece vocabulary, ~20 words ("short") and ~200 words ("long"). The
process is pinned to `--threads` cores; torch's intra-op pool, XLA's CPU pool and the tokenizers'
pool use `--threads` threads. One run = one end-to-end `encode(texts, batch_size=B)` /
`embed(texts)` with the embedder's batch size B (tokenisation, padding, forward, pooling,
normalisation). The implementations alternate run by run after `--warmup` runs each (at least
one, the "first call", printed apart: for JAX it compiles every padded shape). The table reports
the median texts/s, the ratio JAX/ST of throughputs (> 1: JAX faster) and how far the two
embeddings are apart (max |difference| and minimum cosine similarity over all texts).
"""

import argparse
import os
import statistics
import sys
import time

from bench_common import cpu_model, pin_threads
from bench_t5_vs_torch import time_interleaved

# The answer-choice lists of a few P3-like prompts, so texts look like the retrieval queries.
_CHOICES = ("yes, no", "yes, no, maybe", "true, false", "positive, negative", "A, B, C, D")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--batch_sizes", default="32,128", help="comma-separated encode batch sizes")
  parser.add_argument("--sets", default="short,long", help="comma-separated text sets: short, long")
  parser.add_argument("--num_short", type=int, default=256, help="texts in the short set")
  parser.add_argument("--num_long", type=int, default=128, help="texts in the long set")
  parser.add_argument("--max_seq_length", type=int, default=256)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1, help="untimed runs each (at least 1)")
  parser.add_argument(
      "--minilm_dir",
      default=None,
      help="sentence-transformers directory (default: $EXPERT_T5X_MINILM_DIR, else where "
      "`expert-t5x data fetch minilm` puts it)")
  return parser.parse_args(argv)


def default_minilm_dir() -> str:
  """Where `expert-t5x data fetch minilm` puts the model, computed here rather than imported from
  seqio_tasks, whose import pulls in TensorFlow (its threads would share the pinned cores)."""
  cache = os.environ.get("EXPERT_T5X_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "expert_t5x")
  return os.environ.get("EXPERT_T5X_MINILM_DIR") or os.path.join(cache, "minilm",
                                                                 "all-MiniLM-L6-v2")


def word_list(directory: str) -> list[str]:
  """Whole lower-case words of the model's vocab.txt (no '##' pieces, special tokens or digits)."""
  with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
    words = [w.strip() for w in f]
  return [w for w in words if len(w) >= 3 and w.isascii() and w.isalpha()]


def make_texts(words: list[str], count: int, mean_words: int, seed: int) -> list[str]:
  """`count` prompt-like texts with bodies of mean_words ± 20% words drawn by a seeded RNG.

  One word in ten glues two vocabulary words together, so it splits into '##' pieces as rarer
  English words do; that makes ~1.25 tokens a word and truncates over half of the ~200-word texts.
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  texts = []
  for _ in range(count):
    n = int(rng.integers(int(mean_words * 0.8), int(mean_words * 1.2) + 1))
    picks, glue = rng.integers(0, len(words), (n, 2)), rng.random(n) < 0.1
    body = " ".join(words[a] + (words[b] if g else "") for (a, b), g in zip(picks, glue))
    choices = _CHOICES[int(rng.integers(len(_CHOICES)))]
    texts.append(f"Instance: {body.capitalize()}. Is this correct? Answer Choices: {choices}")
  return texts


def agreement(ours, theirs) -> tuple[float, float]:
  """Max |difference| and min cosine similarity over rows (both sides L2-normalised again)."""
  import numpy as np
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  cos = np.sum(ours * theirs,
               axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
  return float(np.max(np.abs(ours - theirs))), float(np.min(cos))


def main(argv=None):
  args = parse_args(argv)
  pin_threads(args.threads)
  os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # the tokenizers' pool, on both sides
  os.environ["HF_HUB_OFFLINE"] = "1"  # local directory only, never the hub
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
  load_before = os.getloadavg()
  import jax  # pylint: disable=g-import-not-at-top
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from expert_t5x import retrieval  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  transformers.utils.logging.disable_progress_bar()

  directory = args.minilm_dir or default_minilm_dir()
  if not os.path.isfile(os.path.join(directory, "vocab.txt")):
    sys.exit(
        f"--minilm_dir '{directory}' has no vocab.txt; pass a sentence-transformers directory of "
        f"all-MiniLM-L6-v2 (`expert-t5x data fetch minilm`).")
  ours = retrieval.make_embedder("minilm", minilm_dir=directory, max_seq_length=args.max_seq_length)
  theirs = sentence_transformers.SentenceTransformer(directory, device="cpu", local_files_only=True)
  theirs.max_seq_length = args.max_seq_length
  theirs.eval()

  words = word_list(directory)
  sizes = {"short": (args.num_short, 20), "long": (args.num_long, 200)}
  sets = [s.strip() for s in args.sets.split(",") if s.strip()]
  unknown = [s for s in sets if s not in sizes]
  if unknown:
    sys.exit(f"--sets has {unknown}; expected a comma-separated subset of {sorted(sizes)}.")
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

  print(
      f"# {cpu_model()}, {args.threads} thread(s) of {os.cpu_count()} cores; jax "
      f"{jax.__version__}, "
      f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}, "
      f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
  print(f"# max_seq_length {args.max_seq_length}, median of {args.runs} alternating runs after "
        f"{args.warmup} warm-up each; load average before: "
        + " ".join(f"{x:.2f}" for x in load_before))
  rows = []
  for seed, name in enumerate(sets):
    count, mean_words = sizes[name]
    texts = make_texts(words, count, mean_words, seed)
    tokens = [len(e.ids) for e in ours.tokenize(texts)]
    truncated = sum(n >= args.max_seq_length for n in tokens)
    for batch_size in batch_sizes:
      outputs = {}

      def run_ours(batch_size=batch_size, texts=texts, outputs=outputs):
        ours.batch_size = batch_size
        outputs["jax"] = ours.embed(texts)

      def run_theirs(batch_size=batch_size, texts=texts, outputs=outputs):
        outputs["st"] = theirs.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                      show_progress_bar=False)

      # The first call is the first warm-up; timed apart because for JAX it compiles every new
      # (batch, padded length) shape, which a caller pays once per process.
      cold = []
      for run in (run_ours, run_theirs):
        start = time.perf_counter()
        run()
        cold.append(time.perf_counter() - start)
      t_ours, t_theirs = time_interleaved([run_ours, run_theirs], args.runs,
                                          max(args.warmup - 1, 0))
      max_diff, min_cos = agreement(outputs["jax"], outputs["st"])
      label = (f"{name} ({count} texts, {statistics.mean(tokens):.0f} tokens mean, "
               f"{truncated} truncated)")
      print(
          f"# {label}, batch {batch_size}: first call jax {cold[0]:.2f} s, st {cold[1]:.2f} s; "
          "s/run jax "
          + " ".join(f"{t:.3f}" for t in t_ours) + "; st " + " ".join(f"{t:.3f}" for t in t_theirs))
      rows.append((label, batch_size, count, t_ours, t_theirs, max_diff, min_cos))

  print("# load average after the runs: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
  print("| texts | batch | expert_t5x (JAX) texts/s | sentence-transformers texts/s | ratio JAX/ST "
        "(median; best run) | max abs diff | min cosine |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for label, batch_size, count, t_ours, t_theirs, max_diff, min_cos in rows:
    rate = lambda t, count=count: f"{count / statistics.median(t):,.1f}"
    ratio = (f"{statistics.median(t_theirs) / statistics.median(t_ours):.2f}x; "
             f"{min(t_theirs) / min(t_ours):.2f}x")
    print(
        f"| {label} | {batch_size} | {rate(t_ours)} | {rate(t_theirs)} | {ratio} | {max_diff:.2e} "
        f"| {min_cos:.9f} |")


if __name__ == "__main__":
  main()
