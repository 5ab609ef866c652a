r"""Trains experts (or fully fine-tunes T5) the T5X way: `python -m expert_t5x.train --gin_file=`.

(Over 600 lines on purpose: as T5X's `train.py`, the train loop, its bookkeeping of resumes and
exports, and the gin entry point, read top to bottom as one run.)

    python -m expert_t5x.train \
      --gin_file=experts/prompt_expert.gin \
      --gin.MODEL_DIR="'runs/cosmos_qa_no_prompt_text'" \
      --gin.MIXTURE_OR_TASK_NAME="'cosmos_qa_no_prompt_text'" \
      --gin.INITIAL_CHECKPOINT_PATH="'/ckpts/t5-xl-lm-adapt'"

`train(...)` takes T5X's keyword names and is wrapped for gin only in `__main__`, so gin files
written T5X's way (`import __main__ as train_script`, `train_script.train.model = %MODEL`) work.
A run resumes from the newest checkpoint in `MODEL_DIR` on its own; at the end the expert is
exported in Expert format v1 (with `keys.jsonl`) to `MODEL_DIR/expert` (stacked experts:
`MODEL_DIR/experts/<task>`). Giving `MIXTURE_OR_TASK_NAME` a list of tasks trains that many adapter
or LoRA experts stacked in one program (see `expert_t5x.trainer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from expert_t5x import aggregation
from expert_t5x import base_models
from expert_t5x import checkpoint_importer
from expert_t5x import expert_format
from expert_t5x import experts as experts_lib
from expert_t5x import file_io
from expert_t5x import gin_utils
from expert_t5x import metrics_writer
from expert_t5x import models
from expert_t5x import partitioning
from expert_t5x import checkpoints
from expert_t5x import train_data
from expert_t5x import trainer as trainer_lib
from expert_t5x import trees
from expert_t5x import validation

PyTree = Any


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def task_seed(random_seed: int, task: str) -> int:
  """A per-task seed: a stacked expert and its separate run draw the same dropout masks."""
  digest = hashlib.sha256(f"{random_seed}|{task}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _task_names(cfg: train_data.DatasetConfig) -> list[str]:
  name = cfg.mixture_or_task_name
  return [name] if isinstance(name, str) else list(name)


def _expert_cfgs(cfg: train_data.DatasetConfig) -> list[train_data.DatasetConfig]:
  return [dataclasses.replace(cfg, mixture_or_task_name=n) for n in _task_names(cfg)]


def _check_vocabulary(model: models.EncoderDecoderModel, task_name: str) -> None:
  """The task's vocabulary must fit the model's embedding (and equal the model's, when set)."""
  task = train_data.get_task(task_name)
  vocab = task.output_features["targets"].vocabulary
  if vocab.vocab_size > model.config.vocab_size:
    raise ValueError(f"Vocabulary mismatch: task {task_name!r} has {vocab.vocab_size} tokens but "
                     f"the model's vocab_size is {model.config.vocab_size}; use the base's "
                     "vocabulary (VOCABULARY / seqio_tasks.vocab.VOCABULARY_PATH).")
  if model.output_vocabulary is not None and model.output_vocabulary != vocab:
    if getattr(model.output_vocabulary, "vocab_size", None) != vocab.vocab_size:
      raise ValueError(f"Vocabulary mismatch: task {task_name!r} uses {vocab!r}, the model "
                       f"{model.output_vocabulary!r}; make VOCABULARY the tasks' vocabulary.")


def _load_base(model: models.EncoderDecoderModel, path: Optional[str], seed: int,
               partitioner: partitioning.PjitPartitioner, shapes: dict[str, Any]):
  """(sharded base params, flat logical axes, shardings, fingerprint, vocab path)."""
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
  axes = partitioning.params_logical_axes(abstract)
  shardings = partitioner.sharding_for(partitioning.logical_axes_tree(abstract["params"], axes))
  vocab_path = None
  if path is None:
    init = partitioner.partition(
        lambda rng: model.get_initial_variables(rng, shapes)["params"], in_shardings=None,
        out_shardings=shardings)
    params = init(jax.random.PRNGKey(seed))
  else:
    ckpt = base_models.read_base_checkpoint(path)
    loaded, vocab_path = ckpt.params, ckpt.vocab_path
    want_shapes = {k: tuple(v.shape) for k, v in
                   trees.flatten(abstract["params"]).items()}
    got = {k: tuple(np.shape(v)) for k, v in trees.flatten_params(loaded).items()}
    bad = sorted(k for k in set(want_shapes) | set(got) if want_shapes.get(k) != got.get(k))
    if bad:
      k = bad[0]
      raise ValueError(f"INITIAL_CHECKPOINT_PATH={path!r} does not match the model config: "
                       f"{k} is {got.get(k)} in the checkpoint but {want_shapes.get(k)} in the "
                       f"model ({len(bad)} mismatches); include the model gin of that size.")
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), loaded), shardings)
  fingerprint = (checkpoint_importer.base_fingerprint(path) if path is not None else
                 checkpoint_importer.base_fingerprint(to_host(params)))
  return params, axes, shardings, fingerprint, vocab_path


