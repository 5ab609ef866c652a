# python -m launch.sweep slurm --grid=paper --expert_type=prompt --stack=8 --library=/shared/lib
# --model_root=/shared/runs --out_dir=/shared/sweeps/pe
# --gin.INITIAL_CHECKPOINT_PATH='"/shared/t5-xl-lm-adapt"' --dry_run
"""Expert sweeps: one job per expert (or per stacked group) on SLURM, Kubernetes or this machine.

  python -m launch.sweep list   ...   the jobs, one line each
  python -m launch.sweep local  ...   run the jobs one after another here
  python -m launch.sweep slurm  ...   write a SLURM job array (`sbatch` it, or pass --submit)
  python -m launch.sweep k8s    ...   write a Kubernetes indexed Job (`kubectl apply` it, or
  --submit)

The experts come from the paper's grid (`--grid=paper`: 296 prompts over 36 datasets, with the
per-expert settings of the grid), a SeqIO suite (`--suite=NAME`) or explicit task names
(`--tasks=a,b`). Every job is a small bash script (`jobs/job_NNNN.sh`) that all three targets run
unchanged, and every job is idempotent:

  * experts already in the library (`--library`) are skipped, both when the sweep is generated and
    when the job starts;
  * an interrupted job resumes: MODEL_DIR is a pure function of the job's experts, and the trainer
    resumes from MODEL_DIR's latest checkpoint; SIGTERM (preemption, time limit, pod deletion) is
    forwarded to the trainer so it saves a checkpoint first;
  * after training, each exported expert is added to the library under its sweep id.

Stacked groups (`--stack=K`) train up to K adapter/LoRA experts of one recipe and one set of shared
settings in one job; full fine-tuning experts are never stacked.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # pylint: disable=g-import-not-at-top
from launch import sweep_targets  # pylint: disable=g-import-not-at-top


@dataclasses.dataclass(frozen=True)
class ExpertType:
  """How one kind of expert is trained: its recipe, its task per grid entry, whether it stacks."""
  recipe: str          # gin file (relative to the shipped gin folder)
  per: str             # 'prompt' or 'dataset'
  task_suffix: str     # appended to the dataset prefix for per-dataset experts
  id_suffix: str       # library id = task (or dataset) name + this
  stackable: bool


EXPERT_TYPES: dict[str, ExpertType] = {
    # The paper's prompt expert (PE): adapters + layer-norm scales, one per prompt.
    "prompt": ExpertType("experts/prompt_expert.gin", "prompt", "", "", True),
    "lora": ExpertType("experts/lora_expert.gin", "prompt", "", "@lora", True),
    # The paper's dataset expert (DE): full fine-tuning on one random prompt per example.
    "dataset": ExpertType("experts/dataset_expert.gin", "dataset", "_random_prompt", "", False),
    "dataset_adapter": ExpertType("experts/dataset_expert_adapter.gin", "dataset", "_all_prompts",
                                  "@adapter", True),
}

# Per-expert settings of the grid file by name -> the trainer's gin binding.
SETTING_BINDINGS = {
    "learning_rate": "optimizers.create_learning_rate_scheduler.base_learning_rate",
    "num_epochs": "NUM_EPOCHS",
    "batch_size": "BATCH_SIZE",
    "task_feature_lengths": "TASK_FEATURE_LENGTHS",
    "max_examples": "MAX_EXAMPLES",
    "num_microbatches": "NUM_MICROBATCHES",
}
_GRID_FIELDS = ("dataset", "subset", "learning_rate", "batch_size", "num_epochs", "max_examples",
                "inputs_length", "targets_length")
# A stacked job gives the trainer's MIXTURE_OR_TASK_NAME a list of tasks (one per expert).
STACKED_TASKS_MACRO = "MIXTURE_OR_TASK_NAME"
# Where the trainer exports experts under MODEL_DIR: one expert, or one per task of a stacked job.
EXPORT_SUBDIR = "expert"
STACKED_EXPORT_SUBDIR = "experts"
# The trainer's per-expert settings of the paper's grid (package data of expert_t5x).
GRID_SETTINGS_PATH = os.path.join(common.REPO_ROOT, "expert_t5x", "data", "grid.json")

GridEntry = dict[str, Any]


def load_grid_settings(path: str | None = None) -> list[GridEntry]:
  """The grid's per-expert settings as a list of entries

      {"recipe": "prompt_expert",          # optional: gin/experts/<recipe>.gin it applies to
       "dataset": "trec", "subset": null,  # the grid's dataset
       "prompt": null,                     # optional: one prompt; null = every prompt + the DE
       "gin": {"NUM_EPOCHS": 10},          # gin bindings, and/or
       "settings": {"learning_rate": 3e-4}}  # names of SETTING_BINDINGS

  read from a JSON list (or `{"experts": [...]}`) of such entries, or from the trainer's grid file
  (`expert_t5x/data/grid.json`: the paper's settings of every prompt expert and adapter DE).
  Later entries override earlier ones. A missing file means the recipes' defaults everywhere.
  """
  path = path or GRID_SETTINGS_PATH
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise common.LaunchError(f"Grid settings file {path} is not valid JSON ({e}).") from None
  if isinstance(data, Mapping) and "prompt_experts" in data:
    try:
      data = _entries_from_trainer_grid(data)
    except KeyError as e:
      raise common.LaunchError(f"Grid settings file {path}: an expert lacks field {e.args[0]!r}; "
                               f"every entry needs {_GRID_FIELDS}.") from None
  entries = data.get("experts") if isinstance(data, Mapping) else data
  if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "dataset" in e
                                              for e in entries):
    raise common.LaunchError(f"Grid settings file {path} must be a list of objects with 'dataset' "
                             f"(and 'gin' or 'settings'), the trainer's grid file, or "
                             f"{{\"experts\": [...]}}.")
  for i, entry in enumerate(entries):
    unknown = sorted(set(entry.get("settings", {})) - set(SETTING_BINDINGS))
    if unknown:
      raise common.LaunchError(
          f"Grid settings file {path} entry {i} has unknown settings {unknown}; "
          f"known: {sorted(SETTING_BINDINGS)} (or give gin bindings under 'gin').")
  return list(entries)


# The trainer's grid file: one entry per expert, its fields -> SETTING_BINDINGS names.
_TRAINER_GRID_RECIPES = {
    "prompt_experts": "prompt_expert", "dataset_experts": "dataset_expert_adapter"
}


def _grid_settings(fields: Mapping[str, Any]) -> dict[str, Any]:
  """One expert of `expert_t5x/data/grid.json` as settings: the paper's per-device batch times its
  gradient accumulation is the global batch, split into that many microbatches, so the step count
  `num_epochs x ceil(n / batch)` is the paper's (HF Trainer, one GPU)."""
  accumulation = fields.get("gradient_accumulation_steps") or 1
  out = {"learning_rate": fields["learning_rate"], "num_epochs": fields["num_epochs"],
         "batch_size": fields["batch_size"] * accumulation, "max_examples": fields["max_examples"],
         "task_feature_lengths": {"inputs": fields["inputs_length"],
                                  "targets": fields["targets_length"]}}
  if accumulation > 1:
    out["num_microbatches"] = accumulation
  return out


def _entries_from_trainer_grid(grid: Mapping[str, Any]) -> list[GridEntry]:
  """Converts `expert_t5x/data/grid.json` (per-expert settings of the paper) to settings entries."""
  entries: list[GridEntry] = []
  for key, recipe in _TRAINER_GRID_RECIPES.items():
    for fields in grid.get(key, []):
      entries.append({"recipe": recipe, "dataset": fields["dataset"], "subset": fields["subset"],
                      "prompt": fields.get("prompt"), "settings": _grid_settings(fields)})
  return entries


def lookup_settings(entries: Sequence[GridEntry], expert_type: str, dataset: str,
                    subset: str | None, prompt: str | None) -> dict[str, Any]:
  """Gin bindings for one expert of the grid (empty: the recipe's defaults apply)."""
  recipe = os.path.splitext(os.path.basename(EXPERT_TYPES[expert_type].recipe))[0]
  bindings: dict[str, Any] = {}
  for entry in entries:
    if entry.get("recipe") not in (None, recipe):
      continue
    if entry["dataset"] != dataset or entry.get("subset") != subset:
      continue
    if entry.get("prompt") is not None and entry["prompt"] != prompt:
      continue
    bindings.update({SETTING_BINDINGS[k]: v for k, v in entry.get("settings", {}).items()})
    bindings.update(entry.get("gin", {}))
  return bindings


@dataclasses.dataclass(frozen=True)
class Expert:
  """One expert of a sweep."""
  id: str                       # library id (also how a rerun recognises it)
  task: str                     # the SeqIO task it trains on
  dataset: str | None
  subset: str | None
  prompt: str | None
  settings: tuple[tuple[str, str], ...] = ()  # gin binding -> JSON value (see _freeze)

  @property
  def settings_dict(self) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in self.settings}


