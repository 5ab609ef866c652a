"""Merging experts: averages, task arithmetic, TIES and DARE, streamed per tensor, saved as recipes.

Over 600 lines: method configs, formulas, streamed merge and recipes are one unit (CLI: merge_cli).

Each method is a typed config (`UniformMerge`, `WeightedMerge`, `TaskArithmetic`, `TIES`, `DARE`),
validated on construction, in one table `METHOD_CONFIGS` (name -> class) that the CLI, eval/RoE
(`method_config(name, params)`) and recipes (their "method" and "params") all read.

Notation (reference/anchors §3): θ₀ the reference, θᵢ expert i, τᵢ = θᵢ − θ₀ its task vector.

* `uniform`: θ = (1/k) Σ θᵢ (the paper's merge); `weighted`: θ = Σ wᵢ θᵢ with Σ wᵢ = 1.
* `task_arithmetic`: θ = θ₀ + λ Σ τᵢ.
* `ties`: trim each τᵢ to its top `density` fraction by magnitude (over the whole flattened expert,
  or per tensor), elect a sign per parameter (γ = sgn Σ τ̂ᵢ by mass, or by count), average the
  entries that agree with γ (disjoint mean), θ = θ₀ + λ τ_m.
* `dare`: drop each entry of τᵢ with probability p (seeded mask), rescale by 1/(1−p), then combine
  linearly (θ₀ + λ Σ τ̃ᵢ) or with TIES' election and disjoint mean.

Task vectors per expert type: adapter tensors θ − θ_init when every input records the same init seed
(θ_init is recomputed from the config), else θ (reference 0); layer-norm scales θ − base; full
experts store their delta; LoRA uses ΔW = (α/r)·A@B. Linear methods on LoRA experts output a
concatenated-rank LoRA (exact: its ΔW equals the merged ΔW); TIES/DARE on LoRA output a `full` delta
on the targeted kernels, optionally SVD-truncated to rank r′ (the reconstruction error is recorded).

Streaming: tensors are read one at a time from each input (`expert_format.ExpertReader`, plain
reads, no memory maps) and merged with running accumulators, in at most three passes over the inputs
(TIES: thresholds, sign mass, disjoint sum). Each merged tensor is finished (reference added,
float32) as soon as it is computed, so peak memory is the float32 output plus a few float64 tensors,
plus one expert's magnitudes in float64 for the global TIES threshold, whatever k
(bench/bench_merge.py measures it). A merge is saved in Expert format v1 with its recipe (inputs'
content hashes, method, parameters, references, output hash) in `expert.json["merge"]`; re-running a
recipe is bitwise identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from expert_t5x import expert_format
from expert_t5x import file_io
from expert_t5x import validation

ADAPTER_REFERENCES = ("auto", "init", "zero")  # Task-vector reference of adapter inputs.
# 2: linear merges of LoRA inputs of one (rank, alpha) keep alpha/rank instead of folding it into B.
RECIPE_FORMAT = 2

Getter = Callable[[int], np.ndarray]  # expert index -> that expert's task vector for one tensor


class MergeError(ValueError):
  """Bad merge input (the message says what to do)."""


# ----------------------------------------------------------------------------
# Per-tensor formulas. Each takes `get(i)` for i in range(k), reads one expert's tensor at a time
# and accumulates in float64 in expert order, so results are deterministic and bitwise reproducible.
# ----------------------------------------------------------------------------


def linear_combination(get: Getter, coefficients: Sequence[float]) -> np.ndarray:
  """Σᵢ cᵢ xᵢ (float64 accumulation)."""
  total = None
  for i, c in enumerate(coefficients):
    term = float(c) * np.asarray(get(i), np.float64)
    total = term if total is None else total + term
  return total


def trim_mask(tau: np.ndarray, threshold: float) -> np.ndarray:
  """TIES trim: keep entries whose magnitude is at least the expert's threshold (ties are kept)."""
  return np.abs(tau) >= threshold


def topk_threshold(magnitudes: np.ndarray, density: float, *, overwrite: bool = False) -> float:
  """The magnitude of the ⌈density·n⌉-th largest entry (0 keeps everything).

  With `overwrite`, `magnitudes` (1-D) is partitioned in place instead of copied.
  """
  n = magnitudes.size
  keep = min(n, int(math.ceil(density * n)))
  if keep >= n or n == 0:
    return 0.0
  if keep <= 0:
    return math.inf
  if overwrite:
    magnitudes.partition(n - keep)
    return float(magnitudes[n - keep])
  return float(np.partition(magnitudes, n - keep)[n - keep])


