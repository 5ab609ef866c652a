"""Continual-learning (CT0) tasks of the paper, read from local files.

The paper (ELM `configs/cT0/`, `seq2seq/data/tasks.py`) adds 10 adapter experts over 8 CT0
(Scialom et al. 2022) datasets and evaluates 16 target prompts. Its data are CT0's already-prompted
files from ELM's `additional_data.zip`, `ct0_data/<...>/<prompt>.<split>.json` with columns `src`
(the prompted input) and `tgt` (the target; a list of references for ASSET, of which ELM keeps the
first). Point CONTINUAL_DIR at the unzipped `ct0_data` folder. Splits:

* `train`: the expert's training file;
* `validation`: ELM's eval rows (the test file; its first 300 rows for wiki_auto, eli5,
  empathetic_dialogues, esnli and twitter_top20; ASSET's validation file; covid_qa's training file,
  which ELM also evaluates on);
* `target_eval`: the paper's evaluation subset (`extract_data_subset_target_eval.py`): the first
  300 of a `torch.randperm` (seed 42) of the `validation` rows; it needs torch.

A dataset may instead be given as promptsource templates over raw rows:
`<dir>/<dataset>/templates.yaml` plus `<dir>/<dataset>/{train,validation,test}.jsonl` with at least
`inputs` and `targets`; each template named like a CT0 prompt renders that prompt's task. The ELM
file wins when both exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Optional

from seqio_tasks import examples as examples_lib
from seqio_tasks import settings
from seqio_tasks import templates as templates_lib
from seqio_tasks.sources import prompted
from seqio_tasks.sources import raw


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
  """One continual expert's training settings, from its ELM config (`configs/cT0/<config>.json`)."""
  config: str
  batch_size: int        # per_device_train_batch_size
  num_epochs: int
  learning_rate: float = 1e-4
  inputs_length: int = 512
  targets_length: int = 256
  max_examples: int = 100000
  reduction_factor: int = 32  # adapters, layer norms trained (unfreeze_layer_norms)


# The paper's 10 continual experts over the 8 CT0 datasets: (dataset, training prompt) -> settings.
CT0_EXPERTS: dict[tuple[str, str], ExpertSettings] = {
    ("wiki_auto", "simplification_1"): ExpertSettings("1_wiki_auto", 2, 1),
    ("ct0_gigaword", "constrain_contain+make_a_title"): ExpertSettings("2_gigaword_1", 8, 1),
    ("ct0_gigaword", "constrain_end+make_a_title"): ExpertSettings("2_gigaword_2", 8, 1),
    ("ct0_gigaword", "constrain_start+make_a_title"): ExpertSettings("2_gigaword_3", 8, 1),
    ("haiku", "do_nothing"): ExpertSettings("3_haiku", 8, 10),
    ("covid_qa", "covid_qa_deepset"): ExpertSettings("4_covid_qa", 8, 50),
    ("eli5", "generate_a_question_1"): ExpertSettings("5_eli5", 4, 2),
    ("empathetic_dialogues", "dialogue_with_emotion"): ExpertSettings("6_emdg", 4, 2),
    ("esnli", "explain_why"): ExpertSettings("7_esnli", 8, 1),
    ("twitter_top20", "tweet_as+about"): ExpertSettings("8_tw20", 8, 8),
}
CT0_PROMPTS: tuple[tuple[str, str], ...] = tuple(CT0_EXPERTS)

# Each dataset's metric in ELM's tasks.py: BLEU (simplification), ROUGE, or BERTScore precision
# with microsoft/deberta-large-mnli.
CT0_METRICS: dict[str, str] = {
    "wiki_auto": "BLEU", "asset": "BLEU", "ct0_gigaword": "ROUGE", "haiku": "ROUGE",
    "covid_qa": "BERTScore", "eli5": "BERTScore", "empathetic_dialogues": "BERTScore",
    "esnli": "BERTScore", "twitter_top20": "BERTScore"}

_GIGAWORD = [f"constrain_{c}+{t}" for c in ("contain", "end", "start")
             for t in ("make_a_title", "write_its_sentence")]
# The 16 target prompts of `run_target_eval_with_json.py`, in its order.
CT0_TARGET_PROMPTS: tuple[tuple[str, str], ...] = (
    ("wiki_auto", "simplification_1"), ("wiki_auto", "simplification_2"),
    ("asset", "simplification_1"), ("asset", "simplification_2"),
    *(("ct0_gigaword", p) for p in _GIGAWORD),
    ("haiku", "do_nothing"), ("covid_qa", "covid_qa_deepset"), ("eli5", "generate_a_question_1"),
    ("empathetic_dialogues", "dialogue_with_emotion"), ("esnli", "explain_why"),
    ("twitter_top20", "tweet_as+about"))

SPLITS = ("train", "validation", "target_eval")
TARGET_EVAL_SIZE = 300
TARGET_EVAL_SEED = 42
# Datasets whose ELM `validation` is the first 300 rows of the test file.
_FIRST_300 = ("wiki_auto", "eli5", "empathetic_dialogues", "esnli", "twitter_top20")
_ELM_DIRS = {"wiki_auto": "wiki_auto/wiki_auto", "asset": "asset/asset",
             "ct0_gigaword": "gigaword/gigaword", "haiku": "haiku/haiku", "eli5": "eli5",
             "covid_qa": "covid_qa/covid_qa_deepset",
             "empathetic_dialogues": "empathetic_dialogues/empathetic_dialogues",
             "esnli": "eSNLI/eSNLI", "twitter_top20": "twitter_top20/twitter_top20"}


