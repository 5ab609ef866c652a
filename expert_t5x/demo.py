r"""`expert-t5x demo`: the whole expert pipeline on synthetic tasks with a tiny T5, ending in a
report that tests the paper's claims, each with a verdict and a bootstrap interval.

(Over 600 lines on purpose: every stage of the pipeline, its cost estimates and its report, read
in the order the demo runs them.)

    expert-t5x demo                 # full demo (MiniLM retrieval, fetched once)
    expert-t5x demo --quick         # fewer steps, T5-encoder retrieval
    expert-t5x demo --seed 1        # another seed: the verdicts should not change
    expert-t5x demo --out my_demo   # where the report goes (default: demo_out)

Stages, each calling the project's own Python APIs in one process (so JAX and TensorFlow start
once):

1. pre-train a tiny T5 (d=128) on a synthetic span-corruption corpus that contains no task data
   (`seqio_tasks.demo_pipeline`), cached by a hash of its configuration, so reruns skip it;
2. train 10 prompt experts (adapters, one stacked job; two of them on `flipped_length`, whose
   labels conflict with `length`'s), 5 dataset experts and a multitask adapter
   (`expert_t5x.train.train`); retrieval keys are recorded while they train;
3. build an expert library of the prompt experts (`expert_t5x.library`);
4. Retrieval of Experts for every held-out eval prompt and a uniform merge of the top-k, each
   evaluated by `expert_t5x.routed_evaluation` (what `expert-t5x eval --library LIB --roe` and
   `--merge` run), once per guard: `seen` for held-out prompts of training tasks, `zero_shot` for
   the held-out compositional task (`review_topic`: sentiment x topic);
5. rank-classification evaluation of the base, every expert and the multitask adapter
   (`expert_t5x.evaluation`); dataset-expert RoE and the oracle are read from the evaluated
   predictions of the experts they select;
6. continual learning: experts for two new tasks join the library, the earlier held-out prompts
   are routed again (their scores must not change), the multitask adapter is fine-tuned on the
   new tasks alone (what it forgets), and a multitask adapter is retrained on every prompt (what
   not forgetting costs it);
7. the claims (`expert_t5x.demo_claims`) and the report (`expert_t5x.report`): report.md with
   claims.png, heatmap.png, retrieval.png, methods.png, and results.json with the verdicts.

Deviation from the paper: adapters use reduction factor 4 (d=128 -> 32) instead of 32, which would
leave a 4-wide bottleneck at this size. Numbers are whatever this tiny setup gives; they are not the
paper's results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import platform
import sys
import time
from typing import Any, Mapping, Optional, Sequence

from expert_t5x import demo_claims
from expert_t5x import file_io

SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"  # the claims with their verdicts
RETRIEVAL_FILE = "retrieval.json"
CORPUS_VERSION = 1  # bump when demo_pipeline's corpus changes, so cached bases are rebuilt


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that determines the demo's numbers (recorded in the report)."""
  name: str = "full"
  # The tiny T5 1.1 (gated GELU); the byte vocabulary has 259 ids, padded to 384.
  emb_dim: int = 128
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 256
  num_layers: int = 2
  vocab_size: int = 384
  # Pre-training (full parameters, AdamW, warmup then linear decay).
  pretrain_steps: int = 200
  pretrain_batch_size: int = 32
  pretrain_learning_rate: float = 3e-3
  pretrain_lengths: tuple[int, int] = (96, 40)
  # Experts: adapters (reduction factor 4) + layer norms, AdamW, linear decay.
  reduction_factor: int = 4
  expert_learning_rate: float = 3e-3
  expert_batch_size: int = 8
  # Prompt and dataset experts train stacked in one job with one step budget (a stacked job
  # computes every expert until the longest budget ends); the multitask adapter trains alone.
  expert_steps: int = 400
  multitask_steps: int = 1000
  # The continual stage: new prompt experts, and the multitask adapter fine-tuned on the new
  # tasks alone, each for this many steps. A multitask adapter retrained on every prompt keeps
  # multitask_steps' steps per prompt.
  continual_steps: int = 400
  # Longest demo input: 82 bytes + EOS; longest answer choice: 15 bytes + EOS.
  task_lengths: tuple[int, int] = (88, 16)
  num_keys: int = 32
  # Retrieval and merging.
  embedder: str = "minilm"
  num_queries: int = 32
  merge_top_k: int = 3
  # Evaluation.
  eval_split: str = "validation"
  eval_examples: int = 100       # per held-out eval prompt
  # per training prompt: the experts' own-prompt check and the transfer and forgetting claims
  # (100, not 50: a 64%-accurate expert's interval on 50 examples touched chance, 50%)
  train_eval_examples: int = 100
  bootstrap_samples: int = 1000
  seed: int = 0

  def __post_init__(self):
    if self.embedder not in ("minilm", "t5", "bm25"):
      raise ValueError(f"DemoConfig.embedder must be minilm, t5 or bm25; got {self.embedder!r}.")

  def base_hash(self) -> str:
    """Hash of what determines the pre-trained base (its cache key)."""
    fields = ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_layers", "vocab_size",
              "pretrain_steps", "pretrain_batch_size", "pretrain_learning_rate",
              "pretrain_lengths", "seed")
    blob = json.dumps({f: getattr(self, f) for f in fields} | {"corpus": CORPUS_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


FULL = DemoConfig()
QUICK = DemoConfig(name="quick", pretrain_steps=100, expert_steps=100, multitask_steps=240,
                   continual_steps=100, embedder="t5", eval_examples=32, train_eval_examples=20,
                   bootstrap_samples=200)


def t5_config(cfg: DemoConfig):
  from expert_t5x import network  # pylint: disable=g-import-not-at-top
  return network.get_config(
      "tiny", emb_dim=cfg.emb_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      mlp_dim=cfg.mlp_dim, num_encoder_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers,
      vocab_size=cfg.vocab_size, dropout_rate=0.0)


def default_cache_dir() -> str:
  from seqio_tasks import settings  # pylint: disable=g-import-not-at-top
  return os.path.join(settings.cache_dir(), "demo")


# -------------------------------------------------------------------------------- progress


def _clock(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}:{seconds % 60:02d}"


class StageProgress:
  """Prints each stage with an overall progress bar, elapsed time and an ETA.

  Stage costs are estimated in work units (token-steps); the ETA divides the remaining units by the
  rate measured so far (a prior rate before the first measured stage).
  """

  def __init__(self, costs: Mapping[str, float], enabled: bool = True,
               seconds_per_unit: float = 1e-4, stream: Any = None,
               start: Optional[float] = None):
    self.costs = dict(costs)
    self.total = sum(self.costs.values())
    self.enabled = enabled
    self.rate = seconds_per_unit
    self.stream = stream or sys.stderr
    self.start = time.perf_counter() if start is None else start
    self.done_units = 0.0
    self.timings: dict[str, float] = {}
    self._measured = [0.0, 0.0]  # seconds and units of the stages that ran
    self._stage: Optional[str] = None
    self._stage_start = 0.0

  def eta(self) -> float:
    return (self.total - self.done_units) * self.rate

  def line(self, stage: str, index: int) -> str:
    fraction = self.done_units / self.total if self.total else 1.0
    width = 24
    filled = int(round(width * fraction))
    return (
        f"[demo {index}/{len(self.costs)}] {stage:<28} |{'#' * filled}{'.' * (width - filled)}| "
        f"{100 * fraction:3.0f}%  elapsed {_clock(time.perf_counter() - self.start)}  "
        f"ETA {_clock(self.eta())}")

  def begin(self, stage: str, since: Optional[float] = None) -> None:
    """Starts `stage` (its clock starts at `since` when given, e.g. before the imports)."""
    self._stage, self._stage_start = stage, time.perf_counter() if since is None else since
    if self.enabled:
      print(self.line(stage, list(self.costs).index(stage) + 1), file=self.stream, flush=True)

  def end(self, skipped: bool = False) -> None:
    stage = self._stage
    seconds = time.perf_counter() - self._stage_start
    self.timings[stage] = seconds
    units = self.costs[stage]
    self.done_units += units
    if not skipped:  # a cached stage says nothing about the machine's speed
      self._measured[0] += seconds
      self._measured[1] += units
      if self._measured[0] > 1.0:
        self.rate = self._measured[0] / self._measured[1]

  def finish(self) -> None:
    if self.enabled:
      print(f"[demo] done in {_clock(time.perf_counter() - self.start)}", file=self.stream,
            flush=True)


def stage_costs(cfg: DemoConfig, num_prompt_experts: int, num_dataset_experts: int,
                num_eval_prompts: int, num_heldout: int) -> dict[str, float]:
  """Work units per stage: tokens x steps for training, tokens x rows for evaluation."""
  li, lt = cfg.task_lengths
  row = li + lt
  pre = cfg.pretrain_steps * cfg.pretrain_batch_size * sum(cfg.pretrain_lengths)
  # Calibrated on 2 CPU cores: a frozen-base expert row costs about a full-parameter row (the
  # export's key replay makes up for the missing weight gradients), and one expert alone
  # under-fills even a CPU, so it counts twice; a scored row costs half a training row.
  stacked = num_prompt_experts + num_dataset_experts
  experts = stacked * cfg.expert_steps * cfg.expert_batch_size * row
  multitask = 2 * cfg.multitask_steps * cfg.expert_batch_size * row
  entries = 1 + num_prompt_experts + num_dataset_experts + 1
  num_train = num_eval_prompts - num_heldout
  ev = (entries * num_heldout * cfg.eval_examples +
        entries * num_train * cfg.train_eval_examples) * row / 2.0
  routed = num_heldout * cfg.eval_examples * row / 2.0  # each routed run scores every prompt once
  # Two new experts stacked (under-filled: counted twice), the multitask fine-tune and retrain
  # (alone: twice each), one more routed run and 6 entries on the training prompts.
  steps = (2 * 2 + 2) * cfg.continual_steps + 2 * retrain_steps(cfg, num_train, 2)
  continual = steps * cfg.expert_batch_size * row + (
      routed / 2.0 + 6 * num_train * cfg.train_eval_examples * row / 2.0)
  # Fixed stages in the same units (about 1e-4 s each on 2 CPU cores): start-up ~10 s, MiniLM
  # retrieval ~10 s, report ~2 s. Retrieval and merging include their routed evaluations.
  return {"setup": 1e5, "pre-train base": pre, "prompt + dataset experts": experts,
          "multitask adapter": multitask, "library": 1e3,
          "retrieval": 1e5 + routed, "merging": 1e3 + routed,
          "evaluation": ev, "continual": continual, "report": 2e4}


# ------------------------------------------------------------------------------- stages


def _train_fn():
  from expert_t5x import train  # pylint: disable=g-import-not-at-top
  return train.train


def _trainer_cls(learning_rate: float, warmup_steps: int):
  from expert_t5x import optimizers, trainer  # pylint: disable=g-import-not-at-top
  schedule = optimizers.create_learning_rate_scheduler(
      factors="constant * linear_warmup * linear_decay", base_learning_rate=learning_rate,
      warmup_steps=warmup_steps, min_learning_rate=0.0)
  return functools.partial(trainer.Trainer, learning_rate_fn=schedule)


def _model(cfg: DemoConfig, expert: bool):
  from expert_t5x import experts, models, network, optimizers  # pylint: disable=g-import-not-at-top
  return models.EncoderDecoderModel(
      network.Transformer(t5_config(cfg)),
      optimizer_def=optimizers.AdamW(global_norm_clip_threshold=1.0),
      loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
      expert_config=experts.AdapterConfig(reduction_factor=cfg.reduction_factor,
                                          init_seed=cfg.seed) if expert else None)


def _checkpoint_cfg(base_dir: Optional[str]):
  from expert_t5x import checkpoints as tc  # pylint: disable=g-import-not-at-top
  return tc.CheckpointConfig(save=tc.SaveCheckpointConfig(period=None, keep=1),
                             restore=tc.RestoreCheckpointConfig(path=base_dir))


def pretrain_base(cfg: DemoConfig, cache_dir: str, show_progress: bool = True) -> tuple[str, bool]:
  """(HF-format base directory, whether it came from the cache)."""
  from expert_t5x import checkpoint_importer, train_data
  from seqio_tasks import demo_pipeline  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  base_dir = os.path.join(cache_dir, "bases", cfg.base_hash())
  if os.path.isfile(os.path.join(base_dir, "config.json")):
    return base_dir, True
  run_dir = os.path.join(cache_dir, "runs", cfg.base_hash())
  li, lt = cfg.pretrain_lengths
  data = train_data.DatasetConfig(demo_pipeline.CORPUS_TASK, {"inputs": li, "targets": lt},
                                  batch_size=cfg.pretrain_batch_size, seed=cfg.seed)
  _, state = _train_fn()(
      model=_model(cfg, expert=False), train_dataset_cfg=data, model_dir=run_dir,
      total_steps=cfg.pretrain_steps, random_seed=cfg.seed,
      trainer_cls=_trainer_cls(cfg.pretrain_learning_rate, max(1, cfg.pretrain_steps // 10)),
      checkpoint_cfg=_checkpoint_cfg(None), num_retrieval_keys=0, eval_before_and_after=False,
      summarize_config_fn=None, export_dir=os.path.join(run_dir, "delta"),
      show_progress=show_progress)
  params = jax.tree.map(np.asarray, state.params)
  checkpoint_importer.export_hf_t5(params, t5_config(cfg), base_dir, overwrite=True)
  return base_dir, False


def _train_stacked(cfg: DemoConfig, base_dir: str, tasks: Sequence[str], steps: Sequence[int],
                   model_dir: str, show_progress: bool,
                   init_expert_path: Optional[str] = None) -> dict[str, str]:
  """Trains adapters on `tasks` in one stacked job (from `init_expert_path` when given); {task:
  exported expert dir}. Skips done work."""
  from expert_t5x import expert_format, train_data  # pylint: disable=g-import-not-at-top
  out = {t: os.path.join(model_dir, "experts", t) for t in tasks}
  if all(expert_format.is_expert_dir(d) for d in out.values()):
    return out
  li, lt = cfg.task_lengths
  data = train_data.DatasetConfig(list(tasks), {"inputs": li, "targets": lt},
                                  batch_size=cfg.expert_batch_size, seed=cfg.seed)
  _train_fn()(
      model=_model(cfg, expert=True), train_dataset_cfg=data, model_dir=model_dir,
      total_steps=list(steps), random_seed=cfg.seed,
      trainer_cls=_trainer_cls(cfg.expert_learning_rate, max(1, min(steps) // 20)),
      # A mixture's adapter (multitask) never joins the library: it needs no retrieval keys.
      checkpoint_cfg=_checkpoint_cfg(base_dir),
      num_retrieval_keys=0 if _is_mixture(tasks) else cfg.num_keys,
      key_seed=cfg.seed, eval_before_and_after=False, summarize_config_fn=None,
      show_progress=show_progress, init_expert_path=init_expert_path)
  return out


def _is_mixture(tasks: Sequence[str]) -> bool:
  from seqio_tasks import demo_pipeline  # pylint: disable=g-import-not-at-top
  return any(t in demo_pipeline.MIXTURES for t in tasks)


def retrain_steps(cfg: DemoConfig, num_earlier: int, num_new: int) -> int:
  """Steps of a multitask adapter retrained on every prompt: the same steps per prompt as the
  first one's."""
  return round(cfg.multitask_steps * (num_earlier + num_new) / max(1, num_earlier))


def build_library(root: str, expert_dirs: Mapping[str, str], fingerprint: str):
  """A library holding `expert_dirs` ({id: dir}); existing entries are kept."""
  from expert_t5x import library  # pylint: disable=g-import-not-at-top
  lib = library.Library.init(root, base_fingerprint=fingerprint, exist_ok=True)
  have = set(lib.ids())
  for expert_id, path in expert_dirs.items():
    if library.sanitize_id(expert_id) not in have:
      lib.add(path, name=expert_id)
  return lib


def _fetch_minilm() -> str:
  from seqio_tasks import fetch  # pylint: disable=g-import-not-at-top
  print("[demo] fetching all-MiniLM-L6-v2 (once; `expert-t5x data fetch minilm`)", file=sys.stderr)
  return fetch.fetch_minilm(log=lambda m: print(m, file=sys.stderr))


def make_embedder(cfg: DemoConfig, base_dir: str):
  """The retrieval embedder: MiniLM (fetched once), the base's T5 encoder (byte vocabulary, the
  demo's input length), or BM25."""
  from expert_t5x import retrieval  # pylint: disable=g-import-not-at-top
  if cfg.embedder != "t5":
    return retrieval.make_embedder(cfg.embedder, fetch_minilm=_fetch_minilm)
  from seqio_tasks import vocab  # pylint: disable=g-import-not-at-top
  return retrieval.make_embedder("t5", base_path=base_dir, vocabulary=vocab.DEMO_VOCABULARY,
                                 max_seq_length=cfg.task_lengths[0])


def eval_prompts() -> list[dict[str, Any]]:
  """The held-out eval prompts with their group and guard mode."""
  import seqio_tasks  # pylint: disable=g-import-not-at-top
  from seqio_tasks import demo_pipeline  # pylint: disable=g-import-not-at-top
  out = []
  for task in demo_pipeline.heldout_tasks():
    info = seqio_tasks.get_info(task)
    base, _ = seqio_tasks.demo.resolve(task)
    seen = not base.heldout_task
    out.append({"task": task, "dataset": info.eval_dataset or info.dataset, "prompt": info.prompt,
                "group": "seen_task" if seen else "heldout_task",
                "guard": "seen" if seen else "zero_shot", "chance": 1.0 / len(base.choices)})
  return out


ROUTED_DIR = "routed"  # one routed evaluation per (mode, group) under it


def routed_config(cfg: DemoConfig, mode: str, library: str, guard: str):
  """The `expert-t5x eval --library LIB --roe|--merge` settings the demo routes with."""
  from expert_t5x import routed_evaluation  # pylint: disable=g-import-not-at-top
  lengths = {"max_seq_length": cfg.task_lengths[0]} if cfg.embedder == "t5" else {}
  return routed_evaluation.RoEConfig(
      mode=mode, library=library, embedder=cfg.embedder, num_queries=cfg.num_queries,
      seed=cfg.seed, guard=guard, merge_method="uniform", merge_top_k=(cfg.merge_top_k,),
      **lengths)


def route_group(cfg: DemoConfig, lib, base, embedder, tasks: Sequence[str], guard: str,
                mode: str, out_dir: str, scorer, show_progress: bool) -> str:
  """Routed evaluation (`routed_evaluation.evaluate`, what `eval --roe` / `--merge` runs) of
  `tasks` under one guard, into `out_dir`; returns `out_dir`."""
  from expert_t5x import routed_evaluation  # pylint: disable=g-import-not-at-top
  routed_evaluation.evaluate(
      tasks=list(tasks), output_dir=out_dir, base=base,
      config=routed_config(cfg, mode, lib.root, guard), embedder=embedder,
      split=cfg.eval_split, max_examples=cfg.eval_examples,
      feature_lengths={"inputs": cfg.task_lengths[0], "targets": cfg.task_lengths[1]},
      bootstrap_samples=cfg.bootstrap_samples, seed=cfg.seed, progress=show_progress,
      scorer=scorer)
  return out_dir


def route_all(cfg: DemoConfig, lib, base, embedder, prompts: Sequence[Mapping[str, Any]],
              mode: str, out_dir: str, scorer, show_progress: bool) -> dict[str, str]:
  """Routed evaluation of every eval prompt: one run per guard (seen-task prompts 'seen',
  held-out tasks 'zero_shot'), each into `<out_dir>/routed/<mode>_<group>`; returns {group: its
  directory}."""
  dirs = {}
  for group in ("seen_task", "heldout_task"):
    tasks = [p["task"] for p in prompts if p["group"] == group]
    if not tasks:
      continue
    guard = next(p["guard"] for p in prompts if p["group"] == group)
    dirs[group] = route_group(cfg, lib, base, embedder, tasks, guard, mode,
                              os.path.join(out_dir, ROUTED_DIR, f"{mode}_{group}"), scorer,
                              show_progress)
  return dirs


def read_retrieved(dirs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
  """{task: retrieval result} from routed evaluations' retrieval.json files."""
  from expert_t5x import routed_evaluation  # pylint: disable=g-import-not-at-top
  out = {}
  for d in dirs.values():
    with open(os.path.join(d, routed_evaluation.RETRIEVAL_FILE), encoding="utf-8") as f:
      for r in json.load(f)["results"]:
        out[r.pop("task")] = r
  return out


def read_merged(dirs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
  """{task: {id, dir, inputs}} of the merges routed evaluations made."""
  from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
  from expert_t5x import routed_evaluation  # pylint: disable=g-import-not-at-top
  out = {}
  for d in dirs.values():
    routing = results_lib.read_results(os.path.join(d, results_lib.RESULTS_FILE))["routing"]
    for task, r in routing["tasks"].items():
      m = r["merge"]
      out[task] = {"id": m["id"], "dir": os.path.join(d, routed_evaluation.MERGED_DIR, m["id"]),
                   "inputs": m["inputs"]}
  return out


def routed_prompt_results(out_dir: str, mode: str) -> dict[str, dict[str, Any]]:
  """{task: the routed entry's per-prompt result} of the demo's routed evaluations of `mode`."""
  from expert_t5x import results as results_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for group in ("seen_task", "heldout_task"):
    path = os.path.join(out_dir, ROUTED_DIR, f"{mode}_{group}", results_lib.RESULTS_FILE)
    if os.path.isfile(path):
      entry = next(e for e in results_lib.read_results(path)["entries"] if e["id"] == mode)
      out.update({p["task"]: p for p in entry["prompts"]})
  return out


def evaluate_all(cfg: DemoConfig, base, experts: Mapping[str, str], heldout: Sequence[str],
                 train_eval: Sequence[str], out_dir: str, scorer, show_progress: bool
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(held-out results, training-prompt results) of the evaluator, written under `out_dir`.

  Held-out prompts: the base and every expert in one stacked pass (the oracle's and the matrix's
  cells). Training prompts: the base and the experts on fewer examples, for the experts'
  own-prompt check.
  """
  from expert_t5x import evaluation  # pylint: disable=g-import-not-at-top
  ids, paths = list(experts), list(experts.values())
  common = dict(base=base, split=cfg.eval_split, bootstrap_samples=cfg.bootstrap_samples,
                feature_lengths={"inputs": cfg.task_lengths[0], "targets": cfg.task_lengths[1]},
                seed=cfg.seed, progress=show_progress, include_base=True, scorer=scorer)
  results = evaluation.evaluate(
      tasks=list(heldout), output_dir=os.path.join(out_dir, "eval"), expert_paths=paths,
      expert_names=ids, max_examples=cfg.eval_examples, experts_per_pass=len(ids), **common)
  train_results = evaluation.evaluate(
      tasks=list(train_eval), output_dir=os.path.join(out_dir, "eval_train"), expert_paths=paths,
      expert_names=ids, max_examples=cfg.train_eval_examples, experts_per_pass=len(ids), **common)
  return results, train_results


CONTINUAL_ID = "multitask_continued"
RETRAINED_ID = "multitask_retrained"
CONTINUAL_ROUTED = "roe_seen_task_continual"


def continual_stage(cfg: DemoConfig, base_dir: str, base, lib, embedder,
                    prompts: Sequence[Mapping[str, Any]], mt_dir: str, train_eval: Sequence[str],
                    out_dir: str, scorer, show_progress: bool) -> dict[str, Any]:
  """After the library is built: trains prompt experts for the new tasks and adds them, routes
  the earlier held-out prompts again with the enlarged library, fine-tunes the multitask adapter
  on the new tasks alone, retrains a multitask adapter on every prompt from scratch (timed, as the
  cost of a multitask model that does not forget), and evaluates them all on the earlier and the
  new training prompts."""
  from expert_t5x import evaluation  # pylint: disable=g-import-not-at-top
  from seqio_tasks import demo_pipeline  # pylint: disable=g-import-not-at-top
  new = demo_pipeline.continual_tasks()
  start = time.perf_counter()
  new_dirs = _train_stacked(cfg, base_dir, new, [cfg.continual_steps] * len(new),
                            os.path.join(out_dir, "experts", "continual"), show_progress)
  build_library(lib.root, new_dirs, base.fingerprint)
  seconds = {"new experts": time.perf_counter() - start}
  start = time.perf_counter()
  mixture = demo_pipeline.CONTINUAL_MIXTURE
  mtc_dir = _train_stacked(cfg, base_dir, [mixture], [cfg.continual_steps],
                           os.path.join(out_dir, "experts", CONTINUAL_ID), show_progress,
                           init_expert_path=mt_dir)[mixture]
  seconds["multitask fine-tune"] = time.perf_counter() - start
  start = time.perf_counter()
  everything = demo_pipeline.ALL_MIXTURE
  mtr_dir = _train_stacked(
      cfg, base_dir, [everything], [retrain_steps(cfg, len(train_eval), len(new))],
      os.path.join(out_dir, "experts", RETRAINED_ID), show_progress)[everything]
  seconds["multitask retrained on all prompts"] = time.perf_counter() - start
  seen = [p["task"] for p in prompts if p["group"] == "seen_task"]
  after = route_group(cfg, lib, base, embedder, seen, "seen", "roe",
                      os.path.join(out_dir, ROUTED_DIR, CONTINUAL_ROUTED), scorer, show_progress)
  ids = list(new) + ["multitask", CONTINUAL_ID, RETRAINED_ID]
  evaluation.evaluate(
      tasks=list(train_eval) + [t + "_score_eval" for t in new],
      output_dir=os.path.join(out_dir, "eval_continual"),
      expert_paths=[new_dirs[t] for t in new] + [mt_dir, mtc_dir, mtr_dir], expert_names=ids,
      max_examples=cfg.train_eval_examples, experts_per_pass=len(ids), base=base,
      split=cfg.eval_split, bootstrap_samples=cfg.bootstrap_samples,
      feature_lengths={"inputs": cfg.task_lengths[0], "targets": cfg.task_lengths[1]},
      seed=cfg.seed, progress=show_progress, include_base=True, scorer=scorer)
  return {"new_tasks": list(new), "routed_after": after, "seconds": seconds}


def routed_records(routed_dir: str, mode: str) -> list[dict[str, Any]]:
  """The prediction records of a routed evaluation's `mode` entry ('roe' or 'merge')."""
  from expert_t5x import results  # pylint: disable=g-import-not-at-top
  return [r for r in results.read_jsonl(os.path.join(routed_dir, results.PREDICTIONS_FILE))
          if r.get("entry") == mode]


# ------------------------------------------------------------------------------ methods


def read_outcomes(eval_dir: str, routed: Optional[str] = None):
  """{(entry id, task): PromptOutcomes} from an evaluation's predictions.jsonl; with `routed`,
  {task: PromptOutcomes} of that routed entry ('roe' or 'merge')."""
  from expert_t5x import eval_experts, evaluation, results  # pylint: disable=g-import-not-at-top
  from expert_t5x import scoring as scoring_lib  # pylint: disable=g-import-not-at-top
  records: dict[Any, list[dict]] = {}
  for r in results.read_jsonl(os.path.join(eval_dir, results.PREDICTIONS_FILE)):
    if routed is not None:
      if r.get("entry") == routed:
        records.setdefault(r["task"], []).append(r)
      continue
    entry = (r["expert_ids"] or [eval_experts.BASE_ID])[0]
    records.setdefault((entry, r["task"]), []).append(r)
  options = scoring_lib.ScoringOptions()
  return {key: evaluation.outcomes_from_records(rs, options)[0] for key, rs in records.items()}


def compose_methods(cfg: DemoConfig, prompts: Sequence[Mapping[str, Any]],
                    selections: Mapping[str, Mapping[str, tuple[str, list[str]]]],
                    outcomes: Mapping[tuple[str, str], Any],
                    routed: Optional[Mapping[str, Mapping[str, Any]]] = None
                    ) -> list[dict[str, Any]]:
  """Aggregates and bootstraps each method from the outcomes of the entry it selects per prompt.

  Args:
    selections: {method: {eval task: (entry id, expert ids it stands for)}}.
    outcomes: {(entry id, task): PromptOutcomes}.
    routed: {method: {eval task: PromptOutcomes}}: methods evaluated by a routed evaluation,
      whose outcomes are its own rather than `outcomes`' entry's.
  """
  routed = routed or {}
  from expert_t5x import aggregation  # pylint: disable=g-import-not-at-top
  methods = []
  for group in ("seen_task", "heldout_task"):
    tasks = [p["task"] for p in prompts if p["group"] == group]
    if not tasks:
      continue
    entries = {}
    for name, chosen in selections.items():
      picked = []
      for t in tasks:
        entry, _ = chosen[t]
        o = routed[name][t] if name in routed else outcomes[(entry, t)]
        picked.append(dataclasses.replace(o))
      entries[name] = picked
    intervals = (aggregation.bootstrap(entries, cfg.bootstrap_samples, cfg.seed)
                 if cfg.bootstrap_samples else {})
    for name, picked in entries.items():
      summary = aggregation.aggregate(picked)
      methods.append({
          "name": name, "group": group, "mean": summary["mean"], "median": summary["median"],
          "ci": intervals.get(name, {}).get("mean"), "num_prompts": len(picked),
          "prompts": {o.task: {"accuracy": o.accuracy, "num_examples": int(o.correct.size),
                               "entry": selections[name][o.task][0],
                               "experts": selections[name][o.task][1]} for o in picked}})
  return methods


# ------------------------------------------------------------------------------ pipeline


def _machine() -> str:
  cores = os.cpu_count()
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    pass
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  import jax  # pylint: disable=g-import-not-at-top
  return (f"{cpu}, {cores} cores usable, {platform.system()} {platform.release()}, Python "
          f"{platform.python_version()}, jax {jax.__version__} on {jax.default_backend()}")


def _setup_sentences(cfg: DemoConfig, num_pe: int, num_de: int) -> list[str]:
  return [
      f"A tiny T5 (d={cfg.emb_dim}, {cfg.num_layers}+{cfg.num_layers} layers, byte vocabulary) "
      f"was pre-trained for {cfg.pretrain_steps} steps on a synthetic span-corruption corpus "
      f"without any task data, then {num_pe} prompt experts, {num_de} dataset experts and one "
      f"multitask adapter (reduction factor {cfg.reduction_factor}; "
      f"{cfg.expert_steps} steps, multitask {cfg.multitask_steps}, of "
      f"batch {cfg.expert_batch_size}) were trained on synthetic keyword, negation, length and "
      "flipped-length tasks (length's inputs with the opposite labels); two more tasks "
      f"were added later ({cfg.continual_steps} steps), and a multitask adapter was retrained "
      "on every prompt for comparison.",
      f"Held-out prompts of those tasks and a held-out task that combines two of them were "
      f"answered by rank "
      f"classification ({cfg.eval_examples} validation examples each; {cfg.train_eval_examples} "
      f"for the training prompts) with experts retrieved "
      f"from {cfg.num_queries} unlabeled queries ({cfg.embedder} embedder), a uniform merge of "
      f"the top {cfg.merge_top_k}, and the baselines.",
  ]


def run_demo(cfg: DemoConfig, out_dir: str, cache_dir: Optional[str] = None,
             show_progress: bool = True) -> dict[str, Any]:
  """Runs every stage into `out_dir`; returns the summary (also written as summary.json)."""
  start = time.perf_counter()
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  if show_progress:
    print(f"[demo] {cfg.name} demo into {out_dir}; starting TensorFlow and JAX ...",
          file=sys.stderr, flush=True)
  # Importing the task registry starts TensorFlow and seqio: part of the setup stage.
  from seqio_tasks import demo_pipeline  # pylint: disable=g-import-not-at-top
  from seqio_tasks import demo as demo_source  # pylint: disable=g-import-not-at-top
  pe_tasks = demo_pipeline.expert_train_tasks()
  de_tasks = demo_pipeline.dataset_tasks()
  heldout = demo_source.heldout_tasks()
  train_eval = [t + "_score_eval" for t in pe_tasks]
  progress = StageProgress(stage_costs(cfg, len(pe_tasks), len(de_tasks),
                                       len(train_eval) + len(heldout), len(heldout)),
                           enabled=show_progress, start=start)

  progress.begin("setup", since=start)
  # Imported here so that their cost is the setup stage's (some are used by later stages only).
  import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  # pylint: disable-next=g-import-not-at-top,unused-import
  from expert_t5x import base_models, evaluation, partitioning, report, scoring, train  # noqa: F401
  demo_pipeline.register()
  prompts = eval_prompts()
  cache_dir = cache_dir or default_cache_dir()
  progress.end()

  progress.begin("pre-train base")
  base_dir, cached = pretrain_base(cfg, cache_dir, show_progress)
  progress.end(skipped=cached)
  base = base_models.load_base(base_dir)

  progress.begin("prompt + dataset experts")
  stacked = list(pe_tasks) + list(de_tasks)
  expert_dirs = _train_stacked(cfg, base_dir, stacked, [cfg.expert_steps] * len(stacked),
                               os.path.join(out_dir, "experts", "stacked"), show_progress)
  progress.end()
  pe_dirs = {t: expert_dirs[t] for t in pe_tasks}
  de_dirs = {t: expert_dirs[t] for t in de_tasks}

  progress.begin("multitask adapter")
  mt_id = "multitask"
  mt_dir = _train_stacked(cfg, base_dir, [demo_pipeline.MULTITASK_MIXTURE], [cfg.multitask_steps],
                          os.path.join(out_dir, "experts", "multitask"),
                          show_progress)[demo_pipeline.MULTITASK_MIXTURE]
  progress.end()

  progress.begin("library")
  lib = build_library(os.path.join(out_dir, "library"), pe_dirs, base.fingerprint)
  progress.end()

  # One scorer for every evaluation: its compiled functions are reused (compiles are the cost).
  scorer = scoring.Scorer(base.config, base.params, partitioning.PjitPartitioner(),
                          scoring.ScoringOptions())
  embedder = make_embedder(cfg, base_dir)
  progress.begin("retrieval")
  roe_dirs = route_all(cfg, lib, base, embedder, prompts, "roe", out_dir, scorer, show_progress)
  retrieved = read_retrieved(roe_dirs)
  file_io.atomic_write_json(os.path.join(out_dir, RETRIEVAL_FILE), retrieved, indent=1, default=str)
  progress.end()

  progress.begin("merging")
  merge_dirs = route_all(cfg, lib, base, embedder, prompts, "merge", out_dir, scorer,
                         show_progress)
  merged = read_merged(merge_dirs)
  progress.end()

  progress.begin("evaluation")
  experts = {**pe_dirs, **de_dirs, mt_id: mt_dir}
  results, train_results = evaluate_all(cfg, base, experts, heldout, train_eval, out_dir, scorer,
                                        show_progress)
  progress.end()

  progress.begin("continual")
  continual = continual_stage(cfg, base_dir, base, lib, embedder, prompts, mt_dir, train_eval,
                              out_dir, scorer, show_progress)
  progress.end()

  progress.begin("report")
  outcomes = dict(read_outcomes(os.path.join(out_dir, "eval")))
  routed = {mode: {t: o for d in dirs.values() for t, o in read_outcomes(d, mode).items()}
            for mode, dirs in (("roe", roe_dirs), ("merge", merge_dirs))}
  continual["outcomes"] = read_outcomes(os.path.join(out_dir, "eval_continual"))
  continual["unchanged"] = demo_claims.records_unchanged(
      routed_records(roe_dirs["seen_task"], "roe"),
      routed_records(continual["routed_after"], "roe"))
  summary = summarize(cfg, prompts=prompts, results=[results, train_results], outcomes=outcomes,
                      retrieved=retrieved, merged=merged, pe_tasks=pe_tasks, de_tasks=de_tasks,
                      mt_id=mt_id, timings=progress.timings, base_cached=cached, routed=routed,
                      train_outcomes=read_outcomes(os.path.join(out_dir, "eval_train")),
                      continual=continual)
  _write_summary(summary, out_dir)
  progress.end()
  # The report stage's own time is known only now: rewrite both with it.
  summary["timings"] = dict(progress.timings)
  _write_summary(summary, out_dir)
  progress.finish()
  return summary


def _write_summary(summary: Mapping[str, Any], out_dir: str) -> None:
  """summary.json, results.json (the claims and their verdicts) and the report."""
  from expert_t5x import report  # pylint: disable=g-import-not-at-top
  file_io.atomic_write_json(os.path.join(out_dir, SUMMARY_FILE), summary, indent=1)
  file_io.atomic_write_json(os.path.join(out_dir, RESULTS_FILE),
                            {"claims": summary["claims"], "config": summary["setup"]["config"]},
                            indent=1)
  report.write_report(summary, out_dir)


def _task_dataset(task: str) -> str:
  """The demo dataset a prompt task or a `_all_prompts` task belongs to."""
  from seqio_tasks import demo_pipeline  # pylint: disable=g-import-not-at-top
  from seqio_tasks import demo  # pylint: disable=g-import-not-at-top
  if task.endswith(demo_pipeline.ALL_PROMPTS_SUFFIX):
    return task[:-len(demo_pipeline.ALL_PROMPTS_SUFFIX)]
  return demo.PREFIX + demo.resolve(task)[0].name


def summarize(cfg: DemoConfig, *, prompts, results, outcomes, retrieved, merged, pe_tasks,
              de_tasks, mt_id, timings, base_cached, routed=None, train_outcomes=None,
              continual=None) -> dict[str, Any]:
  """The summary the report is drawn from (see `expert_t5x.report`).

  `routed` ({'roe' | 'merge': {task: PromptOutcomes}}) holds the routed evaluations' outcomes of
  the RoE and merged methods (otherwise read from the stacked evaluation's entries);
  `train_outcomes` ({(entry, task): PromptOutcomes} of the training prompts) and `continual`
  (what `continual_stage` returned, with its `outcomes` and `unchanged` records) feed the
  claims."""
  from seqio_tasks import demo_pipeline  # pylint: disable=g-import-not-at-top
  from seqio_tasks import demo  # pylint: disable=g-import-not-at-top
  by_entry: dict[str, dict[str, Any]] = {}
  for r in results:
    for e in r["entries"]:
      by_entry.setdefault(e["id"], {}).update({p["task"]: p for p in e["prompts"]})
  prompt_ds = {p["task"]: p["dataset"] for p in prompts}
  columns = [t + "_score_eval" for t in pe_tasks] + [p["task"] for p in prompts]
  rows = ["base"] + list(pe_tasks) + list(de_tasks) + [mt_id]
  dataset_of = {t: _task_dataset(t) for t in list(pe_tasks) + list(de_tasks)}
  own = {t: [t + "_score_eval"] for t in pe_tasks}
  own.update({d: [m + "_score_eval" for m in members] for d, members in de_tasks.items()})
  own[mt_id] = [t + "_score_eval" for t in pe_tasks]
  own["base"] = []

  experts = []
  for row in rows:
    cells = [by_entry[row][t] for t in own[row]]
    chance = [1.0 / len(demo.resolve(t)[0].choices) for t in own[row]]
    experts.append({
        "id": row, "kind": {"base": "base", mt_id: "multitask"}.get(
            row, "prompt" if row in pe_tasks else "dataset"),
        "dataset": dataset_of.get(row), "own_prompts": own[row],
        "own_accuracy": (sum(c["accuracy"] for c in cells) / len(cells)) if cells else None,
        "own_ci": cells[0].get("ci") if len(cells) == 1 else None,
        "chance": (sum(chance) / len(chance)) if chance else None})
  matrix = {"rows": rows, "columns": columns,
            "accuracy": [[by_entry[r][c]["accuracy"] for c in columns] for r in rows]}

  retrieval_summary = {}
  for task, r in retrieved.items():
    votes = {c["expert"]: c["votes"] for c in r["candidates"] if c["votes"]}
    winner = r["winner"]
    seen = next(p for p in prompts if p["task"] == task)["group"] == "seen_task"
    same_votes = sum(v for e, v in votes.items() if dataset_of.get(e) == prompt_ds[task])
    retrieval_summary[task] = {
        "guard": r["guard"]["mode"], "winner": winner, "winner_task": dataset_of.get(winner),
        "same_task": (dataset_of.get(winner) == prompt_ds[task]) if seen else None,
        "same_task_votes": same_votes, "confidence": r["confidence"], "votes": votes,
        "total_votes": r["total_votes"], "dataset_level": r["dataset_level"].get("dataset")}

  de_of_dataset = {dataset_of[d]: d for d in de_tasks}
  oracle = {}
  for p in prompts:
    best = max(pe_tasks, key=lambda e: (outcomes[(e, p["task"])].accuracy, -pe_tasks.index(e)))
    oracle[p["task"]] = (best, [best])
  selections = {
      "base": {p["task"]: ("base", []) for p in prompts},
      "multitask": {p["task"]: (mt_id, [mt_id]) for p in prompts},
      "RoE (prompt expert)": {t: (r["winner"], [r["winner"]]) for t, r in retrieved.items()},
      "RoE dataset expert": {
          t: (de_of_dataset[retrieval_summary[t]["dataset_level"]],
              [de_of_dataset[retrieval_summary[t]["dataset_level"]]]) for t in retrieved},
      f"merged top-{cfg.merge_top_k}": {t: (m["id"], m["inputs"]) for t, m in merged.items()},
      "oracle (uses labels)": oracle,
  }
  names = {"roe": "RoE (prompt expert)", "merge": f"merged top-{cfg.merge_top_k}"}
  methods = compose_methods(cfg, prompts, selections, outcomes,
                            {names[mode]: o for mode, o in (routed or {}).items()})

  margins = []
  passed = 0
  for e in experts:
    if e["kind"] != "prompt":
      continue
    ci = e.get("own_ci")
    lower = ci[0] if ci else e["own_accuracy"]
    passed += int(lower > 100.0 * e["chance"])
    margins.append(e["own_accuracy"] - 100.0 * e["chance"])
  seen_tasks = [t for t, r in retrieval_summary.items() if r["same_task"] is not None]
  same = sum(int(retrieval_summary[t]["same_task"]) for t in seen_tasks)
  vote_share = (100.0 * sum(retrieval_summary[t]["same_task_votes"] for t in seen_tasks) /
                max(1, sum(retrieval_summary[t]["total_votes"] for t in seen_tasks)))
  chance_share = (100.0 * sum(sum(dataset_of[e] == prompt_ds[t] for e in pe_tasks) / len(pe_tasks)
                              for t in seen_tasks) / max(1, len(seen_tasks)))
  checks = {
      "experts_beat_chance": {"passed": passed, "total": len(pe_tasks),
                              "rule": "lower bootstrap bound of own-prompt accuracy > chance",
                              "mean_margin": sum(margins) / max(1, len(margins))},
      "routing": {"same_task": same, "total": len(seen_tasks), "vote_share": vote_share,
                  "chance_share": chance_share},
  }
  claims = []
  if train_outcomes is not None and continual is not None:
    claims = make_claims(cfg, experts=experts, prompts=prompts, pe_tasks=pe_tasks,
                         dataset_of=dataset_of, outcomes=outcomes, routed=routed or {},
                         train_outcomes=train_outcomes, continual=continual, mt_id=mt_id,
                         routing=checks["routing"], timings=timings)
  return {
      "claims": claims,
      "setup": {"sentences": _setup_sentences(cfg, len(pe_tasks), len(de_tasks)),
                "config": dataclasses.asdict(cfg) | {"base_cached": base_cached,
                                                    "base_hash": cfg.base_hash(),
                                                    "corpus_task": demo_pipeline.CORPUS_TASK},
                "machine": _machine()},
      "experts": experts,
      "eval_prompts": [dict(p, num_examples=cfg.eval_examples) for p in prompts],
      "matrix": matrix, "retrieval": retrieval_summary, "methods": methods, "checks": checks,
      "timings": dict(timings),
  }


def conflicting_datasets() -> list[str]:
  """The demo datasets whose label conventions conflict (a task drawing another's rows)."""
  from seqio_tasks import demo  # pylint: disable=g-import-not-at-top
  pairs = [(t.rows_of, t.name) for t in demo.TASKS.values() if t.rows_of and t.pipeline]
  return [demo.PREFIX + n for pair in pairs for n in pair]


def make_claims(cfg: DemoConfig, *, experts, prompts, pe_tasks, dataset_of, outcomes, routed,
                train_outcomes, continual, mt_id, routing, timings) -> list[dict[str, Any]]:
  """Every claim of `demo_claims`, from the evaluated outcomes."""
  samples, seed = cfg.bootstrap_samples, cfg.seed
  experts_of: dict[str, list[str]] = {}
  for t in pe_tasks:
    experts_of.setdefault(dataset_of[t], []).append(t)
  seen = [p["task"] for p in prompts if p["group"] == "seen_task"]
  composed = [p["task"] for p in prompts if p["group"] == "heldout_task"]
  earlier = [t + "_score_eval" for t in pe_tasks]
  cont = continual["outcomes"]
  mt_seconds = timings.get("multitask adapter", 0.0)
  new = continual["new_tasks"]
  costs = {"multitask adapter (s)": mt_seconds,
           **{f"{k} (s)": v for k, v in continual["seconds"].items()},
           "new tasks": {t: {e: cont[(e, t + "_score_eval")].accuracy
                             for e in ("base", t, "multitask", CONTINUAL_ID, RETRAINED_ID)}
                         for t in new}}
  claims = [
      demo_claims.experts_learn(experts),
      demo_claims.no_negative_transfer(train_outcomes, experts_of, conflicting_datasets(), mt_id,
                                       samples, seed),
      demo_claims.continual_unchanged(continual["unchanged"], new),
      demo_claims.multitask_forgets([cont[("multitask", t)] for t in earlier],
                                    [cont[(CONTINUAL_ID, t)] for t in earlier], samples, seed,
                                    costs, [cont[(RETRAINED_ID, t)] for t in earlier]),
      demo_claims.retrieval_unseen_prompts(
          [routed["roe"][t] for t in seen], [outcomes[("base", t)] for t in seen],
          [outcomes[(mt_id, t)] for t in seen], samples, seed, routing),
  ]
  if composed:
    claims.append(demo_claims.merging_composition(
        [routed["merge"][t] for t in composed], [routed["roe"][t] for t in composed],
        [outcomes[("base", t)] for t in composed], samples, seed, cfg.merge_top_k,
        ", ".join(sorted({p["dataset"] for p in prompts if p["group"] == "heldout_task"}))))
  return claims


# ----------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="expert-t5x demo",
      description="Run the whole expert pipeline on synthetic tasks with a tiny T5 on CPU: "
      "pre-train a base, train prompt/dataset/multitask experts, build a library, retrieve and "
      "merge experts, evaluate by rank classification, and write a visual report.")
  p.add_argument("--quick", action="store_true",
                 help="fewer steps and examples, T5-encoder retrieval (a few minutes)")
  p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
  p.add_argument("--cache_dir", help="where pre-trained bases are cached (default: "
                 "$EXPERT_T5X_CACHE/demo or ~/.cache/expert_t5x/demo)")
  p.add_argument("--embedder", choices=("minilm", "t5", "bm25"),
                 help="retrieval embedder (default: minilm; t5 with --quick)")
  p.add_argument("--seed", type=int, help="seed of the base, data, experts, retrieval and "
                 "bootstrap (default 0); verdicts should not depend on it")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  return p


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
  """`expert-t5x demo [--quick] [--out DIR]`."""
  args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
  cfg = QUICK if args.quick else FULL
  if args.embedder:
    cfg = dataclasses.replace(cfg, embedder=args.embedder)
  if args.seed is not None:
    cfg = dataclasses.replace(cfg, seed=args.seed)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    summary = run_demo(cfg, args.out, args.cache_dir, show_progress=not args.no_progress)
  except (ValueError, FileNotFoundError, OSError) as e:
    if os.environ.get("EXPERT_T5X_TRACEBACK"):
      raise
    print(f"expert-t5x demo: error: {e}", file=sys.stderr)
    return 1
  out = os.path.abspath(args.out)
  print(f"Report: {os.path.join(out, 'report.md')} (plots: claims.png, heatmap.png, "
        f"retrieval.png, methods.png); verdicts in {os.path.join(out, RESULTS_FILE)}:")
  for claim in summary["claims"]:
    print(f"  {claim['verdict']:>13}  {claim['title']}")
  return 0


if __name__ == "__main__":
  sys.exit(demo_main())