def elect_and_disjoint_mean(get: Getter, k: int, sign_method: str = "mass") -> np.ndarray:
  """TIES steps 2-3 on (already trimmed) task vectors: γ = sgn Σ τ̂ (or Σ sgn τ̂), mean over
  agreeing τ̂.

  Two passes over the experts: one for the sign, one for the agreeing sum and count.
  """
  mass = None
  for i in range(k):
    x = np.asarray(get(i), np.float64)
    x = np.sign(x) if sign_method == "count" else x
    mass = x if mass is None else mass + x
  gamma = np.sign(mass)
  total = np.zeros_like(gamma)
  count = np.zeros_like(gamma)
  for i in range(k):
    x = np.asarray(get(i), np.float64)
    agree = (np.sign(x) == gamma) & (gamma != 0)
    total += np.where(agree, x, 0.0)
    count += agree
  return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def dare_mask(seed: int, expert_index: int, name: str, shape: Sequence[int],
              p: float) -> np.ndarray:
  """Seeded DARE drop mask (True = dropped), a pure function of (seed, expert index, tensor
  name)."""
  rng = np.random.default_rng([seed, expert_index, zlib.crc32(name.encode("utf-8"))])
  return rng.random(tuple(shape)) < p


def dare_rescale(tau: np.ndarray, dropped: np.ndarray, p: float) -> np.ndarray:
  """τ̃ = (1 − m) ⊙ τ / (1 − p)."""
  return np.where(dropped, 0.0, np.asarray(tau, np.float64) / (1.0 - p))


# ----------------------------------------------------------------------------
# Merge methods as typed configs, in one table (name -> config class) that the CLI, eval/RoE and
# recipes read. A config is validated on construction; what depends on the number of inputs k
# (weights per expert) is checked by `resolve(k)`.
# ----------------------------------------------------------------------------

SIGN_METHODS = ("mass", "count")
DARE_COMBINES = ("linear", "ties")


def _finite(name: str, value: Any) -> float:
  # A non-finite value is a usage error (exit 2), named as its flag; a negative λ or weight is
  # task negation (it subtracts task vectors), so only finiteness is required of them.
  return validation.finite(f"--{name}", value)


@dataclasses.dataclass(frozen=True)
class MergeMethod:
  """A merge method and its parameters; subclasses are the entries of `METHOD_CONFIGS`.

  Field order is the order of the recipe's "resolved_params" keys.
  """
  name: ClassVar[str] = ""
  absolute: ClassVar[bool] = False  # Averages θ directly (the reference cancels): no task vectors.
  linear: ClassVar[bool] = False  # θ₀ + Σ cᵢ τᵢ: exact on LoRA by rank concatenation.

  @classmethod
  def from_params(cls, params: Mapping[str, Any]) -> MergeMethod:
    """The config from a params dict (flags, a recipe's "params"); None or '' keeps a default."""
    given = {f.name: params[f.name] for f in dataclasses.fields(cls)
             if params.get(f.name) is not None and params.get(f.name) != ""}
    return cls(**given)

  def to_params(self) -> dict[str, Any]:
    """The parameters as a recipe's "params" dict (`method_config(name, to_params())`
    round-trips)."""
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

  def resolve(self, k: int) -> dict[str, Any]:
    """The parameters the formulas use for k inputs (a recipe's "resolved_params" entries)."""
    if k < 1:
      raise MergeError("Merging needs at least one expert.")
    return self.to_params()

  def coefficients(self, k: int) -> list[float]:
    """cᵢ of a linear method (θ₀ + Σ cᵢ τᵢ, or Σ cᵢ θᵢ when `absolute`)."""
    raise NotImplementedError(f"{self.name} is not a linear merge")

  def merge_tensor(self, name: str, get: Getter, k: int,
                   thresholds: Sequence[float] | None) -> np.ndarray:
    """τ_m of one tensor from `get(i)`, i < k (float64); `thresholds` are TIES' global ones."""
    return linear_combination(get, self.coefficients(k))


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class UniformMerge(MergeMethod):
  """uniform: θ = (1/k) Σ θᵢ (the paper's merge)."""
  name: ClassVar[str] = "uniform"
  absolute: ClassVar[bool] = True
  linear: ClassVar[bool] = True

  def coefficients(self, k: int) -> list[float]:
    return [1.0 / k] * k


@dataclasses.dataclass(frozen=True)
class WeightedMerge(MergeMethod):
  """weighted: θ = Σ wᵢ θᵢ, weights normalised to sum 1 (a negative one is task negation)."""
  name: ClassVar[str] = "weighted"
  absolute: ClassVar[bool] = True
  linear: ClassVar[bool] = True
  weights: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.weights is None:
      raise MergeError("Method 'weighted' needs --weights with one value per expert; got None.")
    weights = tuple(validation.finite_all("--weights", self.weights))
    object.__setattr__(self, "weights", weights)
    if float(sum(weights)) <= 0:
      raise MergeError(
          f"Weights {list(weights)} must sum to a positive value (they are normalised to "
          "sum 1).")

  def resolve(self, k: int) -> dict[str, Any]:
    super().resolve(k)
    if len(self.weights) != k:
      raise MergeError(f"Method 'weighted' needs --weights with one value per expert ({k}); got "
                       f"{list(self.weights)}.")
    return {"weights": self.coefficients(k)}

  def coefficients(self, k: int) -> list[float]:
    total = float(sum(self.weights))
    return [float(w) / total for w in self.weights]