def elm_file(dataset: str, prompt: str, split: str) -> Optional[str]:
  """The ELM data file of (dataset, prompt, split) under CONTINUAL_DIR (None: ELM has none)."""
  root = os.path.join(settings.get_path("CONTINUAL_DIR"), _ELM_DIRS[dataset])
  if split == "target_eval":
    split = "validation"
  if dataset == "covid_qa":  # ELM trains and evaluates on the same file.
    return os.path.join(root, "covid_cloze_book_qa.train.json")
  if dataset == "asset":
    return os.path.join(root, f"{prompt}.validation.json") if split == "validation" else None
  if split == "train" and (dataset, prompt) not in CT0_EXPERTS:
    return None
  suffix = {"train": "train", "validation": "test"}[split]
  if dataset == "eli5":
    suffix += "_asks"
  return os.path.join(root, f"{prompt}.{suffix}.json")


def dataset_dir(dataset: str) -> str:
  return os.path.join(settings.get_path("CONTINUAL_DIR"), dataset)


def templates_path(dataset: str) -> str:
  return os.path.join(dataset_dir(dataset), "templates.yaml")


def split_path(dataset: str, split: str) -> str:
  return os.path.join(dataset_dir(dataset), f"{split}.jsonl")


def splits_of(dataset: str, prompt: str) -> tuple[str, ...]:
  """The splits a task has: `train` only for the prompts that the paper trains an expert on."""
  return SPLITS if (dataset, prompt) in CT0_EXPERTS else SPLITS[1:]


def missing_files(dataset: str, prompt: str) -> list[str]:
  """The files a continual task needs that are absent (for `tasks check`)."""
  wanted = [elm_file(dataset, prompt, s) for s in splits_of(dataset, prompt)]
  wanted = list(dict.fromkeys(p for p in wanted if p))
  if all(os.path.exists(p) for p in wanted):
    return []
  if os.path.exists(templates_path(dataset)):
    return [p for p in (split_path(dataset, s) for s in ("train", "validation"))
            if not os.path.exists(p)]
  return [p for p in wanted if not os.path.exists(p)]


def _read_elm(path: str) -> tuple[list[str], list[str]]:
  """(src, tgt) columns of one ELM file; list targets (ASSET's references) keep the first."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or "src" not in data or "tgt" not in data:
    raise ValueError(f"{path}: expected a JSON object with 'src' and 'tgt' lists (ELM's ct0_data "
                     "format); re-extract it from ELM's additional_data.zip.")
  targets = [t[0] if isinstance(t, list) else t for t in data["tgt"]]
  return [str(s) for s in data["src"]], [str(t) for t in targets]


def target_eval_indices(n: int) -> list[int]:
  """The paper's subset of n eval rows: `torch.randperm(n, seed 42)[:300]`, in that order."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the paper's target_eval subset needs torch (its torch.randperm draw); "
                      "install the parity extra: pip install 'expert_t5x[parity]'.") from e
  generator = torch.Generator()
  generator.manual_seed(TARGET_EVAL_SEED)
  return torch.randperm(n, generator=generator).tolist()[:TARGET_EVAL_SIZE]


def _elm_examples(path: str, dataset: str, prompt: str, split: str) -> Iterator[dict[str, Any]]:
  sources, targets = _read_elm(path)
  rows = list(range(len(sources)))
  if split != "train" and dataset in _FIRST_300:
    rows = rows[:TARGET_EVAL_SIZE]
  if split == "target_eval":
    rows = [rows[i] for i in target_eval_indices(len(rows))]
  for i in rows:
    yield examples_lib.make_example(inputs=sources[i], targets=targets[i], answer_choices=None,
                                    example_id=i, dataset=dataset, subset=None, prompt=prompt)


def _rows(dataset: str, subset: Optional[str], split: str) -> Iterator[dict[str, Any]]:
  del subset
  path = split_path(dataset, split)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"continual data file {path!r} does not exist; write {dataset}'s {split} rows there as "
        f"JSONL with 'inputs' and 'targets' (set {settings.env_var('CONTINUAL_DIR')} to move it).")
  yield from raw._iter_jsonl(path)  # pylint: disable=protected-access


def iter_examples(*, task: str, dataset: str, prompt: str, split: str) -> Iterator[dict[str, Any]]:
  """Canonical examples of one continual prompt task (ELM's files, else templates + JSONL)."""
  if split not in splits_of(dataset, prompt):
    raise ValueError(f"{task} has no {split!r} split; it has {list(splits_of(dataset, prompt))}.")
  path = elm_file(dataset, prompt, split)
  if path and os.path.exists(path):
    yield from _elm_examples(path, dataset, prompt, split)
    return
  if not os.path.exists(templates_path(dataset)):
    raise FileNotFoundError(
        f"{task}: neither ELM's file {path!r} nor {templates_path(dataset)!r} exists; unzip ELM's "
        f"additional_data.zip and point {settings.env_var('CONTINUAL_DIR')} at its ct0_data folder."
    )
  all_templates = templates_lib.load_templates_file(templates_path(dataset))
  if prompt not in all_templates:
    raise KeyError(f"{templates_path(dataset)} has no template named {prompt!r}; it has "
                   f"{sorted(all_templates)}.")
  source_split = "validation" if split == "target_eval" else split
  yield from prompted.iter_prompt_examples(
      task=task, dataset=dataset, subset=None, prompt=prompt, split=split,
      source_split=source_split, template=all_templates[prompt], rows_fn=_rows)
