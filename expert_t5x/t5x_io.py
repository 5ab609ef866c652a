"""Conversions between upstream T5X runs and our formats (no t5x import).

* `write_t5x_checkpoint`: a base (a Hugging Face T5 directory, any T5X checkpoint, or random
  weights of a named config) -> `DIR/checkpoint_<step>/state`, T5X's orbax layout with the
  parameters as `target`, so `python -m t5x.train` can start from it (`INITIAL_CHECKPOINT_PATH`;
  the optimizer state is initialised by T5X, see `gin/t5x/`). CLI: `expert-t5x t5x-checkpoint`.
* `import_t5x_run`: a T5X run trained with `t5x_compat.ExpertTransformer` -> an Expert format v1
  directory with its provenance, the base's fingerprint and retrieval keys drawn from the task it
  was trained on. CLI: `expert-t5x import t5x RUN_DIR --output DIR`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from expert_t5x import checkpoint_importer
from expert_t5x import expert_format
from expert_t5x import experts
from expert_t5x import t5x_compat
from expert_t5x import trees

OPERATIVE_CONFIG = "config.gin"  # What `t5x.train` writes into MODEL_DIR.


# ------------------------------------------------------------------------------ checkpoint


def write_t5x_checkpoint(params: Mapping[str, Any], output_dir: str, step: int = 0) -> str:
  """Writes `params` as a T5X orbax checkpoint `output_dir/checkpoint_<step>` and returns it."""
  from expert_t5x import checkpoints  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(output_dir, f"checkpoint_{step}")):
    raise FileExistsError(f"{output_dir}/checkpoint_{step} exists; choose another --output.")
  target = _float32_tree(params)
  manager = checkpoints.CheckpointManager(output_dir, async_save=False)
  manager.save(step, {"target": target, "state": {"step": np.asarray(step, np.int32)}})
  manager.close()
  return os.path.join(output_dir, f"checkpoint_{step}")


def _float32_tree(params: Mapping[str, Any]) -> dict[str, Any]:
  """A nested dict of float32 numpy arrays."""
  return trees.unflatten({k: np.asarray(v, np.float32) for k, v in trees.flatten(params).items()})


def _checkpoint_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="expert-t5x t5x-checkpoint",
      description="Write a T5X checkpoint (for upstream `python -m t5x.train`'s "
                  "INITIAL_CHECKPOINT_PATH) from a Hugging Face T5 directory, a T5X checkpoint "
                  "or random weights of a named config.")
  p.add_argument("source", nargs="?", help="HF T5 directory or T5X checkpoint")
  p.add_argument("--output", required=True, help="directory to create (gets checkpoint_<step>)")
  p.add_argument("--model_config", help="named config for random weights (tiny, small, ...)")
  p.add_argument("--random_init_seed", type=int, help="seed of random weights")
  p.add_argument("--vocab_size", type=int, help="override the named config's vocab_size")
  p.add_argument("--step", type=int, default=0, help="step recorded in the checkpoint")
  return p


def t5x_checkpoint_main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `expert-t5x t5x-checkpoint`."""
  args = _checkpoint_parser().parse_args(argv)
  from expert_t5x import base_models  # pylint: disable=g-import-not-at-top
  try:
    if bool(args.source) == (args.random_init_seed is not None):
      raise ValueError("pass either SOURCE (an HF T5 directory or T5X checkpoint) or "
                       "--model_config NAME --random_init_seed N (random weights).")
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else None
    base = base_models.load_base(args.source, args.model_config, args.random_init_seed,
                                 config_overrides=overrides)
    path = write_t5x_checkpoint(base.params, args.output, args.step)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"expert-t5x t5x-checkpoint: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path} from {base.description} (fingerprint {base.fingerprint[:12]})")
  return 0


# ---------------------------------------------------------------------------------- import


def _gin_macro(text: str, name: str) -> Any:
  # T5X's operative config wraps long values onto the next line after a backslash.
  text = re.sub(r"\\\n\s*", "", text)
  m = re.search(rf"^{name}\s*=\s*(.+)$", text, re.M)
  return t5x_compat._literal(m.group(1)) if m else None  # pylint: disable=protected-access


def _draw_keys(task: str, num_keys: int, seed: int) -> list[dict[str, Any]]:
  """`num_keys` training examples of `task` (seeded choice over its train split)."""
  from expert_t5x import train_data  # pylint: disable=g-import-not-at-top
  cfg = train_data.DatasetConfig(mixture_or_task_name=task, task_feature_lengths={},
                                 split="train")
  names = ([t.name for t in train_data.get_task(task).tasks]
           if train_data.is_mixture(train_data.get_task(task)) else [task])
  seen = []
  for name in names:
    sub = train_data.DatasetConfig(mixture_or_task_name=name, task_feature_lengths={},
                                   split="train")
    ds = train_data._task_dataset(sub).map(train_data.add_example_key)  # pylint: disable=protected-access
    seen.extend(int(ex[train_data.EXAMPLE_KEY][0]) for ex in ds.as_numpy_iterator())
  return train_data.lookup_examples(cfg, train_data.choose_keys(seen, num_keys, seed), task)