@dataclasses.dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
  """task_arithmetic: θ = θ₀ + λ Σ τᵢ (a negative λ is task negation)."""
  name: ClassVar[str] = "task_arithmetic"
  linear: ClassVar[bool] = True
  lam: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "lam", _finite("lam", self.lam))

  def coefficients(self, k: int) -> list[float]:
    return [self.lam] * k

  def merge_tensor(self, name: str, get: Getter, k: int,
                   thresholds: Sequence[float] | None) -> np.ndarray:
    return self.lam * linear_combination(get, [1.0] * k)


def _check_sign_method(sign_method: str) -> None:
  if sign_method not in SIGN_METHODS:
    raise MergeError(f"sign_method must be 'mass' or 'count'; got {sign_method!r}.")


@dataclasses.dataclass(frozen=True)
class TIES(MergeMethod):
  """ties: θ₀ + λ τ_m, τ_m the sign-elected disjoint mean of the τᵢ trimmed to their top
  `density`."""
  name: ClassVar[str] = "ties"
  lam: float = 1.0
  density: float = 0.2
  per_tensor: bool = False  # Trim per tensor instead of over the whole flattened expert.
  sign_method: str = "mass"

  def __post_init__(self):
    object.__setattr__(self, "lam", _finite("lam", self.lam))
    object.__setattr__(self, "density", _finite("density", self.density))
    object.__setattr__(self, "per_tensor", bool(self.per_tensor))
    if not 0.0 < self.density <= 1.0:
      raise MergeError(f"TIES density must be in (0, 1]; got {self.density}.")
    _check_sign_method(self.sign_method)

  def merge_tensor(self, name: str, get: Getter, k: int,
                   thresholds: Sequence[float] | None) -> np.ndarray:
    if self.per_tensor:
      thresholds = [topk_threshold(np.abs(np.asarray(get(i), np.float64)).ravel(), self.density,
                                   overwrite=True) for i in range(k)]

    def trimmed(i: int) -> np.ndarray:
      x = np.asarray(get(i), np.float64)
      return np.where(trim_mask(x, thresholds[i]), x, 0.0)
    return self.lam * elect_and_disjoint_mean(trimmed, k, self.sign_method)


@dataclasses.dataclass(frozen=True)
class DARE(MergeMethod):
  """dare: drop each τᵢ entry with probability `drop` (seeded), rescale, combine linearly or
  TIES-style."""
  name: ClassVar[str] = "dare"
  lam: float = 1.0
  sign_method: str = "mass"  # Of the TIES-style combine.
  drop: float = 0.9
  seed: int = 0
  combine: str = "linear"

  def __post_init__(self):
    object.__setattr__(self, "lam", _finite("lam", self.lam))
    object.__setattr__(self, "drop", _finite("drop", self.drop))
    object.__setattr__(self, "seed", int(self.seed))
    _check_sign_method(self.sign_method)
    if not 0.0 <= self.drop < 1.0:
      raise MergeError(f"DARE drop probability must be in [0, 1); got {self.drop}.")
    if self.seed < 0:
      raise MergeError(f"DARE seed must be an integer >= 0; got {self.seed}.")
    if self.combine not in DARE_COMBINES:
      raise MergeError(f"DARE combine must be 'linear' or 'ties'; got {self.combine!r}.")

  def merge_tensor(self, name: str, get: Getter, k: int,
                   thresholds: Sequence[float] | None) -> np.ndarray:
    def dropped(i: int) -> np.ndarray:
      x = np.asarray(get(i), np.float64)
      return dare_rescale(x, dare_mask(self.seed, i, name, x.shape, self.drop), self.drop)
    if self.combine == "linear":
      return self.lam * linear_combination(dropped, [1.0] * k)
    return self.lam * elect_and_disjoint_mean(dropped, k, self.sign_method)


# The one table of merge methods: `--method` choices and help, eval/RoE's merge_method, recipes.
METHOD_CONFIGS: dict[str, type[MergeMethod]] = {
    c.name: c for c in (UniformMerge, WeightedMerge, TaskArithmetic, TIES, DARE)}
METHODS = tuple(METHOD_CONFIGS)
LINEAR_METHODS = tuple(n for n, c in METHOD_CONFIGS.items() if c.linear)
# Every parameter name of some method (the CLI's flags, recipes' "params" keys).
PARAM_NAMES = tuple(
    dict.fromkeys(f.name for c in METHOD_CONFIGS.values() for f in dataclasses.fields(c)))


