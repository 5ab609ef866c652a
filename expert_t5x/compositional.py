r"""`expert-t5x compositional`: the paper's compositional-instruction protocol in one command.

    expert-t5x compositional --base MT5_XL --library LIB --output OUT [--languages kor,spa] \
        [--lam 1.0] [--gin_file=... --gin.X=V ...]

The paper (§7) merges a summarization expert with a translation expert and asks the merge to
"translate to X and summarize". This command runs that on the registered `compositional_*` tasks
(`seqio_tasks/compositional_tasks.py`):

1. **experts**: the XSum summarizer and one Tatoeba eng->X translator per language, full-parameter
   experts with the paper's settings (elm_method.md §8: 10k / 100k examples, 1 epoch, 512->128 /
   128->128, Adafactor 1e-4), trained through `python -m expert_t5x.train
   --gin_file=experts/dataset_expert.gin` (the continual command's job runner), and added to the
   library. An expert already in the library under its task name is taken as it is.
2. **merge**: for each language, `task_arithmetic` over (summarizer, translator): θ = θ_pre +
   λ(τ_sum + τ_trans), with the merging module's recipe (inputs' hashes, method, λ, output hash).
   ELM's code has no merge formula or λ for this experiment; λ = 1.0 (the sum of both task vectors,
   so each expert's change is kept whole) is our choice, and `--lam` changes it.
3. **evaluate**: the base, each single expert and the merge on the composed XL-Sum task of the
   language, greedy decoding up to 128 tokens, with ROUGE and BLEU; `compositional.json` reports
   them and the recipes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from expert_t5x import continual

REPORT_FILE = "compositional.json"
DEFAULT_LAM = 1.0
TARGET_MAX_LENGTH = 128  # val_max_target_length of the summarizer's 512 -> 128
FULL_EXPERT_GIN = "experts/dataset_expert.gin"


def _tasks():
  from seqio_tasks import compositional_tasks  # pylint: disable=g-import-not-at-top
  return compositional_tasks


def _settings():
  from seqio_tasks.sources import compositional  # pylint: disable=g-import-not-at-top
  return compositional


def parse_languages(value: str | Sequence[str]) -> list[str]:
  """The requested languages, each one of the paper's five (one line otherwise)."""
  langs = [l.strip() for l in (value.split(",") if isinstance(value, str) else value) if l.strip()]
  known = _settings().LANGUAGES
  bad = [l for l in langs if l not in known]
  if bad or not langs:
    raise ValueError(f"--languages {','.join(langs) or '(empty)'}: expected a comma list of "
                     f"{', '.join(known)} (Tatoeba's ISO 639-3 codes).")
  return langs


def training_groups(langs: Sequence[str]) -> list[tuple[Any, list[str]]]:
  """One job per expert (full experts are never stacked), each with the paper's settings."""
  src, tasks = _settings(), _tasks()
  return ([(src.SUMMARY_SETTINGS, [tasks.SUMMARY_TASK])]
          + [(src.TRANSLATION_SETTINGS, [tasks.translation_task(l)]) for l in langs])


