"""Compositional-instruction tasks of the paper (summarize into another language), from local files.

The paper (§7; ELM `run_seq2seq_multilingual.py`, `configs/experiment/mt0.json`) trains two
full-parameter mT5-XL experts, an XSum summarizer (promptsource `DOC_write_summary_of_above`) and
Tatoeba eng->X translators, merges them, and evaluates on XL-Sum with the concatenated instruction
"translate to X and summarize". Point COMPOSITIONAL_DIR at a folder laid out as:

* `xsum/{train,validation}.jsonl`: XSum rows `{"document", "summary"}`;
* `tatoeba/eng-<lang>/{train,validation}.jsonl`: rows `{"translation": {"eng": ..., "<lang>": ...}}`
  (the HF translation format ELM's script reads);
* `xlsum/<lang>/validation.jsonl`: rows `{"text", "summary"}`, the summary in <lang>;
* or ELM's own eval file `unseen_eval_300_multilingual.json`
  (`{"xlsum": {"<prompt>": {"<idx>": {"source", "target"}}}}`, already prompted), which wins.

Prompts: XSum's promptsource template exactly. ELM ships no Tatoeba or XL-Sum prompt text besides
the instruction strings, so the input layout `<text>\n\n<instruction>` of the translation and
composed tasks is our choice (the instruction last, as in `DOC_write_summary_of_above`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from seqio_tasks import examples as examples_lib
from seqio_tasks import settings
from seqio_tasks.sources import raw

LANGUAGES = ("kor", "spa", "zho", "jpn", "fra")  # the paper's Tatoeba eng->X experts
SUMMARY_PROMPT = "DOC_write_summary_of_above"
ELM_EVAL_FILE = "unseen_eval_300_multilingual.json"
EVAL_SIZE = 300  # max_val_samples of ELM's mt0.json


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
  """A full-parameter compositional expert's training settings (elm_method.md §8)."""
  config: str
  batch_size: int       # per-device batch x 15 GPUs
  num_epochs: int
  inputs_length: int
  targets_length: int
  max_examples: int
  learning_rate: float = 1e-4  # Adafactor, constant (experts/dataset_expert.gin)
  reduction_factor: None = None  # full fine-tuning: no adapters


SUMMARY_SETTINGS = ExpertSettings("xsum DOC_write_summary_of_above", 15, 1, 512, 128, 10000)
TRANSLATION_SETTINGS = ExpertSettings("tatoeba eng->X", 30, 1, 128, 128, 100000)


def summary_instruction() -> str:
  return "Write a summary of the text above :"


def translation_instruction(lang: str) -> str:
  return f"translate to {lang}"


def composed_instruction(lang: str) -> str:
  """ELM mt0.json's eval prompt, e.g. 'translate to kor and summarize'."""
  return f"translate to {lang} and summarize"


def _root() -> str:
  return settings.get_path("COMPOSITIONAL_DIR")


def _jsonl(path: str, what: str) -> Iterator[dict[str, Any]]:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"compositional data file {path!r} does not exist; write {what} there as JSONL (layout in "
        f"docs/continual.md; set {settings.env_var('COMPOSITIONAL_DIR')} to move the folder).")
  yield from raw._iter_jsonl(path)  # pylint: disable=protected-access


def _field(row: dict[str, Any], key: str, path: str) -> str:
  if key not in row:
    raise ValueError(f"{path}: row without {key!r}; it has {sorted(row)}.")
  return str(row[key])


def summary_examples(split: str) -> Iterator[dict[str, Any]]:
  """XSum under promptsource's `DOC_write_summary_of_above`: '{doc}\\n\\n===\\n\\nWrite ... :'."""
  path = os.path.join(_root(), "xsum", f"{split}.jsonl")
  for i, row in enumerate(_jsonl(path, "XSum rows {'document', 'summary'}")):
    inputs = f"{_field(row, 'document', path)}\n\n===\n\n{summary_instruction()}"
    yield examples_lib.make_example(inputs=inputs, targets=_field(row, "summary", path),
                                    answer_choices=None, example_id=i, dataset="xsum",
                                    subset=None, prompt=SUMMARY_PROMPT)


def translation_examples(lang: str, split: str) -> Iterator[dict[str, Any]]:
  path = os.path.join(_root(), "tatoeba", f"eng-{lang}", f"{split}.jsonl")
  what = f"Tatoeba rows {{'translation': {{'eng': ..., '{lang}': ...}}}}"
  for i, row in enumerate(_jsonl(path, what)):
    pair = row.get("translation")
    if not isinstance(pair, dict) or "eng" not in pair or lang not in pair:
      raise ValueError(f"{path}:{i + 1}: expected {what}.")
    yield examples_lib.make_example(
        inputs=f"{pair['eng']}\n\n{translation_instruction(lang)}", targets=str(pair[lang]),
        answer_choices=None, example_id=i, dataset="tatoeba", subset=f"eng-{lang}",
        prompt=translation_instruction(lang))


def composed_examples(lang: str, split: str) -> Iterator[dict[str, Any]]:
  """XL-Sum under the concatenated instruction (ELM's eval file when present, else JSONL)."""
  prompt = composed_instruction(lang)
  elm = os.path.join(_root(), ELM_EVAL_FILE)
  if os.path.exists(elm):
    with open(elm, encoding="utf-8") as f:
      rows = (json.load(f).get("xlsum") or {}).get(prompt)
    if rows is None:
      raise KeyError(f"{elm} has no xlsum prompt {prompt!r}.")
    for i, key in enumerate(rows):
      yield examples_lib.make_example(inputs=str(rows[key]["source"]),
                                      targets=str(rows[key]["target"]), answer_choices=None,
                                      example_id=i, dataset="xlsum", subset=lang, prompt=prompt)
    return
  path = os.path.join(_root(), "xlsum", lang, f"{split}.jsonl")
  for i, row in enumerate(_jsonl(path, f"XL-Sum rows {{'text', 'summary'}} (summary in {lang})")):
    yield examples_lib.make_example(inputs=f"{_field(row, 'text', path)}\n\n{prompt}",
                                    targets=_field(row, "summary", path), answer_choices=None,
                                    example_id=i, dataset="xlsum", subset=lang, prompt=prompt)


def missing_files(dataset: str, subset: str | None) -> list[str]:
  """The files a compositional task needs that are absent (for `tasks check`)."""
  root = _root()
  if dataset == "xlsum":
    if os.path.exists(os.path.join(root, ELM_EVAL_FILE)):
      return []
    wanted = [os.path.join(root, "xlsum", subset, "validation.jsonl")]
  else:
    folder = os.path.join(root, "xsum") if dataset == "xsum" else os.path.join(
        root, "tatoeba", subset)
    wanted = [os.path.join(folder, f"{s}.jsonl") for s in ("train", "validation")]
  return [p for p in wanted if not os.path.exists(p)]
