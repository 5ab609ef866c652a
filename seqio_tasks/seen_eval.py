"""The paper's seen-task evaluation data: which rows each training dataset is evaluated on.

ELM's `seq2seq/extract_data_subset_seen_eval.py` builds `seen_eval_300.json` from
`AutoTask.get(dataset, config, prompt).load_dataset('validation')` (`seq2seq/data/tasks.py`), so
the "validation" split of a training dataset is whatever its task class returns:

| dataset | the paper's `validation` (tasks.py) | here |
|---|---|---|
| ag_news, trec | `x['test']` (GeneralTask; TREC) | the `test` split |
| imdb, dbpedia_14 | `test[0:300]` (IMDB; DBPEDIA14, from its test.csv) | `test`; the slice with the
paper subset |
| yelp_review_full | `test.csv` rows 1..300 (YELPREVIEWFULL) | `test`; the slice with the paper
subset |
| amazon_polarity | `train.csv` rows `[50000 - i for i in range(300)]` (AMAZONPOLARITY) | those
`train` rows, always |
| app_reviews | `train.select([len(train) - i for i in range(300)])` (APPREVIEWS) | those `train`
rows, always |
| wiki_hop, gigaword, multi_news, rotten_tomatoes | `validation[0:300]` | `validation`; the slice
with the paper subset |
| wiki_bio | `x['val']` | the `val` split |
| the others | `validation` | `validation` |

app_reviews' first index is `len(train)`, one past the end: `datasets==1.6.2` (ELM's pin) neither
checks `select` indices nor rejects them when reading (its `_query_table` takes the row index
modulo the table size), so it reads row 0. amazon_polarity's and app_reviews' rows (all but one)
were in the first 50,000 rows those experts trained on: the paper's seen scores for them are on
training data. Both are reproduced as the paper ran them and documented (docs/evaluation.md).

**The paper's subset** (`subset='paper'`): the first `min(300, n)` of
`torch.randperm(n, torch.Generator().manual_seed(42))` over those n rows, in that order
(`shuffled_indices` and `max_num_instances = 300` in the extract script). `torch_randperm`
reproduces torch's CPU permutation without torch. Not reproduced: the script never resets `n_obs`
between the prompts of a dataset, so after a trec `fine_grained_*` prompt with fewer than 300 rows
the next unfiltered trec prompts kept that smaller count; here each prompt draws `min(300, n)`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

PAPER_SUBSET_SIZE = 300
PAPER_SUBSET_SEED = 42
SUBSETS = ("first", "paper")


@dataclasses.dataclass(frozen=True)
class ValidationSource:
  """Where a training dataset's `validation` examples come from.

  Attributes:
    split: the raw (Hugging Face) split read.
    rows: always applied: the raw row positions, in order, given the split's rows (None: all).
    paper_rows: applied with the paper subset only, before its permutation (None: all rows).
  """
  split: str
  rows: Optional[Callable[[Sequence[Any]], list[int]]] = None
  paper_rows: Optional[range] = None
  # How many leading rows `rows` needs (None: the whole split, e.g. to know its length).
  rows_needed: Optional[int] = None


def _app_reviews_rows(rows: Sequence[Any]) -> list[int]:
  n = len(rows)  # index n wraps to row 0, as datasets 1.6.2 read it
  return [(n - i) % n for i in range(PAPER_SUBSET_SIZE)] if n else []


def _amazon_polarity_rows(rows: Sequence[Any]) -> list[int]:
  return [i for i in (50000 - i for i in range(PAPER_SUBSET_SIZE)) if i < len(rows)]


VALIDATION_SOURCES: dict[str, ValidationSource] = {
    "ag_news": ValidationSource("test"),
    "trec": ValidationSource("test"),
    "imdb": ValidationSource("test", paper_rows=range(0, 300)),
    "dbpedia_14": ValidationSource("test", paper_rows=range(0, 300)),
    "yelp_review_full": ValidationSource("test", paper_rows=range(1, 301)),
    "amazon_polarity": ValidationSource("train", rows=_amazon_polarity_rows, rows_needed=50001),
    "app_reviews": ValidationSource("train", rows=_app_reviews_rows),
    "wiki_hop": ValidationSource("validation", paper_rows=range(0, 300)),
    "gigaword": ValidationSource("validation", paper_rows=range(0, 300)),
    "multi_news": ValidationSource("validation", paper_rows=range(0, 300)),
    "rotten_tomatoes": ValidationSource("validation", paper_rows=range(0, 300)),
    "wiki_bio": ValidationSource("val"),
}


def train_splits(dataset: str) -> tuple[tuple[str, str], ...]:
  """(task split, raw split) pairs of a training dataset's prompt tasks."""
  source = VALIDATION_SOURCES.get(dataset)
  validation = source.split if source else "validation"
  splits = [("train", "train"), ("validation", validation)]
  if dataset != "app_reviews":  # app_reviews has only a train split
    splits.append(("test", "test"))
  return tuple(splits)


