"""Evaluation output files: versioned schemas, atomic writers and readers.

One evaluation directory holds (schema version `SCHEMA_VERSION`; later stages read these):

* `predictions.jsonl`: one line per (entry, example), with `PREDICTION_FIELDS`:
  `task, dataset, prompt, example_id, expert_ids` (empty for the base alone), `choice_scores`
  (the scores the argmax used, one per answer choice), `pred`, `gold` (choice indices; -1 when the
  target is not among the choices), `n_choices`, `scoring` (the named scoring), plus `excluded`
  (null, 'no_choices' or 'gold_not_in_choices'). Generative tasks have `scoring = 'generate'`,
  `pred`/`gold` strings and no choices.
* `results.json`: the protocol, model, experts, environment and, per entry, per-prompt,
  per-dataset and overall accuracies (mean and median aggregation) with bootstrap intervals.
* `results.csv`: the same numbers as flat rows; `results.md`: a Markdown table for a paper.
* `matrix.npz` (several experts): `acc [E, P]`, `expert_ids [E]`, `prompt_ids [P]`; results.json
  then also holds `oracle` (the best expert per prompt and its aggregate, `aggregation.oracle`).
* Routed runs (`eval --roe` / `--merge`, `routing.Routing`): one composed entry whose prompts
  list their `expert_ids`; its prediction lines add `entry` and carry the experts their prompt
  used (routed per example: their example's expert); results.json adds `routing` (settings, and
  per prompt the experts, votes, confidence, guard). Both are additions: schema version 1 readers
  ignore them.

Every file is written to a temporary name and renamed, so a crash never leaves a partial file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata as importlib_metadata
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from expert_t5x import file_io
from expert_t5x import validation

SCHEMA_VERSION = 1
RESULTS_KIND = "expert_t5x.eval_results"
PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
CSV_FILE = "results.csv"
MARKDOWN_FILE = "results.md"
MATRIX_FILE = "matrix.npz"
PREDICTION_FIELDS = ("task", "dataset", "prompt", "example_id", "expert_ids", "choice_scores",
                     "pred", "gold", "n_choices", "scoring")
EXCLUSIONS = ("no_choices", "gold_not_in_choices")
RESULTS_FIELDS = ("schema_version", "kind", "protocol", "model", "experts", "tasks", "environment",
                  "exclusions", "entries")
CSV_COLUMNS = ("entry", "level", "dataset", "task", "prompt", "metric", "value", "ci_low",
               "ci_high", "num")
PACKAGES = ("expert_t5x", "jax", "jaxlib", "flax", "numpy", "seqio", "tensorflow",
            "sentencepiece", "rouge-score", "sacrebleu")


# ------------------------------------------------------------------------------------ writing


def _clean(value: Any) -> Any:
  """JSON-safe values: numpy scalars to Python, NaN/inf to None (strict JSON has neither)."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return _clean(value.tolist())
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def dumps(obj: Any) -> str:
  return json.dumps(_clean(obj), sort_keys=True, allow_nan=False)


def write_json(path: str, obj: Any) -> None:
  file_io.atomic_write(path, lambda f: f.write(json.dumps(_clean(obj), sort_keys=True, indent=1,
                                                   allow_nan=False) + "\n"))


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> None:
  def write(f):
    for r in records:
      f.write(dumps(r) + "\n")
  file_io.atomic_write(path, write)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  return file_io.read_jsonl(path, hint="the file is damaged, rerun the evaluation")


def prediction_record(*, task: str, dataset: str, prompt: str, example_id: int,
                      expert_ids: Sequence[str], choice_scores: Sequence[float], pred: Any,
                      gold: Any, scoring: str, excluded: Optional[str] = None) -> dict[str, Any]:
  """One `predictions.jsonl` line (see the module docstring)."""
  if excluded is not None and excluded not in EXCLUSIONS:
    raise ValueError(f"excluded must be None or one of {EXCLUSIONS}; got {excluded!r}.")
  return {"task": task, "dataset": dataset, "prompt": prompt, "example_id": int(example_id),
          "expert_ids": list(expert_ids),
          "choice_scores": [float(s) for s in choice_scores], "pred": pred, "gold": gold,
          "n_choices": len(choice_scores), "scoring": scoring, "excluded": excluded}