@dataclasses.dataclass
class Job:
  """One scheduler job: one expert, or a stacked group of them."""
  index: int
  name: str                     # stable: derived from the experts it trains
  expert_type: str
  experts: list[Expert]
  model_dir: str
  argv: list[str]
  exports: list[str]            # exported expert directories, one per expert
  done: list[str] = dataclasses.field(default_factory=list)  # ids already in the library

  def to_json(self) -> dict[str, Any]:
    return {
        "index": self.index, "name": self.name, "expert_type": self.expert_type,
        "experts": [dataclasses.asdict(e) | {"settings": e.settings_dict} for e in self.experts],
        "model_dir": self.model_dir, "argv": self.argv, "exports": self.exports, "done": self.done
    }


# ----------------------------------------------------------------------------
# Where experts come from.
# ----------------------------------------------------------------------------


def _freeze(settings: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
  """Settings as a hashable, ordered key (values as JSON), so equal settings group together."""
  return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in settings.items()))


def paper_grid(expert_type: str) -> list[Expert]:
  """The paper's experts: 296 prompt experts or 36 dataset experts, with per-expert settings."""
  names = common.task_names()
  kind = EXPERT_TYPES[expert_type]
  table = load_grid_settings()
  experts = []
  for entry in common.read_seqio_data("t0_train_296.json"):
    ds, sub = entry["dataset"], entry["subset"]
    prefix = names.dataset_task_prefix(ds, sub)
    if kind.per == "dataset":
      settings = lookup_settings(table, expert_type, ds, sub, None)
      experts.append(Expert(prefix + kind.id_suffix, prefix + kind.task_suffix, ds, sub, None,
                            _freeze(settings)))
      continue
    for prompt in entry["prompts"]:
      task = names.prompt_task_name(ds, sub, prompt)
      settings = lookup_settings(table, expert_type, ds, sub, prompt)
      experts.append(Expert(task + kind.id_suffix, task, ds, sub, prompt, _freeze(settings)))
  return experts


