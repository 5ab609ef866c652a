r"""`expert-t5x continual`: the paper's continual-learning protocol (CT0) in one command.

    expert-t5x continual --library LIB --base BASE --tasks ct0_continual --output OUT \
        [--bertscore_model DEBERTA_LARGE_MNLI_DIR] [--gin_file models/t5_lm_adapt_xl.gin ...]

The paper (ELM `configs/cT0/`) adds one adapter expert per new CT0 training prompt to the expert
library and retrains nothing, so the seen tasks keep their scores exactly. This command runs that:

1. **seen, before**: each seen task is evaluated under its own library expert (the expert whose
   provenance names the task; its `_score_eval` twin when one is registered);
2. **train**: the new experts with the paper's settings
  (`seqio_tasks.sources.continual.CT0_EXPERTS`:
   batch size, epochs, 1e-4, 512 -> 256, at most 100k examples), through `python -m
   expert_t5x.train --gin_file=experts/prompt_expert.gin`, one stacked job per group of equal
   settings; extra `--gin_file` / `--gin.X=V` arguments come after ours (e.g. the base's model gin);
3. **add** them to the library (old entries are only read);
4. **target**: each new expert on its dataset's target prompts (ELM's `*_eval.json`: wiki_auto's
   expert also on ASSET, each gigaword expert on all 6 gigaword prompts), greedy decoding up to 256
   tokens, on the paper's `target_eval` subset, with ROUGE, BLEU and BERTScore precision;
5. **seen, after**: step 1 again, and `continual.json` says whether every seen-task prediction and
   score is bitwise equal to step 1's and every old library entry is unchanged (exit 1 otherwise).

Environment settings (EXPERT_T5X_CONTINUAL_DIR, EXPERT_T5X_VOCAB, ...) reach the training jobs;
settings made only in Python do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Mapping, Optional, Sequence

REPORT_FILE = "continual.json"
TARGET_MAX_LENGTH = 256  # val_max_target_length of the cT0 configs


def _seqio_tasks():
  import seqio_tasks  # pylint: disable=g-import-not-at-top
  return seqio_tasks


# ------------------------------------------------------------------------------- seen tasks


def seen_routes(entries: Sequence[Mapping[str, Any]],
                seen_tasks: Optional[Sequence[str]] = None) -> dict[str, str]:
  """{eval task: id of the library expert trained on it}: each provenance task's `_score_eval`
  twin when registered, else the task itself; `seen_tasks` keeps only those named."""
  from seqio_tasks import names  # pylint: disable=g-import-not-at-top
  routes: dict[str, str] = {}
  for entry in entries:
    for item in entry.get("provenance") or []:
      task = item.get("task")
      if not task:
        continue
      twin = names.score_eval_name(task)
      routes.setdefault(twin if _is_task(twin) else task, entry["id"])
  if seen_tasks:
    unknown = [t for t in seen_tasks if t not in routes]
    if unknown:
      raise ValueError(f"seen task {unknown[0]!r} has no expert in the library; its experts were "
                       f"trained on {sorted(routes)[:10]}.")
    routes = {t: routes[t] for t in seen_tasks}
  return routes


def _is_task(name: str) -> bool:
  try:
    _seqio_tasks().get_info(name)
    return True
  except (KeyError, ValueError):
    return False


def _evaluate_routed(base, lib, routes: Mapping[str, str], output_dir: str, *, split: str,
                     max_examples: Optional[int], common: Mapping[str, Any]) -> dict[str, Any]:
  """Each task under its own expert, one evaluation (one pass per distinct expert)."""
  from expert_t5x import evaluation  # pylint: disable=g-import-not-at-top
  from expert_t5x import routing as routing_lib  # pylint: disable=g-import-not-at-top
  ids = sorted(set(routes.values()))
  routing = routing_lib.Routing(name="own_expert", routes=dict(routes), info={"kind": "own_expert"})
  return evaluation.evaluate(
      tasks=list(routes), output_dir=output_dir, base=base,
      expert_paths=[lib.expert_dir(i) for i in ids], expert_names=ids, split=split,
      max_examples=max_examples, routing=routing, bootstrap_samples=0, **common)


def _records(eval_dir: str) -> list[dict[str, Any]]:
  from expert_t5x import results  # pylint: disable=g-import-not-at-top
  rows = results.read_jsonl(os.path.join(eval_dir, results.PREDICTIONS_FILE))
  return sorted(rows, key=lambda r: (r["task"], r["example_id"]))


def compare_seen(before_dir: str, after_dir: str) -> dict[str, Any]:
  """Whether every seen-task prediction record (choice scores, prediction, text) is identical."""
  before, after = _records(before_dir), _records(after_dir)
  changed = sorted({a["task"] for a, b in zip(before, after) if a != b})
  if len(before) != len(after):
    changed = sorted({r["task"] for r in before} ^ {r["task"] for r in after} | set(changed))
  return {"num_tasks": len({r["task"] for r in before}), "num_records": len(before),
          "bitwise_unchanged": not changed and len(before) == len(after),
          "changed_tasks": changed}


# ---------------------------------------------------------------------------------- training


def _settings_for(task: str):
  from seqio_tasks import continual_tasks  # pylint: disable=g-import-not-at-top
  return continual_tasks.expert_settings(task)


def training_groups(tasks: Sequence[str]) -> list[tuple[Any, list[str]]]:
  """Tasks grouped by equal paper settings: one stacked training job per group, so each expert
  keeps its own batch size, learning rate, epochs and lengths exactly."""
  groups: dict[Any, list[str]] = {}
  for task in tasks:
    key = dataclasses.replace(_settings_for(task), config="")  # the config file name aside
    groups.setdefault(key, []).append(task)
  return list(groups.items())


PROMPT_EXPERT_GIN = "experts/prompt_expert.gin"


def train_command(tasks: Sequence[str], settings: Any, base: str, model_dir: str,
                  gin_args: Sequence[str] = (), expert_gin: str = PROMPT_EXPERT_GIN) -> list[str]:
  """The `python -m expert_t5x.train` command of one group (the paper's settings as bindings);
  `expert_gin` is the recipe (adapters by default, stacked; `experts/dataset_expert.gin` for full
  experts, one task per job, whose settings have no `reduction_factor`)."""
  lengths = {"inputs": settings.inputs_length, "targets": settings.targets_length}
  name = list(tasks) if expert_gin == PROMPT_EXPERT_GIN else _single(tasks)
  bindings = {
      "MODEL_DIR": repr(model_dir), "MIXTURE_OR_TASK_NAME": repr(name),
      "INITIAL_CHECKPOINT_PATH": repr(os.path.abspath(base)),
      "BATCH_SIZE": settings.batch_size, "NUM_EPOCHS": settings.num_epochs,
      "MAX_EXAMPLES": settings.max_examples, "TASK_FEATURE_LENGTHS": repr(lengths),
      "optimizers.create_learning_rate_scheduler.base_learning_rate": settings.learning_rate}
  if settings.reduction_factor is not None:
    bindings["experts.AdapterConfig.reduction_factor"] = settings.reduction_factor
  files = [a for a in gin_args if a.startswith("--gin_file")]
  rest = [a for a in gin_args if not a.startswith("--gin_file")]
  return ([sys.executable, "-m", "expert_t5x.train", f"--gin_file={expert_gin}", *files]
          + [f"--gin.{k}={v}" for k, v in bindings.items()] + rest)


def _single(tasks: Sequence[str]) -> str:
  if len(tasks) != 1:
    raise ValueError(f"full experts are trained one per job; got the group {list(tasks)}.")
  return tasks[0]


def train_experts(tasks: Sequence[str], base: str, out_dir: str, gin_args: Sequence[str] = (),
                  log: Any = None, *, groups: Optional[Sequence[tuple[Any, list[str]]]] = None,
                  expert_gin: str = PROMPT_EXPERT_GIN) -> dict[str, str]:
  """Trains the paper's experts of `tasks` (or the given (settings, tasks) `groups`, one job
  each); {task: exported expert directory}. Done jobs are kept."""
  from expert_t5x import expert_format  # pylint: disable=g-import-not-at-top
  out: dict[str, str] = {}
  for index, (settings, group) in enumerate(groups or training_groups(tasks)):
    model_dir = os.path.join(out_dir, f"group_{index}")
    dirs = ({t: os.path.join(model_dir, "experts", t) for t in group} if expert_gin
            == PROMPT_EXPERT_GIN else {_single(group): os.path.join(model_dir, "expert")})
    if not all(expert_format.is_expert_dir(d) for d in dirs.values()):
      command = train_command(group, settings, base, model_dir, gin_args, expert_gin)
      if log:
        log(f"training {', '.join(group)}")
      done = subprocess.run(command, check=False, capture_output=True, text=True)
      if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"training {', '.join(group)} failed (exit {done.returncode}): "
                           f"{tail[0]}; rerun `{' '.join(command)}` to see the whole log.")
    out.update(dirs)
  return out


# ---------------------------------------------------------------------------------- targets


def target_groups(tasks: Sequence[str]) -> list[tuple[list[str], list[str]]]:
  """(new experts, the target prompts they are evaluated on), as ELM's `configs/cT0/*_eval.json`."""
  from seqio_tasks import continual_tasks  # pylint: disable=g-import-not-at-top
  from seqio_tasks.sources import continual  # pylint: disable=g-import-not-at-top
  family = {"asset": "wiki_auto"}  # wiki_auto's expert is also evaluated on ASSET
  groups: dict[str, tuple[list[str], list[str]]] = {}
  dataset_of = {continual_tasks.task_name(d, p): d for d, p in continual.CT0_TARGET_PROMPTS}
  for task in tasks:
    groups.setdefault(dataset_of[task], ([], []))[0].append(task)
  for dataset, prompt in continual.CT0_TARGET_PROMPTS:
    key = family.get(dataset, dataset)
    if key in groups:
      groups[key][1].append(continual_tasks.task_name(dataset, prompt))
  return list(groups.values())