def to_host(tree: PyTree) -> PyTree:
  """Numpy copies of (possibly sharded, multi-host) arrays; every process gets whole values."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


def _global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in local.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _next_batch(iterators: list, stacked: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
  batches = [next(it) for it in iterators]
  keys = np.stack([b.pop(train_data.EXAMPLE_KEY)[:, 0] for b in batches])
  if not stacked:
    return batches[0], keys
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}, keys


# ----------------------------------------------------------------------------- evaluation


def rank_classification_accuracy(model: models.EncoderDecoderModel, base: PyTree,
                                 expert: Optional[PyTree], task_name: str,
                                 lengths: dict[str, int], split: str = "validation",
                                 max_examples: int = 200, full: bool = False,
                                 partitioner: Optional[partitioning.PjitPartitioner] = None,
                                 batch_size: Optional[int] = None
                                 ) -> Optional[tuple[float, float]]:
  """(accuracy, chance) of rank classification on a task's answer choices, or None when the task
  has no choices. Quick sanity check only; `python -m expert_t5x.eval` is the real evaluator, and
  both score through `expert_t5x.scoring` (same tokens, batches and scores).

  Args:
    model: the trained model (its network config, expert config and base dtype are used).
    base: the frozen base parameters; with `full`, the base before training.
    expert: the expert tree (with `full`: the fine-tuned parameters), or None for the base alone.
    task_name, lengths, split, max_examples: the examples: the first `max_examples` of `split`
      whose target is one of their choices, truncated to `lengths`.
    partitioner: mesh and rules (default: every device data-parallel).
    batch_size: rows per scoring call (default: the data-parallel size times 8).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from expert_t5x import scoring  # pylint: disable=g-import-not-at-top
  task = train_data.get_task(task_name)
  if isinstance(task, seqio.Mixture) or split not in task.splits:
    return None
  ds = task.get_dataset(sequence_length=lengths, split=split, shuffle=False, num_epochs=1)
  if "answer_choices" not in ds.element_spec:
    return None
  examples = []
  for ex in ds.take(max_examples).as_numpy_iterator():
    choices = [c.decode("utf-8") for c in ex["answer_choices"]]
    target = ex["targets_pretokenized"].decode("utf-8").strip()
    stripped = [c.strip() for c in choices]
    if choices and target in stripped:
      examples.append({"inputs": ex["inputs_pretokenized"].decode("utf-8"),
                       "answer_choices": choices, "label_index": stripped.index(target)})
  if not examples:
    return None
  partitioner = partitioner or partitioning.PjitPartitioner()
  params, config = (expert if expert is not None else base, None) if full else (
      base, model.expert_config)
  scorer = scoring.Scorer(model.config, params, partitioner, scoring.ScoringOptions(),
                          base_dtype=model.base_dtype)
  scorer.set_expert(None if full else expert, config)
  encoded, _ = scoring.encode_examples(examples, task.output_features["targets"].vocabulary,
                                       lengths, scoring=True)
  scores = scorer.score_encoded(encoded, batch_size or 8 * partitioner.data_parallel_size)
  predictions = [int(aggregation.predict(scoring.choice_scores(scores[i][0], ex["answer_choices"],
                                                               scorer.options)))
                 for i, ex in enumerate(examples)]
  accuracy = float(np.mean(np.asarray(predictions) == [ex["label_index"] for ex in examples]))
  return accuracy, float(np.mean([1.0 / len(ex["answer_choices"]) for ex in examples]))


# ---------------------------------------------------------------------------------- export


def _provenance(task_name: str) -> list[dict[str, Any]]:
  """One item per task trained on: a mixture lists each of its tasks, so the library's
  contamination guard can exclude a multitask expert from evaluations on any of its datasets.

  A task whose provenance cannot be read (registered outside seqio_tasks) is recorded with
  dataset `expert_format.UNKNOWN_DATASET`, never as None: the zero_shot guard refuses such an
  expert unless unknown provenance is allowed explicitly."""
  names = [task_name]
  with contextlib.suppress(Exception):  # not a registered task or mixture: read as one task
    task = train_data.get_task(task_name)
    if train_data.is_mixture(task):
      names = [t.name for t in task.tasks]
  return [_task_provenance(name) for name in names]