def suite_experts(suite: str, expert_type: str) -> list[Expert]:
  """Experts for every task of a SeqIO suite (imports seqio_tasks, hence TensorFlow)."""
  import seqio_tasks  # pylint: disable=g-import-not-at-top
  kind = EXPERT_TYPES[expert_type]
  try:
    infos = [seqio_tasks.get_info(t) for t in seqio_tasks.suite(suite)]
    if kind.per == "prompt":
      return [Expert(i.name + kind.id_suffix, i.name, i.dataset, i.subset, i.prompt) for i in infos]
    names = common.task_names()
    experts = {}
    for info in infos:
      prefix = names.dataset_task_prefix(info.dataset, info.subset)
      task = prefix + kind.task_suffix
      seqio_tasks.get_info(task)  # a dataset without that task fails here, naming close ones
      experts.setdefault(task, Expert(prefix + kind.id_suffix, task, info.dataset, info.subset,
                                      None))
    return list(experts.values())
  except KeyError as e:
    raise common.LaunchError(
        f"--suite={suite} with --expert_type={expert_type}: {e.args[0]}") from None


def named_experts(tasks: Sequence[str], expert_type: str) -> list[Expert]:
  kind = EXPERT_TYPES[expert_type]
  if kind.per != "prompt":
    raise common.LaunchError(
        f"--tasks gives task names, but --expert_type={expert_type} trains one "
        f"expert per dataset; use --grid=paper or --suite=NAME for it.")
  bad = [t for t in tasks if not re.fullmatch(r"[\w.]+", t)]
  if bad:
    raise common.LaunchError(
        f"--tasks has names that are not SeqIO task names: {bad}; task names use "
        f"letters, digits, '_' and '.' (see `expert-t5x tasks list`).")
  return [Expert(t + kind.id_suffix, t, None, None, None) for t in dict.fromkeys(tasks)]


# ----------------------------------------------------------------------------
# Jobs.
# ----------------------------------------------------------------------------