def method_config(method: str | MergeMethod,
                  params: Mapping[str, Any] | None = None) -> MergeMethod:
  """The validated config of `method` with `params` (flags, a recipe's "params", eval's
  merge_params).

  Parameters the method does not use are still checked to be finite numbers (recipes have always
  recorded them) and otherwise ignored. A config passes through (with no params).
  """
  if isinstance(method, MergeMethod):
    if params:
      raise MergeError(f"Pass parameters inside the {type(method).__name__} config, not also as "
                       f"{sorted(params)}.")
    return method
  if method not in METHOD_CONFIGS:
    raise MergeError(f"Unknown merge method {method!r}; expected one of {METHODS}.")
  params = params or {}
  for key in ("lam", "density", "drop"):
    if params.get(key) is not None:
      _finite(key, params[key])
  if params.get("weights") is not None:
    validation.finite_all("--weights", params["weights"])
  return METHOD_CONFIGS[method].from_params(params)


def _resolve(method: str | MergeMethod, k: int, params: Mapping[str, Any]
             ) -> tuple[MergeMethod, dict[str, Any], dict[str, Any]]:
  """(config, the recipe's "params", its "resolved_params") for k inputs.

  "params" is what was given (a config's full parameters); "resolved_params" is that with the
  method's resolved values put in (given keys the method does not use stay, as they always have).
  """
  config = method_config(method, params)
  given = dict(params) if isinstance(method, str) else config.to_params()
  resolved = dict(given)
  resolved.update(config.resolve(k))
  return config, given, resolved


# ----------------------------------------------------------------------------
# Whole-expert merges of task vectors (in memory or streamed).
# ----------------------------------------------------------------------------


def _global_thresholds(names: Sequence[str], k: int, tau: Callable[[int, str], np.ndarray],
                       density: float, sizes: Mapping[str, int] | None) -> list[float]:
  # One expert's magnitudes in one reused float64 buffer, partitioned in place: this pass holds
  # one expert (in float64) plus one tensor, whatever k. Without `sizes` the first expert's
  # magnitudes are concatenated (twice that, once).
  mags = None
  if sizes is not None:
    mags = np.empty(sum(int(sizes[n]) for n in names), np.float64)
  out = []
  for i in range(k):
    if mags is None:
      mags = np.concatenate([np.abs(np.asarray(tau(i, n), np.float64)).ravel() for n in names])
    else:
      start = 0
      for n in names:
        x = np.asarray(tau(i, n), np.float64).ravel()
        np.abs(x, out=mags[start:start + x.size])
        start += x.size
    out.append(topk_threshold(mags, density, overwrite=True))
  return out