def _task_provenance(name: str) -> dict[str, Any]:
  try:
    import seqio_tasks  # pylint: disable=g-import-not-at-top
    info = seqio_tasks.get_info(name)
  except Exception as e:  # pylint: disable=broad-except  (any failure means: provenance unknown)
    logging.warning(
        "Task %r has no readable provenance (%s: %s); the expert records dataset %r and "
        "the zero_shot guard refuses it unless unknown provenance is allowed "
        "(--allow-unknown-provenance).", name,
        type(e).__name__, e, expert_format.UNKNOWN_DATASET)
    return {"task": name, "dataset": expert_format.UNKNOWN_DATASET, "subset": None, "prompt": None,
            "role": None}
  return {"task": name, "dataset": info.dataset, "subset": info.subset, "prompt": info.prompt,
          "role": info.role}


def _key_steps(cfg: train_data.DatasetConfig, info: Optional[train_data.DataInfo],
               steps: int) -> int:
  """How many of an expert's first `steps` batches its retrieval keys are drawn from: at most one
  epoch's worth (+1 for the batch across the epoch's end), which holds every example it saw."""
  if info is None:
    return steps
  return min(steps, train_data.steps_per_epoch(info.num_examples, cfg.batch_size) + 1)


def _seen_keys(cfg: train_data.DatasetConfig, info: Optional[train_data.DataInfo], steps: int,
               shard: tuple[int, int]) -> list[int]:
  """Example keys of an expert's first `steps` batches, replayed (up to `_key_steps`)."""
  it = train_data.batch_iterator(cfg, shard[0], shard[1], info)
  seen = []
  for _ in range(_key_steps(cfg, info, steps)):
    seen.extend(int(k) for k in next(it)[train_data.EXAMPLE_KEY][:, 0])
  return seen


def _initial_expert(path: str, expert_config: Any, fingerprint: str, fresh: PyTree) -> PyTree:
  """The parameters of the exported expert at `path`, checked against the run's expert kind,
  base and parameter shapes (those of `fresh`, a new init)."""
  params, metadata = expert_format.load_expert(path)
  kind = getattr(expert_config, "kind", None)
  if metadata["type"] != kind:
    raise ValueError(f"init_expert_path '{path}' holds a '{metadata['type']}' expert, but this "
                     f"run trains '{kind}' experts; pass an expert of the same kind.")
  if metadata["base"]["fingerprint"] != fingerprint:
    raise ValueError(f"init_expert_path '{path}' was trained on another base (fingerprint "
                     f"{metadata['base']['fingerprint']}; this run's base is {fingerprint}); "
                     "pass an expert of this base.")
  want = {k: np.shape(v) for k, v in trees.flatten(fresh).items()}
  have = {k: np.shape(v) for k, v in trees.flatten(params).items()}
  if want != have:
    raise ValueError(f"init_expert_path '{path}' has other parameters than this run's "
                     f"{kind} config ({len(have)} vs {len(want)} tensors, or other shapes); "
                     "train with the expert's own config.")
  return jax.tree.map(lambda f, p: np.asarray(p, np.asarray(f).dtype), fresh, params)


KEYS_PROGRESS = "retrieval_keys"


def _key_origin(step: int, tasks: list[str], shard: tuple[int, int], num_keys: int,
                key_seed: int) -> dict[str, Any]:
  """What recorded retrieval keys hold for: the first `step` batches of these experts on this host
  shard, drawn with these settings."""
  return {"step": step, "shard": list(shard), "tasks": list(tasks), "num_keys": num_keys,
          "seed": key_seed}


def _restore_recorders(progress: dict[str, Any], consumed: int, tasks: list[str], cfgs, infos,
                       budgets: list[int], num_keys: int, key_seed: int,
                       shard: tuple[int, int]) -> list[train_data.KeyRecorder]:
  """Per expert, the retrieval keys of its first `consumed` batches: those `progress` saved with
  the checkpoint, else (a checkpoint from before keys were recorded, another host's progress) the
  keys of those batches replayed."""
  saved = progress.get(KEYS_PROGRESS)
  origin = _key_origin(consumed, tasks, shard, num_keys, key_seed)
  if isinstance(saved, dict) and {k: saved.get(k) for k in origin} == origin:
    return [train_data.KeyRecorder(num_keys, key_seed, keys) for keys in saved["keys"]]
  return [train_data.KeyRecorder(num_keys, key_seed, _seen_keys(c, i, min(consumed, b), shard)
                                 if consumed and num_keys > 0 else ())
          for c, i, b in zip(cfgs, infos, budgets)]


# ----------------------------------------------------------------------------------- train