def p3_split_aliases(dataset: str) -> dict[str, str]:
  """{'validation': raw split} where P3 directories hold it under that name (whole-split renames
  only: a row slice is read from raw rows)."""
  source = VALIDATION_SOURCES.get(dataset)
  if source is None or source.rows is not None or source.split == "validation":
    return {}
  return {"validation": source.split}


def select_rows(dataset: str, split: str, rows: Iterable[Mapping[str, Any]]
                ) -> Iterator[tuple[int, Mapping[str, Any]]]:
  """(row position, row) of the rows a task split reads: every row, or the paper's slice."""
  source = VALIDATION_SOURCES.get(dataset)
  if split != "validation" or source is None or source.rows is None:
    yield from enumerate(rows)
    return
  head = list(itertools.islice(rows, source.rows_needed) if source.rows_needed else rows)
  for i in source.rows(head):
    yield i, head[i]


def torch_randperm(n: int, seed: int = PAPER_SUBSET_SEED) -> list[int]:
  """`torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()` on CPU.

  torch's CPU generator is MT19937 seeded with `init_genrand(seed)`, as numpy's legacy
  `RandomState(seed)`; `randperm` swaps position i with `i + random() % (n - i)` for i < n - 1,
  `random()` being one raw 32-bit output (numpy's `randint(0, 2**32)` returns those unchanged).
  """
  draws = np.random.RandomState(seed).randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint64)
  perm = list(range(n))
  for i, r in enumerate(draws.tolist()):
    z = i + r % (n - i)
    perm[i], perm[z] = perm[z], perm[i]
  return perm


def paper_subset(examples: Sequence[Mapping[str, Any]], dataset: Optional[str],
                 size: int = PAPER_SUBSET_SIZE) -> list[Mapping[str, Any]]:
  """The paper's evaluation subset of one prompt's examples (see the module docstring).

  Rows are matched by `example_id` (the raw row position) for the datasets with a paper slice.
  """
  source = VALIDATION_SOURCES.get(dataset or "")
  if source is not None and source.paper_rows is not None:
    wanted = set(source.paper_rows)
    examples = [ex for ex in examples if ex["example_id"] in wanted]
  return [examples[i] for i in torch_randperm(len(examples))[:size]]


def apply_subset(examples: Sequence[Mapping[str, Any]], subset: str, max_examples: Optional[int],
                 dataset: Optional[str]) -> list[Mapping[str, Any]]:
  """`first`: the first `max_examples` (all when None); `paper`: the paper's subset of
  `max_examples` (300 when None) examples."""
  if subset not in SUBSETS:
    raise ValueError(f"example subset {subset!r} is not one of {SUBSETS}; use 'first' (the first "
                     "max_examples) or 'paper' (the paper's 300 drawn with seed 42).")
  if subset == "first":
    return list(examples if max_examples is None else examples[:max_examples])
  return paper_subset(examples, dataset,
                      PAPER_SUBSET_SIZE if max_examples is None else max_examples)