def group_experts(experts: Sequence[Expert], stack: int, expert_type: str) -> list[list[Expert]]:
  """Groups of up to `stack` experts that can share one job (same settings), in input order."""
  if stack < 1:
    raise common.LaunchError(f"--stack={stack} must be >= 1 (1 = one job per expert).")
  if stack > 1 and not EXPERT_TYPES[expert_type].stackable:
    raise common.LaunchError(
        f"--expert_type={expert_type} is full fine-tuning, which is never stacked; "
        f"use --stack=1.")
  if stack == 1:
    return [[e] for e in experts]
  buckets: dict[tuple, list[list[Expert]]] = {}
  order: list[list[Expert]] = []
  for e in experts:
    groups = buckets.setdefault(e.settings, [])
    if not groups or len(groups[-1]) == stack:
      groups.append([])
      order.append(groups[-1])
    groups[-1].append(e)
  return order


def job_name(group: Sequence[Expert]) -> str:
  """A stable directory name: the expert id alone, or a digest of the stacked ids."""
  if len(group) == 1:
    return re.sub(r"[^A-Za-z0-9._@+=-]+", "_", group[0].id)
  digest = hashlib.sha256("\n".join(e.id for e in group).encode()).hexdigest()[:12]
  return f"stack{len(group)}-{digest}"


def train_argv(group: Sequence[Expert], expert_type: str, model_dir: str, args: argparse.Namespace,
               gin_overrides: Sequence[str]) -> list[str]:
  """The trainer command of one job (recipe, user gin files, per-expert settings, user
  overrides)."""
  argv = shlex.split(args.train_cmd) if args.train_cmd else [args.python, "-m", common.TRAIN_MODULE]
  argv += [f"--gin_file={EXPERT_TYPES[expert_type].recipe}"]
  argv += [f"--gin_file={f}" for f in args.gin_file]
  if args.gin_search_paths:
    argv.append(f"--gin_search_paths={args.gin_search_paths}")
  argv.append(common.gin_flag("MODEL_DIR", model_dir))
  if len(group) == 1:
    argv.append(common.gin_flag("MIXTURE_OR_TASK_NAME", group[0].task))
  else:
    argv.append(common.gin_flag(STACKED_TASKS_MACRO, [e.task for e in group]))
  # Shared by the whole group (grouping guarantees it).
  argv += [common.gin_flag(k, v) for k, v in group[0].settings_dict.items()]
  return argv + list(gin_overrides)


def export_dirs(group: Sequence[Expert], model_dir: str) -> list[str]:
  """Where the trainer exports each expert of a job (Expert format v1 directories)."""
  if len(group) == 1:
    return [_join(model_dir, EXPORT_SUBDIR)]
  return [_join(model_dir, STACKED_EXPORT_SUBDIR, e.task) for e in group]


def library_ids(library: str) -> set[str] | None:
  """Ids already in the library, or None when it is not readable from here (jobs check again)."""
  if not os.path.isfile(os.path.join(library, "library.json")):
    return None
  from expert_t5x import library as library_lib  # pylint: disable=g-import-not-at-top
  return set(library_lib.Library(library).ids())


def build_jobs(experts: Sequence[Expert], args: argparse.Namespace,
               gin_overrides: Sequence[str]) -> tuple[list[Job], int]:
  """Jobs for the experts not yet in the library; returns (jobs, number of experts skipped)."""
  in_library = library_ids(args.library) or set()
  jobs, skipped = [], 0
  # Groups come from the full list, so a group's membership (hence its MODEL_DIR and checkpoint)
  # does not change when some of its experts are already done.
  for group in group_experts(experts, args.stack, args.expert_type):
    done = [e.id for e in group if e.id in in_library]
    if len(done) == len(group):
      skipped += len(group)
      continue
    name = job_name(group)
    model_dir = _join(args.model_root, args.expert_type, name)
    jobs.append(Job(len(jobs), name, args.expert_type, list(group), model_dir,
                    train_argv(group, args.expert_type, model_dir, args, gin_overrides),
                    export_dirs(group, model_dir), done))
  return jobs, skipped