def train(*,
          model: models.EncoderDecoderModel,
          train_dataset_cfg: train_data.DatasetConfig,
          checkpoint_cfg: Optional[checkpoints.CheckpointConfig] = None,
          partitioner: Optional[partitioning.PjitPartitioner] = None,
          trainer_cls: Callable[..., trainer_lib.Trainer] = trainer_lib.Trainer,
          model_dir: str,
          total_steps: Optional[int | Sequence[int]] = None,
          eval_period: Optional[int] = None,
          stats_period: Optional[int] = None,
          random_seed: Optional[int] = 0,
          num_retrieval_keys: int = 100,
          key_seed: int = 0,
          export_dir: Optional[str] = None,
          init_expert_path: Optional[str] = None,
          eval_before_and_after: bool = True,
          summarize_config_fn: Optional[Callable[[], str]] = gin_utils.summarize_gin_config,
          show_progress: bool = True) -> tuple[int, trainer_lib.TrainState]:
  """Trains, checkpoints and exports one expert, or K stacked experts (a list of tasks).

  Args:
    model: `EncoderDecoderModel` with `optimizer_def` and (for experts) `expert_config`.
    train_dataset_cfg: the data; `mixture_or_task_name` may be a list (stacked experts).
    checkpoint_cfg: save period/keep and the base checkpoint (`restore.path`; None: random base).
    partitioner: mesh and rules (default: `PjitPartitioner()`, all devices data-parallel).
    trainer_cls: builds the step; gin binds `learning_rate_fn` and `num_microbatches` on it.
    model_dir: checkpoints, `config.gin`, `base.json`, TensorBoard `train/`, the exported expert.
    total_steps: steps per expert (int or one per task); None: `num_epochs * ceil(n / batch)`.
    eval_period: log a checkpoint-free loss summary every this many steps (None: stats only).
    stats_period: TensorBoard write period (default 1).
    random_seed: dropout and random-base seed (per task: `task_seed(random_seed, task)`).
    num_retrieval_keys: S training instances exported to `keys.jsonl` (0: none): the S distinct
      examples of smallest seeded rank among those the expert trained on (within its first epoch),
      recorded during training and saved with each checkpoint, so a resumed run exports the same.
    key_seed: seed of that draw.
    export_dir: where to export (default `model_dir/expert`, or `model_dir/experts/<task>`).
    init_expert_path: start from this exported expert (same kind and base) instead of a fresh
      init, to fine-tune it further on new data; each stacked expert starts from it.
    eval_before_and_after: print rank-classification accuracy vs chance on the task's validation
      split before and after training (tasks with answer choices).
    summarize_config_fn: returns the config text written to `model_dir/config.gin`.
    show_progress: console progress bar.

  Returns:
    (final step, final train state).
  """
  checkpoint_cfg = checkpoint_cfg or checkpoints.CheckpointConfig()
  save_cfg = checkpoint_cfg.save or checkpoints.SaveCheckpointConfig()
  restore_cfg = checkpoint_cfg.restore or checkpoints.RestoreCheckpointConfig()
  partitioner = partitioner or partitioning.PjitPartitioner()
  random_seed = 0 if random_seed is None else random_seed
  stats_period = stats_period or 1
  _validate_settings(train_dataset_cfg, total_steps, save_cfg, model_dir)
  validation.non_negative_int("NUM_RETRIEVAL_KEYS", num_retrieval_keys,
                              "set --gin.NUM_RETRIEVAL_KEYS=S (0: no keys)")
  os.makedirs(model_dir, exist_ok=True)
  if summarize_config_fn is not None and jax.process_index() == 0:
    file_io.atomic_write_text(os.path.join(model_dir, gin_utils.OPERATIVE_CONFIG),
                              summarize_config_fn())

  tasks = _task_names(train_dataset_cfg)
  stacked = not isinstance(train_dataset_cfg.mixture_or_task_name, str)
  cfgs = _expert_cfgs(train_dataset_cfg)
  lengths = dict(train_dataset_cfg.task_feature_lengths)
  global_batch = train_dataset_cfg.batch_size
  partitioner.get_data_layout(global_batch)
  shard = (jax.process_index(), jax.process_count())
  for name in tasks:
    _check_vocabulary(model, name)

  # Step budgets: explicit, or epochs over the (subsampled) data.
  needs_scan = total_steps is None or train_dataset_cfg.max_examples is not None
  infos = [train_data.scan_task(c) if needs_scan else None for c in cfgs]
  if total_steps is None:
    if not train_dataset_cfg.num_epochs:
      raise ValueError("Set TRAIN_STEPS, or NUM_EPOCHS so the steps follow from the data size.")
    budgets = [train_dataset_cfg.num_epochs *
               train_data.steps_per_epoch(i.num_examples, global_batch) for i in infos]
  else:
    budgets = list(total_steps) if isinstance(total_steps,
                                              (list, tuple)) else [total_steps] * len(tasks)
  if len(budgets) != len(tasks):
    raise ValueError(f"TRAIN_STEPS has {len(budgets)} values for {len(tasks)} tasks.")
  max_steps = max(budgets)

  shapes = {"encoder_input_tokens": (global_batch, lengths["inputs"]),
            "decoder_input_tokens": (global_batch, lengths["targets"])}
  base, base_axes, base_sh, fingerprint, vocab_path = _load_base(
      model, restore_cfg.path, random_seed, partitioner, shapes)
  base = model.cast_base(base)  # EncoderDecoderModel.base_dtype: the frozen base's storage
  if vocab_path:
    _maybe_default_vocabulary(vocab_path)

  expert_config = model.expert_config
  full = expert_config is None or isinstance(expert_config, experts_lib.FullConfig)
  tr = trainer_cls(model=model, partitioner=partitioner,
                   num_experts=len(tasks) if stacked else None)
  host_base = None
  if full:
    initial = base
  else:
    host_base = to_host(base)
    one = experts_lib.init_expert(expert_config, model.config, host_base)
    if init_expert_path is not None:
      one = _initial_expert(init_expert_path, expert_config, fingerprint, one)
    initial = experts_lib.stack_experts([one] * len(tasks)) if stacked else one
  tr.compile(jax.eval_shape(lambda: initial), base_sh, base_axes)

  seeds = np.array([task_seed(random_seed, t) for t in tasks], np.int64)
  seed_keys = trainer_lib.seed_keys(seeds if stacked else seeds[0])
  budget_arr = np.asarray(budgets if stacked else budgets[0], np.int32)

  manager = checkpoints.CheckpointManager(
      model_dir, keep=save_cfg.keep, async_save=save_cfg.async_save,
      fault_hook=checkpoints.FaultHook.from_env())
  if not full:
    checkpoints.check_base_json(model_dir, fingerprint, restore_cfg.path)
    checkpoints.write_base_json(model_dir, restore_cfg.path, fingerprint,
                                      getattr(model.config, "name", None))

  def checkpoint_tree(state, consumed):
    # Host numpy, not a process-local jax.Array: orbax refuses those with several processes.
    return {**state.state_dict(), "rng": np.asarray(seed_keys),
            "data": {"seed": np.asarray(train_dataset_cfg.seed or 0, np.int64),
                     "batches_consumed": np.asarray(consumed, np.int64)}}

  before = None
  progress = _read_progress(model_dir)
  latest, restored = None, None
  if manager.latest_step() is not None:
    abstract = checkpoint_tree(tr.abstract_state, 0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                            if isinstance(x, np.ndarray) else x, abstract)
    rep = partitioner.replicated
    shardings = {**tr.state_sharding.state_dict(), "rng": rep,
                 "data": {"seed": rep, "batches_consumed": rep}}
    latest, restored = manager.restore_newest_intact(
        checkpoints.abstract_with_shardings(abstract, shardings))
  if latest is not None:
    state = tr.abstract_state.restore_state(restored)
    consumed = int(restored["data"]["batches_consumed"])
    print(f"Resuming from {model_dir}/checkpoint_{latest}.", file=sys.stderr, flush=True)
    # What the first run measured before its first step (the loss and the accuracy before
    # training), so a resumed or re-exported expert records the same metadata.
    if progress.get("validation_accuracy_before") is not None:
      before = tuple(progress["validation_accuracy_before"])
  else:
    progress = {}
    state = tr.init_state(initial)
    consumed = 0
    if eval_before_and_after and not stacked and jax.process_count() == 1:
      before = rank_classification_accuracy(model, base, None if full else initial, tasks[0],
                                            lengths, full=full, partitioner=partitioner)
      progress["validation_accuracy_before"] = None if before is None else list(before)

  writer = metrics_writer.MetricsWriter(os.path.join(model_dir, "train"), max_steps,
                                        initial_step=consumed, show_progress=show_progress)
  skip_start = time.perf_counter()
  iterators = [train_data.batch_iterator(c, shard[0], shard[1], info, skip_batches=consumed)
               for c, info in zip(cfgs, infos)]
  if consumed:
    writer.log(f"Data position restored: skipped {consumed} batches per expert in "
               f"{time.perf_counter() - skip_start:.1f}s.")
  batch_sharding = tr.batch_sharding()
  flops = metrics_writer.train_flops_per_example(model.config, lengths,
                                                 full) * global_batch * len(tasks)
  peak = metrics_writer.peak_flops_per_device()
  first_loss = progress.get("first_loss")
  last_loss = progress.get("losses", {}).get(str(consumed))
  resumed_at = consumed if latest is not None else None
  recorders = _restore_recorders(progress, consumed, tasks, cfgs, infos, budgets,
                                 num_retrieval_keys, key_seed, shard)
  # An expert's keys come from its own batches only: those of its first `budgets[k]` steps.
  key_steps = [_key_steps(c, i, b) for c, i, b in zip(cfgs, infos, budgets)]
  step_time = time.perf_counter()

  def save(step):
    manager.save(step, checkpoint_tree(state, step))
    progress.setdefault("losses", {})[str(step)] = last_loss
    progress["first_loss"] = first_loss
    progress[KEYS_PROGRESS] = {**_key_origin(step, tasks, shard, num_retrieval_keys, key_seed),
                               "keys": [r.keys() for r in recorders]}
    _write_progress(model_dir, progress)
  preempted = False

  with checkpoints.PreemptionHandler() as preemption:
    while consumed < max_steps:
      local, keys = _next_batch(iterators, stacked)
      for k, recorder in enumerate(recorders):
        if consumed < key_steps[k]:
          recorder.add(keys[k])
      batch = _global_batch(local, batch_sharding)
      state, metrics = tr.train_step(base, state, batch, seed_keys, budget_arr)
      consumed += 1
      metrics = jax.tree.map(np.asarray, metrics)
      active = metrics["active"] > 0
      loss = np.where(active, metrics["loss"], np.nan)
      if not np.all(np.isfinite(loss[active] if loss.ndim else loss)):
        raise NonFiniteLossError(_non_finite_message(metrics["loss"], consumed, model_dir,
                                                     resumed_at, manager.latest_step(),
                                                     restore_cfg.path))
      last_loss = float(np.nanmean(loss))
      first_loss = last_loss if first_loss is None else first_loss
      now = time.perf_counter()
      dt, step_time = now - step_time, now
      tokens = global_batch * len(tasks) * (lengths["inputs"] + lengths["targets"])
      scalars = {k: metrics[k] for k in ("loss", "accuracy", "learning_rate", "grad_norm",
                                         "z_loss")}
      scalars["tokens_per_second"] = tokens / dt
      if peak:
        scalars["mfu"] = flops / dt / (peak * jax.device_count())
      if consumed % stats_period == 0:
        writer.write_scalars(consumed, scalars)
      writer.progress(1, {"loss": last_loss, "lr": float(np.max(metrics["learning_rate"])),
                          "tok/s": tokens / dt})
      if eval_period and consumed % eval_period == 0:
        writer.log(f"step {consumed}: loss {last_loss:.4f} token accuracy "
                   f"{float(np.mean(metrics['accuracy'])):.3f}")
      if save_cfg.period and consumed % save_cfg.period == 0 and consumed < max_steps:
        save(consumed)
      manager.fault_hook.after_step(consumed, manager.wait)
      if preemption.requested:
        save(consumed)
        preempted = True
        break

  save(consumed)
  manager.close()
  writer.close()
  if preempted:
    logging.warning("Preempted at step %d: checkpoint saved; rerun the same command to resume.",
                    consumed)
    raise SystemExit(143)

  _export(model=model, state=state, tasks=tasks, stacked=stacked, full=full, base=base,
          host_base=host_base, cfgs=cfgs, infos=infos, budgets=budgets, model_dir=model_dir,
          export_dir=export_dir, fingerprint=fingerprint, restore_path=restore_cfg.path,
          retrieval_keys=[r.keys() for r in recorders] if num_retrieval_keys else None, seeds=seeds,
          lengths=lengths, eval_before_and_after=eval_before_and_after, before=before,
          first_loss=first_loss, last_loss=last_loss, partitioner=partitioner)
  return consumed, state