def validate_prediction(record: Mapping[str, Any], where: str = "prediction") -> None:
  missing = [k for k in PREDICTION_FIELDS if k not in record]
  if missing:
    raise ValueError(f"{where}: missing fields {missing}; expected {list(PREDICTION_FIELDS)}.")
  if record["scoring"] != "generate" and record["n_choices"] != len(record["choice_scores"]):
    raise ValueError(f"{where}: n_choices {record['n_choices']} != {len(record['choice_scores'])} "
                     "choice scores.")


# -------------------------------------------------------------------------------- environment


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, Optional[str]]:
  out = {}
  for name in names:
    try:
      out[name] = importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_revision(path: Optional[str] = None) -> Optional[str]:
  """The commit of the checkout holding this package (None outside a git checkout)."""
  path = path or os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment() -> dict[str, Any]:
  """Platform, devices, Python and package versions, git revision (deterministic within a run)."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": len(devices), "process_count": jax.process_count(),
          "python": sys.version.split()[0], "machine": platform.machine(),
          "packages": package_versions(), "git_revision": git_revision()}


# ------------------------------------------------------------------------------------ results


def validate_results(obj: Mapping[str, Any], where: str = RESULTS_FILE) -> None:
  """Raises one clear error when `obj` is not a results.json of this schema version."""
  missing = [k for k in RESULTS_FIELDS if k not in obj]
  if missing:
    raise ValueError(f"{where}: missing fields {missing}; expected {list(RESULTS_FIELDS)}.")
  if obj["schema_version"] != SCHEMA_VERSION or obj["kind"] != RESULTS_KIND:
    raise ValueError(f"{where}: schema {obj['kind']!r} v{obj['schema_version']} is not "
                     f"{RESULTS_KIND!r} v{SCHEMA_VERSION}; read it with the expert_t5x version "
                     "that wrote it.")
  for entry in obj["entries"]:
    for key in ("id", "expert_ids", "prompts", "datasets", "overall"):
      if key not in entry:
        raise ValueError(f"{where}: entry {entry.get('id')!r} lacks {key!r}.")


def read_results(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise validation.DataError(f"'{path}' is not valid JSON ({e}); rerun the evaluation that "
                               "wrote it.") from e
  if not isinstance(obj, dict):
    raise validation.DataError(f"'{path}' holds a JSON {type(obj).__name__}, not a {RESULTS_FILE} "
                               "object; pass the output directory of an evaluation.")
  validate_results(obj, path)
  return obj


def csv_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Flat rows (`CSV_COLUMNS`): prompt, dataset and overall levels, mean and median metrics."""
  rows = []
  for entry in results["entries"]:
    e = entry["id"]
    for p in entry["prompts"]:
      ci = p.get("ci") or [None, None]
      rows.append({"entry": e, "level": "prompt", "dataset": p["dataset"], "task": p["task"],
                   "prompt": p["prompt"], "metric": "accuracy", "value": p["accuracy"],
                   "ci_low": ci[0], "ci_high": ci[1], "num": p["num_examples"]})
    for d in entry["datasets"]:
      for metric in ("mean", "median"):
        ci = d.get(f"ci_{metric}") or [None, None]
        rows.append({"entry": e, "level": "dataset", "dataset": d["dataset"], "task": "",
                     "prompt": "", "metric": f"accuracy_{metric}", "value": d[metric],
                     "ci_low": ci[0], "ci_high": ci[1], "num": d["num_prompts"]})
    overall = entry["overall"]
    for metric in ("mean", "median"):
      ci = overall.get(f"ci_{metric}") or [None, None]
      rows.append({"entry": e, "level": "overall", "dataset": "", "task": "", "prompt": "",
                   "metric": f"accuracy_{metric}", "value": overall[metric], "ci_low": ci[0],
                   "ci_high": ci[1], "num": overall["num_datasets"]})
    for g in entry.get("generation", []):
      for metric, value in sorted(g["metrics"].items()):
        rows.append({"entry": e, "level": "prompt", "dataset": g["dataset"], "task": g["task"],
                     "prompt": g["prompt"], "metric": metric, "value": value, "ci_low": None,
                     "ci_high": None, "num": g["num_examples"]})
  return rows


