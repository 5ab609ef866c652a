"""Fakes for the evaluator tests: a character vocabulary, generated tasks and saved experts."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from expert_t5x import eval_tasks
from expert_t5x import expert_format
from expert_t5x import experts as experts_lib

VOCAB_SIZE = 64
# Short choices and inputs keep the padded shapes (and so the compilations) few.
WORDS = ("yes", "no", "maybe", "red", "blue", "green", "true", "false", "a", "bb")


class CharVocabulary:
  """0 pad, 1 EOS, characters hashed onto ids 2..vocab_size-1 (decode is approximate)."""
  eos_id = 1

  def __init__(self, vocab_size: int = VOCAB_SIZE):
    self.vocab_size = vocab_size

  def encode(self, s: str) -> list[int]:
    return [2 + ord(c) % (self.vocab_size - 2) for c in s]

  def decode(self, ids: Iterable[int]) -> str:
    return "".join(chr(ord("a") + (int(i) - 2) % 26) for i in ids if int(i) > 1)


def make_examples(seed: int, n: int, dataset: str, prompt: str, min_choices: int = 2,
                  max_choices: int = 4) -> list[dict]:
  """Canonical examples with ragged inputs and 2-4 choices of varied lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    k = int(rng.integers(min_choices, max_choices + 1))
    choices = [str(c) for c in rng.choice(WORDS, size=k, replace=False)]
    label = int(rng.integers(0, k))
    words = rng.choice(["the", "cat", "sat", "on", "mat", "dog"], size=int(rng.integers(3, 6)))
    out.append({"inputs": f"{prompt}: " + " ".join(words), "targets": choices[label],
                "answer_choices": choices, "label_index": label, "example_id": 100 + i,
                "dataset": dataset, "subset": "", "prompt": prompt})
  return out


def make_source(n: int = 8, seed: int = 0, generation: bool = False,
                vocab_size: int = VOCAB_SIZE) -> eval_tasks.InMemoryTaskSource:
  """Scoring tasks over two datasets, 'nli' (prompts p1 and p2 on the same examples) and 'qa'
  (q1); with `generation`, also a generative 'copy' task (targets = the last input word)."""
  tasks = {}
  for j, (dataset, prompt) in enumerate([("nli", "p1"), ("nli", "p2"), ("qa", "q1")]):
    name = f"{dataset}_{prompt}"
    examples = make_examples(seed + j if dataset != "nli" else seed, n, dataset, prompt)
    tasks[name] = (eval_tasks.TaskMeta(name, dataset, prompt, True), examples)
  if generation:
    examples = [dict(ex, targets=ex["inputs"].split()[-1], answer_choices=[], label_index=-1,
                     dataset="copy", prompt="c") for ex in make_examples(seed + 9, n, "copy", "c")]
    tasks["copy_c"] = (eval_tasks.TaskMeta("copy_c", "copy", "c", False), examples)
  return eval_tasks.InMemoryTaskSource(tasks, CharVocabulary(vocab_size),
                                       suites={"fake_suite": [t for t in tasks if t != "copy_c"]})


def save_adapter_experts(root: str, base_params, t5_config, seeds: Sequence[int],
                         reduction_factor: int = 4, fingerprint: str | None = None) -> list[str]:
  """Random adapter experts (different init seeds) saved in Expert format v1."""
  paths = []
  for s in seeds:
    cfg = experts_lib.AdapterConfig(reduction_factor=reduction_factor, init_seed=s)
    tree = experts_lib.init_expert(cfg, t5_config, base_params)
    meta = expert_format.build_metadata("adapter", experts_lib.config_to_json(cfg),
                                        base_fingerprint=fingerprint, base_config_name="tiny")
    path = os.path.join(root, f"expert_{s}")
    expert_format.save_expert(path, tree, meta)
    paths.append(path)
  return paths


def tiny_base_and_adapter(root: str, seed: int):
  """A random tiny base (this module's vocabulary size) and one adapter expert saved under
  `root`: (base, expert directory)."""
  from expert_t5x import base_models  # pylint: disable=g-import-not-at-top
  base = base_models.load_base(model_config="tiny", random_init_seed=0,
                               config_overrides={"vocab_size": VOCAB_SIZE})
  expert = save_adapter_experts(root, base.params, base.config, [seed],
                                fingerprint=base.fingerprint)[0]
  return base, expert