def _validate_settings(data_cfg: train_data.DatasetConfig, total_steps: Any,
                       save_cfg: checkpoints.SaveCheckpointConfig, model_dir: Any) -> None:
  """Gin settings out of range are refused before anything is written."""
  if not isinstance(model_dir, (str, os.PathLike)) or not os.fspath(model_dir):
    raise validation.UsageError(f"MODEL_DIR={model_dir!r} must be a folder path; set "
                                "--gin.MODEL_DIR=\"'runs/NAME'\".")
  validation.output_dir("MODEL_DIR", os.fspath(model_dir))
  for steps in (total_steps if isinstance(total_steps, (list, tuple)) else [total_steps]):
    if steps is not None:
      validation.positive_int("TRAIN_STEPS", steps, "set --gin.TRAIN_STEPS=N (or None with "
                              "NUM_EPOCHS)")
  data_cfg.check()
  save_cfg.check()


PROGRESS_JSON = "train_progress.json"


def _read_progress(model_dir: str) -> dict[str, Any]:
  """`MODEL_DIR/train_progress.json`: the first loss, the accuracy before training and the loss at
  each saved step ({} when absent or damaged: the metrics are then those this run measures)."""
  data = file_io.read_json_or_empty(
      os.path.join(model_dir, PROGRESS_JSON),
      "the resumed expert's first loss is the first one measured now.")
  return data if isinstance(data, dict) and isinstance(data.get("losses", {}), dict) else {}