def _join(root: str, *parts: str) -> str:
  return os.path.join(root, *parts)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def select_experts(args: argparse.Namespace) -> list[Expert]:
  sources = [s for s in (args.grid, args.suite, args.tasks) if s]
  if len(sources) != 1:
    raise common.LaunchError("Choose the experts with exactly one of --grid=paper, --suite=NAME or "
                             "--tasks=TASK[,TASK...].")
  if args.grid:
    if args.grid != "paper":
      raise common.LaunchError(f"--grid={args.grid!r} is unknown; the only grid is 'paper'.")
    experts = paper_grid(args.expert_type)
  elif args.suite:
    experts = suite_experts(args.suite, args.expert_type)
  else:
    experts = named_experts([t for t in args.tasks.split(",") if t], args.expert_type)
  if args.only:
    pattern = re.compile(args.only)
    experts = [e for e in experts if pattern.search(e.id)]
  if args.limit is not None:
    experts = experts[:args.limit]
  if not experts:
    raise common.LaunchError("No experts selected; loosen --only/--limit.")
  return experts


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Unknown --gin.NAME=VALUE flags are passed to every job's trainer after the grid's "
             "settings (so they win).")
  parser.add_argument("target", choices=("list", "local", "slurm", "k8s"))
  g = parser.add_argument_group("experts")
  g.add_argument("--grid",
                 help="'paper': the paper's 296 prompts / 36 datasets with per-expert settings")
  g.add_argument("--suite", help="a SeqIO suite, e.g. demo_train (imports TensorFlow)")
  g.add_argument("--tasks", help="comma-separated SeqIO task names (prompt or LoRA experts)")
  g.add_argument("--expert_type", default="prompt", choices=sorted(EXPERT_TYPES))
  g.add_argument("--only", help="regular expression on expert ids")
  g.add_argument("--limit", type=int, help="first N experts only")
  g.add_argument("--stack",
                 type=int,
                 default=1,
                 help="experts per job (stacked training); 1 = one each")
  g = parser.add_argument_group("training")
  g.add_argument("--library", required=True, help="expert library (POSIX path shared by the jobs)")
  g.add_argument("--model_root", required=True, help="MODEL_DIRs go under <root>/<expert_type>/")
  g.add_argument("--gin_file", action="append", default=[], help="extra gin file for every job")
  g.add_argument("--gin_search_paths", help="comma-separated gin search paths")
  g.add_argument("--python", default="python", help="Python of the jobs' environment")
  g.add_argument("--train_cmd", help="replace `PYTHON -m expert_t5x.train` (e.g. a wrapper)")
  g.add_argument("--setup", action="append", default=[], help="shell line run before training "
                 "(e.g. 'source /shared/venv/bin/activate'); repeatable")
  g.add_argument("--gpu_env",
                 action="store_true",
                 help="JAX GPU memory settings in the jobs (default "
                 "for slurm and k8s --accelerator=gpu)")
  g = parser.add_argument_group("output")
  g.add_argument("--out_dir", help="where the job scripts (and sbatch/YAML) are written "
                 "(default: <model_root>/sweeps/<name>)")
  g.add_argument("--name", help="sweep name (default: <expert_type>-<grid|suite|tasks>)")
  g.add_argument("--dry_run",
                 action="store_true",
                 help="print what would be written/run; touch nothing")
  g.add_argument("--submit", action="store_true", help="run sbatch / kubectl apply after writing")
  sweep_targets.add_target_flags(parser)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if hasattr(signal, "SIGPIPE"):  # `python -m launch.sweep list ... | head` ends quietly
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
  gin_overrides = [a for a in argv if a.startswith("--gin.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--gin.")])
  try:
    for override in gin_overrides:
      common.parse_gin_override(override)
    if "://" in args.library:
      raise common.LaunchError(
          f"--library={args.library!r} is an object-store URL; libraries need a "
          f"POSIX filesystem shared by the jobs (NFS, Filestore, Lustre).")
    if "://" in args.model_root:
      raise common.LaunchError(
          f"--model_root={args.model_root!r} is an object-store URL; the trainer "
          f"writes MODEL_DIR and the exported experts through the filesystem, so "
          f"use a path shared by the jobs (NFS, Filestore, a gcsfuse mount).")
    args.name = sweep_targets.sweep_name(args)
    experts = select_experts(args)
    jobs, skipped = build_jobs(experts, args, gin_overrides)
    return sweep_targets.dispatch(args, jobs, len(experts), skipped)
  except common.LaunchError as e:
    print(f"launch.sweep: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