def _check_base_frozen(params: Mapping[str, Any], base: Mapping[str, Any],
                       expert: experts.ExpertConfig) -> None:
  """Every base leaf the expert does not train must equal the base checkpoint's."""
  labels = trees.flatten(t5x_compat.param_labels(params, expert))
  flat = trees.flatten(params)
  flat_base = trees.flatten(base)
  for path, label in labels.items():
    if label == t5x_compat.FROZEN:
      if path not in flat_base or not np.array_equal(flat[path], flat_base[path]):
        raise ValueError(f"base parameter {path!r} of the run differs from --base: the run was not "
                         "trained from this base, or not with t5x_compat.freeze_base.")


def import_t5x_run(run_dir: str, output_dir: str, *, base: Optional[str] = None,
                   task: Optional[str] = None, expert: Optional[experts.ExpertConfig] = None,
                   num_keys: int = 100, key_seed: int = 0, overwrite: bool = False) -> str:
  """Converts a T5X run (its latest checkpoint) into an Expert format v1 directory.

  Args:
    run_dir: the run's MODEL_DIR (with `config.gin`), or a `checkpoint_<step>` inside it.
    output_dir: the expert directory to write.
    base: the base checkpoint the run started from (default: its INITIAL_CHECKPOINT_PATH).
    task: the task it was trained on (default: its MIXTURE_OR_TASK_NAME).
    expert: the expert config (default: read from `config.gin`).
    num_keys: retrieval keys drawn from the task's train split (0: none).
    key_seed: seed of that draw.
    overwrite: replace an existing `output_dir`.

  Returns:
    The expert's content hash.
  """
  import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)  # noqa: F401
  from expert_t5x import train as train_lib  # pylint: disable=g-import-not-at-top
  # orbax reads absolute paths only.
  step_dir = checkpoint_importer._resolve_t5x_step_dir(os.path.abspath(run_dir))  # pylint: disable=protected-access
  model_dir = os.path.dirname(os.path.normpath(step_dir))
  gin_path = os.path.join(model_dir, OPERATIVE_CONFIG)
  gin_text = open(gin_path, encoding="utf-8").read() if os.path.isfile(gin_path) else ""
  if expert is None:
    if not gin_text:
      raise FileNotFoundError(f"{gin_path} not found: is {run_dir} a `t5x.train` MODEL_DIR?")
    expert = t5x_compat.expert_config_from_gin_text(gin_text)
  task = task or _gin_macro(gin_text, "MIXTURE_OR_TASK_NAME")
  base = base or _gin_macro(gin_text, "INITIAL_CHECKPOINT_PATH")
  if not task:
    raise ValueError(f"{run_dir}: no MIXTURE_OR_TASK_NAME in config.gin; pass --task.")
  if not base:
    raise ValueError(f"{run_dir}: no INITIAL_CHECKPOINT_PATH in config.gin; pass --base (the "
                     "checkpoint the run started from).")
  params = checkpoint_importer.load_t5x_checkpoint(step_dir)
  base_params, _, _ = checkpoint_importer.load_params(base)
  _check_base_frozen(params, base_params, expert)
  tree = t5x_compat.expert_from_t5x_params(params, expert, base_params)
  step = int(re.search(r"(\d+)$", os.path.basename(step_dir)).group(1))
  training = {"task": task, "steps": step, "trainer": "t5x.train", "run_dir": model_dir,
              "checkpoint": step_dir, "base_path": base,
              "batch_size": _gin_macro(gin_text, "BATCH_SIZE"),
              "task_feature_lengths": _gin_macro(gin_text, "TASK_FEATURE_LENGTHS"),
              "init_seed": getattr(expert, "init_seed", None), "key_seed": key_seed}
  metadata = expert_format.build_metadata(
      expert.kind, experts.config_to_json(expert),
      base_fingerprint=checkpoint_importer.base_fingerprint(base_params), base_config_name=None,
      vocab_fingerprint=train_lib._vocab_fingerprint(task),  # pylint: disable=protected-access
      provenance=train_lib._provenance(task), training=training)  # pylint: disable=protected-access
  keys = _draw_keys(task, num_keys, key_seed) if num_keys else None
  return expert_format.save_expert(output_dir, tree, metadata, keys, overwrite=overwrite)


def import_main(args: argparse.Namespace) -> str:
  """`expert-t5x import t5x RUN_DIR --output DIR [...]` (called by `importers.import_main`)."""
  return import_t5x_run(args.source, args.output, base=args.base, task=args.task,
                        num_keys=args.num_keys, key_seed=args.key_seed, overwrite=args.overwrite)