def _generation_summary(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  return [{"expert": e["id"], "task": g["task"], "num_examples": g["num_examples"],
           "metrics": g["metrics"]} for e in results["entries"] for g in e["generation"]]


# ---------------------------------------------------------------------------------- protocol


def _entry_hashes(lib, ids: Sequence[str]) -> dict[str, str]:
  return {i: lib.get(i)["content_hash"] for i in ids}


def run(*, library: str, base: str, tasks: str | Sequence[str], output_dir: str,
        seen_tasks: Optional[Sequence[str]] = None, seen_split: str = "validation",
        seen_max_examples: Optional[int] = 300, target_split: str = "target_eval",
        target_max_examples: Optional[int] = None,
        generation_max_length: int = TARGET_MAX_LENGTH, batch_size: int = 32,
        bertscore_model: Optional[str] = None, bertscore_layers: Optional[int] = None,
        gin_args: Sequence[str] = (), progress: bool = False) -> dict[str, Any]:
  """Runs the continual protocol (module docstring) and writes `<output_dir>/continual.json`.

  Args:
    library: the expert library of the seen experts; the new experts are added to it.
    base: the frozen base (HF T5 directory or T5X checkpoint) the library's experts share.
    tasks: the new training tasks: `ct0_continual` or some of its task names.
    output_dir: training runs, the three evaluations and the report.
    seen_tasks: seen eval tasks (default: every library expert's own task).
    seen_split, seen_max_examples: the seen evaluation (the paper: 300 validation examples).
    target_split, target_max_examples: the target evaluation (the paper's 300-example subset).
    generation_max_length: greedy decoding length of the target prompts (cT0 configs: 256).
    batch_size: evaluation batch size.
    bertscore_model, bertscore_layers: the BERTScore model directory (deberta-large-mnli) and layer.
    gin_args: extra `--gin_file=...` / `--gin.X=V` arguments of the training jobs.
    progress: progress bars.
  """
  from expert_t5x import base_models, evaluation  # pylint: disable=g-import-not-at-top
  from expert_t5x import eval_tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from expert_t5x import library as library_lib  # pylint: disable=g-import-not-at-top
  from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
  new_tasks = tasks_lib.SeqioTaskSource().resolve(tasks)
  for task in new_tasks:
    _settings_for(task)  # one clear line for a task without the paper's settings
  lib = library_lib.Library(library)
  old_ids = lib.ids()
  clash = [t for t in new_tasks if library_lib.sanitize_id(t) in old_ids]
  if clash:
    raise ValueError(f"the library already has an expert {clash[0]!r}; a continual step adds new "
                     "experts only (remove it, or use another library).")
  routes = seen_routes(lib.entries(), seen_tasks)
  if not routes:
    raise ValueError(f"library {library!r} has no expert with a registered task to check the seen "
                     "tasks with; add the seen experts first (`expert-t5x library add`).")
  base_model = base_models.load_base(base)
  if lib.base_fingerprint() not in (None, base_model.fingerprint):
    raise ValueError(f"base {base!r} (fingerprint {base_model.fingerprint[:12]}) is not the "
                     f"library's base ({lib.base_fingerprint()[:12]}); pass the base its experts "
                     "were trained on.")
  common = {"batch_size": batch_size, "progress": progress, "write_predictions": True}
  hashes_before = _entry_hashes(lib, old_ids)
  _evaluate_routed(base_model, lib, routes, os.path.join(output_dir, "seen_before"),
                   split=seen_split, max_examples=seen_max_examples, common=common)

  trained = train_experts(new_tasks, base, os.path.join(output_dir, "train"), gin_args,
                          log=lambda m: print(m, file=sys.stderr))
  for task in new_tasks:
    lib.add(trained[task], name=task)

  target = []
  for index, (experts, eval_tasks) in enumerate(target_groups(new_tasks)):
    results = evaluation.evaluate(
        tasks=eval_tasks, output_dir=os.path.join(output_dir, "target", f"group_{index}"),
        base=base_model, expert_paths=[lib.expert_dir(library_lib.sanitize_id(t)) for t in experts],
        expert_names=experts, split=target_split, max_examples=target_max_examples,
        generation_max_length=generation_max_length, bootstrap_samples=0,
        bertscore_model=bertscore_model, bertscore_layers=bertscore_layers, **common)
    target += _generation_summary(results)

  _evaluate_routed(base_model, lib, routes, os.path.join(output_dir, "seen_after"),
                   split=seen_split, max_examples=seen_max_examples, common=common)
  seen = compare_seen(os.path.join(output_dir, "seen_before"),
                      os.path.join(output_dir, "seen_after"))
  hashes_after = _entry_hashes(lib, old_ids)
  seen["old_experts_unchanged"] = hashes_after == hashes_before
  report = {"library": os.path.abspath(library), "base": base_model.fingerprint,
            "new_experts": {t: library_lib.sanitize_id(t) for t in new_tasks},
            "seen_routes": routes, "seen": seen, "target": target,
            "settings": {"seen_split": seen_split, "seen_max_examples": seen_max_examples,
                         "target_split": target_split, "target_max_examples": target_max_examples,
                         "generation_max_length": generation_max_length,
                         "bertscore_model": bertscore_model, "gin_args": list(gin_args)}}
  results_lib.write_json(os.path.join(output_dir, REPORT_FILE), report)
  return report


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="expert-t5x continual", description="Train the paper's continual (CT0) experts, add "
      "them to a library, evaluate the new and the seen tasks, and check that the seen-task "
      "scores are bitwise unchanged. Unknown --gin_file / --gin.X=V arguments go to training.")
  p.add_argument("--library", required=True, help="expert library of the seen experts")
  p.add_argument("--base", required=True, help="the frozen base (HF T5 dir or T5X checkpoint)")
  p.add_argument("--tasks", default="ct0_continual", help="new tasks (suite or comma list)")
  p.add_argument("--output", required=True, help="output directory")
  p.add_argument("--seen_tasks", help="comma list of seen eval tasks (default: the library's)")
  p.add_argument("--seen_split", default="validation")
  p.add_argument("--seen_max_examples", type=int, default=300)
  p.add_argument("--target_split", default="target_eval")
  p.add_argument("--target_max_examples", type=int)
  p.add_argument("--generation_max_length", type=int, default=TARGET_MAX_LENGTH)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--bertscore_model", help="transformers dir of microsoft/deberta-large-mnli")
  p.add_argument("--bertscore_layers", type=int, help="its hidden layer (default 18)")
  p.add_argument("--progress", action="store_true")
  return p