def write_csv(path: str, results: Mapping[str, Any]) -> None:
  def write(f):
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(results):
      writer.writerow({k: ("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v))
                       for k, v in _clean(row).items()})
  file_io.atomic_write(path, write)


def _fmt(value: Optional[float]) -> str:
  return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
      else f"{value:.2f}"


def markdown_table(results: Mapping[str, Any]) -> str:
  """One row per entry: each dataset's mean accuracy, the overall mean (with its bootstrap
  interval) and the overall median."""
  datasets = sorted({d["dataset"] for e in results["entries"] for d in e["datasets"]})
  out = io.StringIO()
  header = ["entry"] + datasets + ["mean", "95% CI", "median"]
  out.write("| " + " | ".join(header) + " |\n")
  out.write("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|\n")
  for entry in results["entries"]:
    by_ds = {d["dataset"]: d["mean"] for d in entry["datasets"]}
    overall = entry["overall"]
    ci = overall.get("ci_mean") or [None, None]
    cells = [entry["id"]] + [_fmt(by_ds.get(d)) for d in datasets] + [
        _fmt(overall["mean"]), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]", _fmt(overall["median"])]
    out.write("| " + " | ".join(cells) + " |\n")
  protocol = results["protocol"]
  out.write(f"\nAccuracy (%), scoring `{protocol['scoring']}`, "
            f"logit_vocab_limit {protocol['logit_vocab_limit']}; dataset = mean over its prompts, "
            "mean = mean over datasets (ANLI R1/R2/R3 count as three), median = mean over datasets "
            "of the median over prompts; 95% CI from "
            f"{protocol['bootstrap']['samples']} bootstrap resamples (seed "
            f"{protocol['bootstrap']['seed']}).\n")
  return out.getvalue()


def write_markdown(path: str, results: Mapping[str, Any]) -> None:
  text = markdown_table(results)
  file_io.atomic_write(path, lambda f: f.write(text))


def write_matrix(path: str, acc: np.ndarray, expert_ids: Sequence[str],
                 prompt_ids: Sequence[str]) -> None:
  """`matrix.npz`: `acc [E, P]` float64 percent, `expert_ids [E]`, `prompt_ids [P]` (str)."""
  acc = np.asarray(acc, np.float64)
  if acc.shape != (len(expert_ids), len(prompt_ids)):
    raise ValueError(f"matrix acc has shape {acc.shape}; expected ({len(expert_ids)}, "
                     f"{len(prompt_ids)}) for the expert and prompt ids.")

  def write(f):
    np.savez(f, acc=acc, expert_ids=np.array(list(expert_ids), dtype=str),
             prompt_ids=np.array(list(prompt_ids), dtype=str),
             schema_version=np.array(SCHEMA_VERSION))
  file_io.atomic_write(path, write, mode="wb")


def read_matrix(path: str) -> tuple[np.ndarray, list[str], list[str]]:
  """`matrix.npz` as written by `write_matrix`; a damaged or foreign file is one `DataError`."""
  fix = ("rerun the evaluation that wrote it with the same output directory (it is rebuilt from "
         "the shards)")
  try:
    with np.load(path, allow_pickle=False) as data:
      acc, expert_ids, prompt_ids = data["acc"], data["expert_ids"], data["prompt_ids"]
  except Exception as e:  # pylint: disable=broad-except  # zip, npy and missing-array errors alike
    raise validation.DataError(f"'{path}' is not a readable {MATRIX_FILE} "
                               f"({validation.one_line(e)}); {fix}.") from e
  well_formed = (acc.dtype == np.float64 and expert_ids.dtype.kind == prompt_ids.dtype.kind == "U"
                 and expert_ids.ndim == prompt_ids.ndim == 1
                 and acc.shape == (len(expert_ids), len(prompt_ids)))
  if not well_formed or not np.all(np.isnan(acc) | ((acc >= 0) & (acc <= 100))):
    raise validation.DataError(
        f"'{path}' holds acc {acc.dtype} {list(acc.shape)}, expert_ids {expert_ids.dtype} "
        f"{list(expert_ids.shape)} and prompt_ids {prompt_ids.dtype} {list(prompt_ids.shape)}; "
        f"expected float64 percentages [E, P] for E expert and P prompt id strings; {fix}.")
  return acc, [str(x) for x in expert_ids], [str(x) for x in prompt_ids]


# ------------------------------------------------------------------------------------ anchors


def write_text(path: str, text: str) -> None:
  file_io.atomic_write(path, lambda f: f.write(text))


def read_expected(path: str) -> dict[str, Any]:
  """An anchors file: {'name', 'source', 'entry', 'aggregation' ('mean'|'median'), 'tolerance',
  'datasets': {dataset: value or {'value', 'tolerance'}}, 'overall': value or {...}}."""
  with open(path, encoding="utf-8") as f:
    expected = json.load(f)
  for key in ("name", "datasets", "overall"):
    if key not in expected:
      raise ValueError(f"Anchors file '{path}' lacks {key!r}; expected keys name, source, entry, "
                       "aggregation, tolerance, datasets, overall.")
  if expected.get("aggregation", "mean") not in ("mean", "median"):
    raise ValueError(f"Anchors file '{path}': aggregation must be 'mean' or 'median'.")
  return expected


def compare_expected(results: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
  """Compares one entry's per-dataset and overall numbers with published ones.

  Returns {'passed', 'rows': [{'name', 'expected', 'got', 'delta', 'tolerance', 'ok'}],
  'markdown'}. A dataset missing from the results fails.
  """
  entry_id = expected.get("entry", "base")
  entries = {e["id"]: e for e in results["entries"]}
  if entry_id not in entries:
    raise ValueError(f"Anchors compare entry {entry_id!r} but the results hold {sorted(entries)}; "
                     "set 'entry' in the anchors file.")
  entry = entries[entry_id]
  metric = expected.get("aggregation", "mean")
  default_tol = float(expected.get("tolerance", 1.0))
  got_ds = {d["dataset"]: d[metric] for d in entry["datasets"]}

  def spec(value):
    return (float(value["value"]), float(value.get("tolerance", default_tol))) \
        if isinstance(value, Mapping) else (float(value), default_tol)

  rows = []
  targets = list(expected["datasets"].items()) + [("overall", expected["overall"])]
  for name, value in targets:
    want, tol = spec(value)
    got = entry["overall"][metric] if name == "overall" else got_ds.get(name)
    ok = got is not None and abs(got - want) <= tol
    rows.append({"name": name, "expected": want, "got": got,
                 "delta": None if got is None else got - want, "tolerance": tol, "ok": ok})
  lines = [f"## {expected['name']} ({entry_id}, {metric} over prompts)", "",
           f"Source: {expected.get('source', 'n/a')}", "",
           "| dataset | expected | got | delta | tolerance | result |",
           "|---|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['expected']:.2f} | {_fmt(r['got'])} | {_fmt(r['delta'])} | "
                 f"{r['tolerance']:.2f} | {'PASS' if r['ok'] else 'FAIL'} |")
  passed = all(r["ok"] for r in rows)
  lines += ["", f"**{'PASS' if passed else 'FAIL'}**: {sum(r['ok'] for r in rows)}/{len(rows)} "
            "within tolerance.", ""]
  return {"passed": passed, "rows": rows, "markdown": "\n".join(lines)}