def _write_progress(model_dir: str, progress: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(model_dir, PROGRESS_JSON)
  file_io.atomic_write_json(path, progress, indent=1, sort_keys=True)


def _non_finite_message(loss: Any, step: int, model_dir: str, resumed_at: Optional[int],
                        latest: Optional[int], base_path: Optional[str]) -> str:
  """Names the likely cause: the restored checkpoint (first step after a resume), the base (first
  step of a fresh run) or the optimisation (later)."""
  where = f"Non-finite loss {loss} at step {step} of {model_dir}"
  if resumed_at is not None and step == resumed_at + 1:
    return (f"{where}, the first step after resuming from checkpoint_{resumed_at}: that checkpoint "
            "restored but trains to NaN; move it out of MODEL_DIR to resume from an older one.")
  if step == 1:
    return (f"{where}, the very first step: the base ({base_path or 'random init'}) or the data "
            "gives NaN before any update; check INITIAL_CHECKPOINT_PATH and the inputs.")
  return (f"{where}; the last good checkpoint (checkpoint_{latest}) is intact. Lower the learning "
          "rate or check the data.")


def _maybe_default_vocabulary(vocab_path: str) -> None:
  """An HF checkpoint's spiece.model becomes the tasks' vocabulary unless one is configured."""
  try:
    from seqio_tasks import vocab  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if not (vocab.VOCABULARY_PATH or os.environ.get(vocab.VOCAB_ENV)):
    vocab.set_vocabulary_path(vocab_path)


def _export(*, model, state, tasks, stacked, full, base, host_base, cfgs, infos, budgets,
            model_dir, export_dir, fingerprint, restore_path, retrieval_keys, seeds,
            lengths, eval_before_and_after, before, first_loss, last_loss,
            partitioner=None) -> list[str]:
  """Writes each expert in Expert format v1 (process 0) and prints a summary."""
  params = to_host(state.params)
  steps = to_host(state.step)
  out_dirs = []
  for k, task in enumerate(tasks):
    expert = jax.tree.map(lambda x: x[k], params) if stacked else params
    if full:
      host_base = host_base if host_base is not None else to_host(base)
      expert = jax.tree.map(lambda p, b: p - b, expert, host_base)
    config = model.expert_config or experts_lib.FullConfig()
    cfg = cfgs[k]
    step_k = int(steps[k]) if stacked else int(steps)
    keys = None
    if retrieval_keys is not None:
      keys = train_data.lookup_examples(cfg, retrieval_keys[k], task)
    training = {
        "task": task, "steps": step_k, "batch_size": cfg.batch_size, "seed": int(seeds[k]),
        "data_seed": cfg.seed, "init_seed": getattr(config, "init_seed", None),
        "examples_seen": step_k * cfg.batch_size,
        "tokens_seen": step_k * cfg.batch_size * (lengths["inputs"] + lengths["targets"]),
        "num_examples": infos[k].num_examples if infos[k] else None,
        "max_examples": cfg.max_examples, "task_feature_lengths": lengths,
        "optimizer": _describe(model.optimizer_def), "base_path": restore_path,
        "loss_normalizing_factor": str(model.loss_normalizing_factor),
        "dropout_rate": model.config.dropout_rate, "base_dtype": model.base_dtype,
    }
    metrics = {"final_loss": last_loss, "first_loss": first_loss}
    after = None
    if eval_before_and_after and not stacked and jax.process_count() == 1:
      after = rank_classification_accuracy(model, base, state.params, task, lengths, full=full,
                                           partitioner=partitioner)
      if after is not None:
        metrics.update(validation_accuracy=after[0], chance=after[1])
        if before is not None:
          metrics["validation_accuracy_before"] = before[0]
    metadata = expert_format.build_metadata(
        config.kind, experts_lib.config_to_json(config), base_fingerprint=fingerprint,
        base_config_name=None, vocab_fingerprint=_vocab_fingerprint(task),
        provenance=_provenance(task), training=training, metrics=metrics)
    directory = export_dir or os.path.join(model_dir, "expert")
    if stacked:
      directory = os.path.join(export_dir or os.path.join(model_dir, "experts"), task)
    if jax.process_index() == 0:
      digest = expert_format.save_expert(directory, expert, metadata, keys, overwrite=True)
      lines = [f"Trained {config.kind} expert on {task}: {step_k} steps"]
      if not stacked and first_loss is not None:  # None: a finished run re-exported on resume.
        lines[0] += f", loss {first_loss:.4f} -> {last_loss:.4f}"
      if after is not None:
        was = f" (before training {before[0]:.3f})" if before is not None else ""
        lines.append(f"  rank-classification accuracy on validation: "
                     f"{after[0]:.3f}{was}, chance {after[1]:.3f}")
      lines.append(f"  exported to {directory} (content hash {digest[:12]}, "
                   f"{len(keys or [])} retrieval keys)")
      print("\n".join(lines), flush=True)
    out_dirs.append(directory)
  return out_dirs


def _describe(optimizer_def: Any) -> dict[str, Any]:
  if dataclasses.is_dataclass(optimizer_def):
    out = {"name": type(optimizer_def).__name__}
    out.update({k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(optimizer_def).items()})
    return out
  return {"name": repr(optimizer_def)}


def _vocab_fingerprint(task_name: str) -> Optional[str]:
  """The task's vocabulary identity; None (the format's "unknown", logged with its reason) when it
  cannot be read."""
  try:
    from expert_t5x import vocab_identity  # pylint: disable=g-import-not-at-top
    task = train_data.get_task(task_name)
    return vocab_identity.fingerprint(task.output_features["targets"].vocabulary)
  except Exception as e:  # pylint: disable=broad-except  (any failure means: identity unknown)
    logging.warning(
        "The vocabulary of task %r has no readable identity (%s: %s); the expert "
        "records base.vocab_fingerprint null (unknown).", task_name,
        type(e).__name__, e)
    return None


# ------------------------------------------------------------------------------ entry point


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  gin_utils.define_flags()
  if "coordinator_address" in flags.FLAGS:
    return
  flags.DEFINE_string("coordinator_address", None, "Multi-host: IP:port of process 0.")
  flags.DEFINE_integer("process_count", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_index", None, "Multi-host: this process's index.")
  flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize() (TPU pods and "
                    "multi-node GPU clusters auto-detect their peers).")
  flags.DEFINE_float("initialization_timeout", 300, "Seconds to wait for the other processes.")


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  del argv
  flags_ = flags.FLAGS
  try:
    if flags_.coordinator_address or flags_.multiprocess:
      jax.distributed.initialize(
          coordinator_address=flags_.coordinator_address, num_processes=flags_.process_count,
          process_id=flags_.process_index,
          initialization_timeout=int(flags_.initialization_timeout))
    gin_utils.parse_gin_flags(flags_.gin_search_paths, flags_.gin_file, flags_.gin_bindings,
                              finalize=not flags_.gin_parse_only)
    train_fn = globals()["train"]  # the gin-configurable wrapper installed in __main__
    if flags_.gin_parse_only:
      model_dir = gin.query_parameter("MODEL_DIR/macro.value") if _has_macro("MODEL_DIR") else None
      if model_dir:
        gin_utils.write_operative_config(model_dir)
      print(f"gin config OK ({len(flags_.gin_file)} file(s)); written to "
            f"{os.path.join(model_dir, gin_utils.OPERATIVE_CONFIG) if model_dir else 'nowhere'}")
      return
    _check_train_bound()
    train_fn()
    if flags_.coordinator_address or flags_.multiprocess:
      jax.distributed.shutdown()  # together, before interpreter teardown
  except (ValueError, OSError, NonFiniteLossError) as e:
    raise SystemExit(validation.report("expert_t5x.train: error", e)) from None


def _check_train_bound() -> None:
  """An empty or unrelated gin file leaves `train`'s required arguments unbound (a TypeError)."""
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  bound = set()
  for (_, selector), params in gin_config._CONFIG.items():  # pylint: disable=protected-access
    if selector.split(".")[-1] == "train":
      bound.update(params)
  missing = [k for k in ("model", "train_dataset_cfg", "model_dir") if k not in bound]
  if missing:
    raise validation.UsageError(
        f"The gin files bind no train.{', train.'.join(missing)}; start from a shipped config "
        "(--gin_file=experts/prompt_expert.gin or include 'runs/finetune.gin').")


def _has_macro(name: str) -> bool:
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  return (name, "gin.macro") in gin_config._CONFIG  # pylint: disable=protected-access


if __name__ == "__main__":
  import gin  # pylint: disable=g-import-not-at-top
  # Gin files written T5X's way bind `__main__.train` (`import __main__ as train_script`).
  train = gin.configurable("train", module="__main__")(train)
  _define_flags()
  gin_utils.run(main)