def parse_with_gin_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                        command: str) -> tuple[Optional[argparse.Namespace], list[str]]:
  """The command's own flags and the `--gin_file=F` / `--gin.X=V` flags that pass through to
  training; (None, []) after printing one line when another unknown argument is given."""
  args, gin_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
  bad = [a for a in gin_args if not a.startswith(("--gin_file", "--gin."))]
  if bad:
    print(f"expert-t5x {command}: unknown argument {bad[0]!r}; only --gin_file=F and --gin.X=V "
          "pass through to training.", file=sys.stderr)
    return None, []
  return args, gin_args


def continual_main(argv: Optional[Sequence[str]] = None) -> int:
  """`expert-t5x continual ...`; exit 1 when a seen-task score changed."""
  args, gin_args = parse_with_gin_args(_parser(), argv, "continual")
  if args is None:
    return 2
  try:
    report = run(library=args.library, base=args.base, tasks=args.tasks, output_dir=args.output,
                 seen_tasks=args.seen_tasks.split(",") if args.seen_tasks else None,
                 seen_split=args.seen_split, seen_max_examples=args.seen_max_examples,
                 target_split=args.target_split, target_max_examples=args.target_max_examples,
                 generation_max_length=args.generation_max_length, batch_size=args.batch_size,
                 bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers,
                 gin_args=gin_args, progress=args.progress)
  except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"expert-t5x continual: {message}", file=sys.stderr)
    return 2
  seen = report["seen"]
  print(json.dumps({"seen": seen, "target": report["target"]}, indent=1))
  ok = seen["bitwise_unchanged"] and seen["old_experts_unchanged"]
  print(f"seen tasks: {seen['num_tasks']} ({seen['num_records']} predictions) "
        f"{'bitwise unchanged' if ok else 'CHANGED: ' + ', '.join(seen['changed_tasks'])}")
  return 0 if ok else 1