def ensure_experts(lib, base: str, langs: Sequence[str], out_dir: str,
                   gin_args: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
  """{task: library id} of the summarizer and translators, training and adding the missing ones;
  and the tasks trained in this run."""
  from expert_t5x import library as library_lib  # pylint: disable=g-import-not-at-top
  groups = training_groups(langs)
  ids = {g[1][0]: library_lib.sanitize_id(g[1][0]) for g in groups}
  missing = [g for g in groups if ids[g[1][0]] not in lib.ids()]
  if missing:
    tasks = [t for _, group in missing for t in group]
    trained = continual.train_experts(tasks, base, out_dir, gin_args,
                                      log=lambda m: print(m, file=sys.stderr), groups=missing,
                                      expert_gin=FULL_EXPERT_GIN)
    for task in tasks:
      lib.add(trained[task], name=task)
  return ids, [t for _, group in missing for t in group]


def merge_pair(lib, summary_id: str, translation_id: str, output_dir: str,
               lam: float) -> dict[str, Any]:
  """The task-arithmetic merge of one (summarizer, translator) pair; returns its recipe."""
  from expert_t5x import merging  # pylint: disable=g-import-not-at-top
  ids = [summary_id, translation_id]
  return merging.merge_expert_dirs([lib.expert_dir(i) for i in ids], output_dir, "task_arithmetic",
                                   input_names=ids, overwrite=True, lam=lam)


def run(*, base: str, library: str, output_dir: str, languages: str | Sequence[str] = "",
        lam: float = DEFAULT_LAM, split: str = "validation", max_examples: Optional[int] = None,
        generation_max_length: int = TARGET_MAX_LENGTH, batch_size: int = 16,
        gin_args: Sequence[str] = (), progress: bool = False) -> dict[str, Any]:
  """Runs the compositional protocol (module docstring); writes `<output_dir>/compositional.json`.

  Args:
    base: the pre-trained base θ_pre (HF T5 / mT5 directory or T5X checkpoint).
    library: the expert library (created when missing); trained experts are added to it.
    output_dir: training runs, merged experts, evaluations and the report.
    languages: comma list of target languages (default: the paper's five).
    lam: λ of the task-arithmetic merge.
    split, max_examples: the composed evaluation (the paper: 300 XL-Sum samples).
    generation_max_length: greedy decoding length.
    batch_size: evaluation batch size.
    gin_args: extra `--gin_file=...` / `--gin.X=V` arguments of the training jobs (e.g. the
      base's model gin).
    progress: progress bars.
  """
  from expert_t5x import base_models, evaluation  # pylint: disable=g-import-not-at-top
  from expert_t5x import library as library_lib  # pylint: disable=g-import-not-at-top
  from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
  langs = parse_languages(languages or list(_settings().LANGUAGES))
  lib = library_lib.Library.init(library, exist_ok=True)
  base_model = base_models.load_base(base)
  if lib.base_fingerprint() not in (None, base_model.fingerprint):
    raise ValueError(f"base {base!r} (fingerprint {base_model.fingerprint[:12]}) is not the "
                     f"library's base ({lib.base_fingerprint()[:12]}); pass the base its experts "
                     "were trained on.")
  ids, trained = ensure_experts(lib, base, langs, os.path.join(output_dir, "train"), gin_args)
  tasks = _tasks()
  summary_id = ids[tasks.SUMMARY_TASK]
  rows, recipes = [], {}
  for lang in langs:
    translation_id = ids[tasks.translation_task(lang)]
    merged_dir = os.path.join(output_dir, "merged", lang)
    recipes[lang] = merge_pair(lib, summary_id, translation_id, merged_dir, lam)
    merged_name = f"merged_{summary_id}+{translation_id}"
    results = evaluation.evaluate(
        tasks=[tasks.composed_task(lang)], output_dir=os.path.join(output_dir, "eval", lang),
        base=base_model, include_base=True,
        expert_paths=[merged_dir, lib.expert_dir(summary_id), lib.expert_dir(translation_id)],
        expert_names=[merged_name, summary_id, translation_id], split=split,
        max_examples=max_examples, generation_max_length=generation_max_length,
        bootstrap_samples=0, batch_size=batch_size, progress=progress, write_predictions=True)
    roles = {"base": "base", merged_name: "merged", summary_id: "summarizer",
             translation_id: "translator"}
    for entry in results["entries"]:
      for g in entry["generation"]:
        rows.append({"language": lang, "model": entry["id"], "role": roles.get(entry["id"]),
                     "task": g["task"], "num_examples": g["num_examples"],
                     "metrics": g["metrics"]})
  report = {"base": base_model.fingerprint, "library": os.path.abspath(library),
            "experts": ids, "trained": trained,
            "merge": {"method": "task_arithmetic", "lam": lam,
                      "formula": "theta_pre + lam * (tau_summarizer + tau_translator)",
                      "recipes": recipes},
            "results": rows,
            "settings": {"languages": langs, "split": split, "max_examples": max_examples,
                         "generation_max_length": generation_max_length,
                         "gin_args": list(gin_args)}}
  results_lib.write_json(os.path.join(output_dir, REPORT_FILE), report)
  return report


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="expert-t5x compositional", description="Train (or take from the library) an XSum "
      "summarizer and Tatoeba translators, merge each pair by task arithmetic, and evaluate the "
      "base, the experts and the merges on XL-Sum under 'translate to X and summarize' (ROUGE, "
      "BLEU). Unknown --gin_file / --gin.X=V arguments go to training.")
  p.add_argument("--base", required=True, help="the pre-trained base (HF mT5/T5 dir or T5X ckpt)")
  p.add_argument("--library", required=True, help="expert library (created when missing)")
  p.add_argument("--output", required=True, help="output directory")
  p.add_argument("--languages", default="", help="comma list of kor,spa,zho,jpn,fra (default all)")
  p.add_argument("--lam", type=float, default=DEFAULT_LAM, help="task-arithmetic λ (default 1.0)")
  p.add_argument("--split", default="validation")
  p.add_argument("--max_examples", type=int, default=_settings().EVAL_SIZE)
  p.add_argument("--generation_max_length", type=int, default=TARGET_MAX_LENGTH)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--progress", action="store_true")
  return p


def compositional_main(argv: Optional[Sequence[str]] = None) -> int:
  """`expert-t5x compositional ...`."""
  args, gin_args = continual.parse_with_gin_args(_parser(), argv, "compositional")
  if args is None:
    return 2
  try:
    report = run(base=args.base, library=args.library, output_dir=args.output,
                 languages=args.languages, lam=args.lam, split=args.split,
                 max_examples=args.max_examples, generation_max_length=args.generation_max_length,
                 batch_size=args.batch_size, gin_args=gin_args, progress=args.progress)
  except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"expert-t5x compositional: {message}", file=sys.stderr)
    return 2
  for row in report["results"]:
    m = row["metrics"]
    print(f"{row['language']}\t{row['role']}\t{row['model']}\trougeL={m.get('rougeL')}\t"
          f"bleu={m.get('bleu')}")
  return 0