def merge_task_vectors(method: str | MergeMethod,
                       names: Sequence[str],
                       k: int,
                       tau: Callable[[int, str], np.ndarray],
                       finalize: Callable[[str, np.ndarray], np.ndarray] | None = None,
                       sizes: Mapping[str, int] | None = None,
                       **params: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Merges k task vectors tensor by tensor; returns ({name: τ_m}, resolved params).

  For `uniform`/`weighted` the same formula applies to absolute values (the reference cancels).

  Args:
    method: one of METHODS, or a `MergeMethod` config (then no **params).
    names: tensor names to merge.
    k: number of experts.
    tau: (expert index, name) -> that expert's task vector (read lazily).
    finalize: (name, float64 τ_m) -> the stored tensor (e.g. reference + τ_m in float32), applied as
      each tensor is merged so that only finished tensors are kept (default: τ_m in float64).
    sizes: {name: number of entries}, if known without reading (lets TIES' global threshold
      fill one preallocated buffer).
    **params: weights, lam, density, per_tensor, sign_method, drop, seed, combine.
  """
  config, _, resolved = _resolve(method, k, params)
  thresholds = None
  if isinstance(config, TIES) and not config.per_tensor:
    thresholds = _global_thresholds(names, k, tau, config.density, sizes)
  out = {}
  for name in names:
    out[name] = config.merge_tensor(name, lambda i, name=name: tau(i, name), k, thresholds)
    if finalize is not None:
      out[name] = finalize(name, out[name])
  return out, resolved


def merge_pytrees(method: str | MergeMethod,
                  trees: Sequence[Mapping[str, Any]],
                  reference: Mapping[str, Any] | None = None,
                  **params: Any) -> dict[str, Any]:
  """In-memory merge of parameter trees (nested or flat) of one structure; returns a nested float32
  tree.

  Task vectors are taken against `reference` (flat or nested; None = zeros) and the result is
  reference + τ_m; `uniform`/`weighted` average the trees directly.
  """
  flats = [expert_format.flatten_params(t) for t in trees]
  names = list(flats[0])
  for i, f in enumerate(flats[1:], 1):
    if list(f) != names:
      raise MergeError(
          f"Tree {i} has tensors {_diff(names, list(f))} that tree 0 does not share; merge "
          f"trees of one structure.")
  ref = expert_format.flatten_params(reference) if reference is not None else {}
  absolute = method_config(method, params).absolute

  def tau(i: int, name: str) -> np.ndarray:
    x = np.asarray(flats[i][name], np.float64)
    return x if absolute or name not in ref else x - np.asarray(ref[name], np.float64)

  def finalize(name: str, value: np.ndarray) -> np.ndarray:
    if not absolute and name in ref:
      value = np.asarray(ref[name], np.float64) + value
    return value.astype(np.float32)

  merged, _ = merge_task_vectors(method, names, len(flats), tau, finalize, **params)
  return expert_format.unflatten_params(merged)


def _diff(a: Sequence[str], b: Sequence[str]) -> str:
  extra, missing = sorted(set(b) - set(a))[:3], sorted(set(a) - set(b))[:3]
  return f"(+{extra}, -{missing})"


# ----------------------------------------------------------------------------
# LoRA in ΔW space.
# ----------------------------------------------------------------------------


def lora_scale(config: Mapping[str, Any]) -> float:
  if "rank" not in config or "alpha" not in config:
    raise MergeError(
        f"LoRA config {dict(config)} lacks rank/alpha; it is not an expert_t5x LoRA config.")
  return float(config["alpha"]) / float(config["rank"])


def lora_modules(names: Sequence[str]) -> list[str]:
  """Module paths of a LoRA expert's factors (`.../query/lora_a` -> `.../query`)."""
  mods = sorted(n[:-len("/lora_a")] for n in names if n.endswith("/lora_a"))
  missing = [m for m in mods if f"{m}/lora_b" not in names]
  if missing or len(mods) * 2 != len(names):
    raise MergeError(f"LoRA expert tensors must come in lora_a/lora_b pairs; unpaired: "
                     f"{missing[:3] or sorted(set(names))[:3]}.")
  return mods


def _shape_key(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The part of a tensor's shape that merged inputs must share: LoRA factors may differ in rank."""
  if name.endswith("/lora_a"):
    return shape[:-1]
  if name.endswith("/lora_b"):
    return shape[1:]
  return shape


def lora_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
  """ΔW = (α/r) A @ B, A [in, r], B [r, out] -> [in, out] (float64)."""
  return scale * (np.asarray(a, np.float64) @ np.asarray(b, np.float64))


def concat_lora(factors: Sequence[tuple[np.ndarray, np.ndarray]], coefficients: Sequence[float],
                scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Exact linear LoRA merge by rank concatenation: A = [A₁…A_k], B = [c₁s₁B₁; …; c_k s_k B_k].

  A @ B = Σ cᵢ sᵢ Aᵢ Bᵢ: with the inputs' scales folded in (`scales` = αᵢ/rᵢ) that is the merged ΔW
  at scale 1; with `scales` all 1 (inputs of one α/r), it is ΔW / (α/r).
  """
  a = np.concatenate([np.asarray(f[0], np.float64) for f in factors], axis=1)
  b = np.concatenate(
      [c * s * np.asarray(f[1], np.float64) for f, c, s in zip(factors, coefficients, scales)],
      axis=0)
  return a.astype(np.float32), b.astype(np.float32)


def svd_truncate(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
  """Best rank-r′ factors of ΔW (A = U_r S_r, B = V_rᵀ) and the relative Frobenius reconstruction
  error."""
  u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
  r = min(rank, s.size)
  a, b = u[:, :r] * s[:r], vt[:r]
  norm = float(np.linalg.norm(s))
  err = float(np.linalg.norm(s[r:])) / norm if norm > 0 else 0.0
  return a.astype(np.float32), b.astype(np.float32), err


# ----------------------------------------------------------------------------
# Merging expert directories into a new expert (streaming), with a recipe.
# ----------------------------------------------------------------------------


def _is_layer_norm(name: str) -> bool:
  return name.endswith("/scale")


def adapter_init_params(metas: Sequence[Mapping[str, Any]], base_params: Mapping[str, Any],
                        t5_config: Any = None) -> dict[str, Any] | None:
  """θ_init of adapter inputs (recomputed from their config and init seed), else None.

  Args:
    metas: the inputs' metadata (`expert.json`); the first one's config is used.
    base_params: the base parameters the adapters were initialised against.
    t5_config: the base's `network.T5Config` (default: the recorded base config name).
  """
  if metas[0]["type"] != "adapter":
    return None
  from expert_t5x import experts  # heavy; only for task-vector merges of adapters
  if t5_config is None:
    from expert_t5x import network
    t5_config = network.get_config(metas[0]["base"]["config_name"])
  return experts.init_expert(experts.config_from_json(metas[0]["config"]), t5_config, base_params)


def _adapter_reference(
    readers: Sequence[expert_format.ExpertReader], policy: str,
    init_params: Mapping[str, Any] | None) -> tuple[str, dict[str, np.ndarray] | None]:
  seeds = {
      json.dumps([r.metadata["config"].get("init_seed"), r.metadata["training"].get("init_seed")])
      for r in readers
  }
  # An unknown seed (None, e.g. imported experts) never counts as shared.
  same = len(seeds) == 1 and readers[0].metadata["config"].get("init_seed") is not None
  if policy == "auto":
    policy = "init" if same else "zero"
  if policy == "init":
    if not same:
      raise MergeError(
          "adapter_reference='init' needs every input to record the same init seed; they "
          f"record {sorted(seeds)}. Use 'zero' (θ as the task vector).")
    if init_params is None:
      raise MergeError(
          "This merge needs the adapters' initial values θ_init (all inputs share an init seed); "
          "pass --base so they can be recomputed, or --adapter-reference zero.")
    return "init", expert_format.flatten_params(init_params)
  if policy != "zero":
    raise MergeError(f"adapter_reference must be auto, init or zero; got {policy!r}.")
  return "zero", None


def merge_expert_dirs(expert_dirs: Sequence[str], output_dir: str, method: str | MergeMethod, *,
                      base_params: Mapping[str, Any] | None = None,
                      init_params: Mapping[str, Any] | None = None,
                      adapter_reference: str = "auto", svd_rank: int | None = None,
                      input_names: Sequence[str] | None = None, overwrite: bool = False,
                      **params: Any) -> dict[str, Any]:
  """Merges Expert-format directories into a new expert at `output_dir`; returns the recipe.

  Args:
    expert_dirs: the input experts (one type, one base, one tensor structure).
    output_dir: where the merged expert is written (atomically).
    method: one of METHODS, or a `MergeMethod` config (then no **params; the recipe records its
      parameters).
    base_params: base parameters (flat or nested), needed for layer-norm task vectors (θ − base) of
      adapter experts under non-averaging methods.
    init_params: the adapters' initial values (flat or nested; e.g. `experts.init_expert(...)`).
    adapter_reference: 'auto' (init if all inputs share an init seed, else zero), 'init' or 'zero'.
    svd_rank: for TIES/DARE on LoRA experts, refactor each merged ΔW to this rank (output type
    lora).
    input_names: names recorded in the recipe (default: the directories).
    overwrite: replace an existing output directory.
    **params: method parameters (weights, lam, density, per_tensor, sign_method, drop, seed,
    combine).
  """
  if not expert_dirs:
    raise MergeError("Merging needs at least one expert directory.")
  readers = [expert_format.ExpertReader(d) for d in expert_dirs]
  try:
    metas = [r.metadata for r in readers]
    kind = metas[0]["type"]
    for d, m in zip(expert_dirs, metas):
      if m["type"] != kind:
        raise MergeError(
            f"Cannot merge a {m['type']} expert ('{d}') with {kind} experts; merge one type.")
      if m["base"]["fingerprint"] != metas[0]["base"]["fingerprint"]:
        raise MergeError(
            f"Expert '{d}' has base {m['base']['fingerprint']} but '{expert_dirs[0]}' has "
            f"{metas[0]['base']['fingerprint']}; merge experts of one base.")
    hashes = [m["content_hash"] for m in metas]
    for d, h in zip(expert_dirs, hashes):
      if hashes.count(h) > 1:
        raise validation.UsageError(
            f"Expert '{d}' is given {hashes.count(h)} times (content hash "
            f"{h[:12]}); give each expert once (use --weights to weigh one more).")
    for d, r in zip(expert_dirs, readers):
      # The recipe records these hashes, so they must be the tensors' own, not only the claim.
      try:
        r.verify()
      except ValueError as e:
        raise MergeError(f"Cannot merge: {validation.one_line(e)}") from None
    names = readers[0].names()
    for d, r in zip(expert_dirs, readers):
      if r.names() != names:
        raise MergeError(
            f"Expert '{d}' has tensors {_diff(names, r.names())} that '{expert_dirs[0]}' does not "
            f"share; merge experts of one configuration.")
      for n in names:  # Equal names with other shapes (e.g. another adapter width) would broadcast.
        if _shape_key(n, r.shape(n)) != _shape_key(n, readers[0].shape(n)):
          raise MergeError(
              f"Expert '{d}' has '{n}' of shape {r.shape(n)} but '{expert_dirs[0]}' has "
              f"{readers[0].shape(n)}; merge experts of one configuration.")
    k = len(readers)
    config, given, resolved = _resolve(method, k, params)
    recipe: dict[str, Any] = {
        "format": RECIPE_FORMAT,
        "method": config.name,
        "params": given,
        "resolved_params": resolved,
        "input_type": kind,
        "inputs": [{"name": n, "content_hash": m["content_hash"]}
                   for n, m in zip(input_names or list(expert_dirs), metas)],
        "base_fingerprint": metas[0]["base"]["fingerprint"],
    }
    if kind == "lora":
      flat, out_config, extra = _merge_lora(readers, names, config, resolved, svd_rank)
    else:
      flat, extra = _merge_dense(readers, names, kind, config, resolved, base_params, init_params,
                                 adapter_reference)
      out_config = metas[0]["config"]
    recipe.update(extra)
    out_type = recipe.get("output_type", kind)
    provenance = [dict(p, role="merged") for m in metas for p in m["provenance"]]
    meta = expert_format.build_metadata(
        out_type,
        out_config,
        base_fingerprint=metas[0]["base"]["fingerprint"],
        base_config_name=metas[0]["base"]["config_name"],
        vocab_fingerprint=metas[0]["base"]["vocab_fingerprint"],
        provenance=provenance,
        training={"merged_from": [m["content_hash"] for m in metas]})
    recipe["output_type"] = out_type
    recipe["output_hash"] = expert_format.digest_items(
        (n, np.ascontiguousarray(v, np.float32)) for n, v in sorted(flat.items()))
    meta["merge"] = recipe
    content_hash = expert_format.save_expert(output_dir, flat, meta, overwrite=overwrite)
    assert content_hash == recipe["output_hash"]
    return recipe
  finally:
    for r in readers:  # Nothing stays open (or mapped) after a merge.
      r.close()


# `_merge_dense` and `_merge_lora` take the config and its resolved params. The formulas get the
# resolved params (re-resolved: weighted's weights are normalised twice), as every recipe so far
# was made, so reruns stay bitwise identical.


def _merge_dense(readers, names, kind, config, p, base_params, init_params, adapter_reference):
  absolute = config.absolute
  extra: dict[str, Any] = {"reference": {}}
  base = expert_format.flatten_params(base_params) if base_params is not None else None
  init = None
  if kind == "adapter" and not absolute:
    ref_kind, init = _adapter_reference(readers, adapter_reference, init_params)
    extra["reference"]["adapter"] = ref_kind
    if any(_is_layer_norm(n) for n in names):
      if base is None:
        raise MergeError(
            f"Method '{config.name}' on adapter experts needs the base parameters for layer-norm "
            f"task vectors (θ − base); pass --base CHECKPOINT.")
      extra["reference"]["layer_norm"] = "base"
  elif kind == "full":
    extra["reference"]["full"] = "stored delta"

  def reference(name: str) -> np.ndarray | None:
    if absolute or kind == "full":
      return None
    if _is_layer_norm(name):
      return np.asarray(base[name], np.float64)
    if init is not None:
      return np.asarray(init[name], np.float64)
    return None

  def tau(i: int, name: str) -> np.ndarray:
    x = readers[i].get(name).astype(np.float64)
    r = reference(name)
    return x if r is None else x - r

  def finalize(name: str, value: np.ndarray) -> np.ndarray:
    r = reference(name)
    return (value if r is None else r + value).astype(np.float32)

  sizes = {n: int(np.prod(readers[0].shape(n), dtype=np.int64)) for n in names}
  flat, _ = merge_task_vectors(config.name, names, len(readers), tau, finalize, sizes, **p)
  return flat, extra


def _merge_lora(readers, names, config, p, svd_rank):
  configs = [r.metadata["config"] for r in readers]
  scales = [lora_scale(c) for c in configs]
  modules = lora_modules(names)
  k = len(readers)
  if config.linear:
    coeffs = config.coefficients(k)
    rank = sum(int(c["rank"]) for c in configs)
    # Inputs of one (rank, alpha) keep their scale: alpha' = k·alpha over rank k·r gives the same
    # alpha'/rank', so B only takes the coefficients (and merging one expert returns it bitwise).
    # Otherwise the scales fold into B and the output has scale 1 (alpha' = rank').
    shared = all(
        (c["rank"], c["alpha"]) == (configs[0]["rank"], configs[0]["alpha"]) for c in configs)
    alpha = float(configs[0]["alpha"]) * k if shared else float(rank)
    flat = {}
    for m in modules:
      factors = [(r.get(f"{m}/lora_a"), r.get(f"{m}/lora_b")) for r in readers]
      flat[f"{m}/lora_a"], flat[f"{m}/lora_b"] = concat_lora(factors, coeffs,
                                                             [1.0] * k if shared else scales)
    config = dict(configs[0], rank=rank, alpha=alpha)
    return flat, config, {
        "lora": {"output": "concatenated_rank", "rank": rank, "coefficients": coeffs}
    }

  def tau(i: int, kernel: str) -> np.ndarray:
    m = kernel[:-len("/kernel")]
    return lora_delta(readers[i].get(f"{m}/lora_a"), readers[i].get(f"{m}/lora_b"), scales[i])

  kernels = [f"{m}/kernel" for m in modules]
  if svd_rank is None:
    flat, _ = merge_task_vectors(config.name, kernels, k, tau, lambda _, v: v.astype(np.float32),
                                 **p)
    return flat, {"kind": "full"}, {"output_type": "full", "lora": {"output": "full_delta"}}
  merged, _ = merge_task_vectors(config.name, kernels, k, tau, **p)
  flat, errors = {}, {}
  for kernel, delta in merged.items():
    m = kernel[:-len("/kernel")]
    flat[f"{m}/lora_a"], flat[f"{m}/lora_b"], errors[m] = svd_truncate(delta, svd_rank)
  config = dict(configs[0], rank=int(svd_rank), alpha=float(svd_rank))
  return flat, config, {"lora": {"output": "svd", "rank": int(svd_rank), "relative_error": errors,
                                 "max_relative_error": max(errors.values())}}


# ----------------------------------------------------------------------------
# Label-free choice of top-k and λ (entropy of choice distributions on unlabeled queries).
# ----------------------------------------------------------------------------


def mean_choice_entropy(scores: np.ndarray) -> float:
  """Mean over queries of the entropy of softmax(choice scores); -inf scores are absent choices."""
  s = np.asarray(scores, np.float64)
  finite = np.isfinite(s)
  shifted = np.where(finite, s - np.max(np.where(finite, s, -np.inf), axis=1, keepdims=True),
                     -np.inf)
  probs = np.exp(shifted)
  probs /= probs.sum(axis=1, keepdims=True)
  ent = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=1)
  return float(ent.mean())


def select_label_free(candidates: Sequence[Any],
                      score_fn: Callable[[Any], np.ndarray]) -> tuple[Any, list[dict]]:
  """Picks the candidate (e.g. (top_k, λ)) whose merged model has the lowest mean choice entropy.

  Args:
    candidates: settings to try, in preference order (ties go to the earlier one).
    score_fn: candidate -> [Q, K] choice scores of the merged model on the unlabeled queries.

  Returns:
    (best candidate, table of {candidate, entropy}).
  """
  table = [{"candidate": c, "entropy": mean_choice_entropy(score_fn(c))} for c in candidates]
  best = min(range(len(table)), key=lambda i: (table[i]["entropy"], i))
  return candidates[best], table


# ----------------------------------------------------------------------------
# Recipe files, and moving a rerun into place once it reproduced its recipe.
# ----------------------------------------------------------------------------


def replace_if_reproduced(merged: str, output: str, got: str, wanted: str, recipe_path: str,
                          hint: str = "") -> None:
  """Moves a rerun's merge (`merged`, hash `got`) to `output` if it has the recipe's hash
  `wanted`."""
  if got != wanted:
    shutil.rmtree(merged, ignore_errors=True)
    raise MergeError(
        f"--recipe {recipe_path}: the merge has hash {got[:12]}, not the recipe's {wanted[:12]}; "
        "it "
        f"was not reproduced ('{output}' is unchanged){hint}.")
  file_io.swap_dir(merged, output)


def read_recipe(path: str) -> dict[str, Any]:
  """A recipe JSON (or a merged expert's expert.json) with the fields a rerun needs."""
  validation.existing_file("--recipe", path, "a recipe JSON or a merged expert's expert.json")
  try:
    with open(path, encoding="utf-8") as f:
      recipe = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise validation.DataError(f"--recipe '{path}' is not valid JSON ({e}); pass a recipe written "
                               "by `expert-t5x merge --recipe-out`.") from None
  recipe = recipe.get("merge", recipe) if isinstance(recipe, dict) else recipe
  if not isinstance(recipe, dict) or not isinstance(recipe.get("method"), str) or \
      not isinstance(recipe.get("params"), dict) or not isinstance(recipe.get("inputs"), list):
    raise validation.DataError(f"--recipe '{path}' is not a merge recipe (needs an object with "
                               "'method', 'params' and 'inputs'); pass one written by "
                               "`expert-t5x merge --recipe-out` or a merged expert's expert.json.")
  return recipe


def write_recipe(path: str, recipe: Mapping[str, Any]) -> None:
  """Writes a recipe JSON (`--recipe-out`; `read_recipe` reads it back)."""
  file_io.atomic_write_json(path, recipe, indent=2, sort_keys=True)


def merge_main(argv: Sequence[str] | None = None) -> int:
  """`expert-t5x merge` (the CLI lives in `merge_cli`)."""
  from expert_t5x import merge_cli  # pylint: disable=g-import-not-at-top
  return merge_cli.main(argv)


if __name__ == "__main__":
  sys.exit(merge_main())
