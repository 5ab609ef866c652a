"""The demo's visual report: a Markdown page with the results tables and three PNG plots.

Input is the demo's `summary.json` (see `expert_t5x.demo`), which holds everything the report shows:

  setup          {"sentences": [...], "config": {...}, "machine": str}
  experts        [{"id", "kind" (prompt|dataset|multitask), "task", "dataset", "own_prompts",
                   "own_accuracy", "chance"}]
  eval_prompts   [{"task", "dataset", "prompt", "group" (seen_task|heldout_task), "guard",
                   "chance", "num_examples"}]
  matrix         {"rows": [expert ids], "columns": [eval tasks], "accuracy": [[percent]]}
  retrieval      {eval task: {"guard", "winner", "winner_task", "same_task", "confidence",
                              "votes": {expert id: count}, "total_votes"}}
  methods        [{"name", "group", "mean", "ci": [lo, hi] | null, "num_prompts",
                   "prompts": {eval task: {"accuracy", "experts": [...]}}}]
  checks         {"experts_beat_chance": {...}, "routing": {...}}
  claims         [{"id", "title", "statement", "rule", "value", "ci": [lo, hi], "unit",
                   "verdict" (holds | does not hold), "details": {...}}] (`demo_claims`)
  timings        {stage: seconds}

Plots (written next to `report.md`):
  claims.png     each claim's headline number with its bootstrap interval, coloured by verdict
  heatmap.png    expert x eval-prompt accuracy (percent), own prompts outlined
  retrieval.png  RoE votes per held-out eval prompt, stacked by the voted expert's task
  methods.png    accuracy by method with bootstrap 95% intervals, one panel per group, chance dashed

Matplotlib runs with the non-interactive Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

from expert_t5x import demo_claims
from expert_t5x import file_io

REPORT_FILE = "report.md"
HEATMAP_FILE = "heatmap.png"
RETRIEVAL_FILE = "retrieval.png"
METHODS_FILE = "methods.png"
CLAIMS_FILE = "claims.png"
PLOT_FILES = (CLAIMS_FILE, HEATMAP_FILE, RETRIEVAL_FILE, METHODS_FILE)
GROUP_TITLES = {"seen_task": "held-out prompts of training tasks",
                "heldout_task": "held-out tasks"}
REQUIRED_KEYS = ("setup", "experts", "eval_prompts", "matrix", "retrieval", "methods", "checks",
                 "claims", "timings")


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def validate_summary(summary: Mapping[str, Any]) -> None:
  """One clear error when the summary lacks what the report needs."""
  missing = [k for k in REQUIRED_KEYS if k not in summary]
  if missing:
    raise ValueError(f"demo summary is missing {missing}; expected the keys {list(REQUIRED_KEYS)} "
                     "written by `expert-t5x demo` (rerun the demo to regenerate summary.json).")
  matrix = summary["matrix"]
  rows, cols, acc = matrix["rows"], matrix["columns"], matrix["accuracy"]
  if len(acc) != len(rows) or any(len(r) != len(cols) for r in acc):
    raise ValueError(f"demo summary matrix is {len(acc)} x {len(acc[0]) if acc else 0} but names "
                     f"{len(rows)} rows x {len(cols)} columns; regenerate summary.json.")


def short_name(task: str) -> str:
  """`demo_sentiment_tone_score_eval` -> `sentiment_tone` (labels that fit a plot)."""
  name = task[:-len("_score_eval")] if task.endswith("_score_eval") else task
  return name[len("demo_"):] if name.startswith("demo_") else name


def _fmt(value: Optional[float], digits: int = 1) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _ci(ci: Optional[Sequence[float]]) -> str:
  return "-" if not ci else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


# ----------------------------------------------------------------------------------- plots


def plot_heatmap(summary: Mapping[str, Any], path: str) -> None:
  """Expert x eval-prompt accuracy, own prompts outlined, held-out columns separated."""
  plt = _pyplot()
  import numpy as np  # pylint: disable=g-import-not-at-top
  matrix = summary["matrix"]
  acc = np.asarray(matrix["accuracy"], float)
  rows, cols = matrix["rows"], matrix["columns"]
  fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cols), 1.6 + 0.38 * len(rows)))
  image = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100, aspect="auto")
  for i in range(len(rows)):
    for j in range(len(cols)):
      value = acc[i, j]
      ax.text(j, i, "" if np.isnan(value) else f"{value:.0f}", ha="center", va="center",
              fontsize=7, color="white" if value < 60 else "black")
  own = {e["id"]: set(e.get("own_prompts") or []) for e in summary["experts"]}
  for i, row in enumerate(rows):
    for j, col in enumerate(cols):
      if col in own.get(row, ()):
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
  groups = {p["task"]: p["group"] for p in summary["eval_prompts"]}
  first_heldout = next((j for j, c in enumerate(cols) if groups.get(c) is not None), None)
  if first_heldout:
    ax.axvline(first_heldout - 0.5, color="white", lw=2)
  ax.set_xticks(range(len(cols)), [short_name(c) + (" *" if groups.get(c) else "") for c in cols],
                rotation=60, ha="right", fontsize=7)
  ax.set_yticks(range(len(rows)), [short_name(r) for r in rows], fontsize=7)
  ax.set_xlabel("eval prompt (* = held out; red box = the expert's own training prompt)")
  ax.set_ylabel("expert")
  ax.set_title("Rank-classification accuracy (%) of each expert on each eval prompt")
  fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_retrieval(summary: Mapping[str, Any], path: str) -> None:
  """Stacked RoE votes per held-out eval prompt, coloured by the task of the voted expert."""
  plt = _pyplot()
  retrieval = summary["retrieval"]
  prompts = [p["task"] for p in summary["eval_prompts"] if p["task"] in retrieval]
  task_of = {e["id"]: e.get("dataset") or e["id"] for e in summary["experts"]}
  tasks = sorted({task_of.get(x, x) for p in prompts for x in retrieval[p]["votes"]})
  colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
  fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(prompts), 4.8))
  for j, prompt in enumerate(prompts):
    bottom = 0
    for expert, votes in sorted(retrieval[prompt]["votes"].items(), key=lambda kv: -kv[1]):
      ax.bar(j, votes, bottom=bottom, color=colors[task_of.get(expert, expert)],
             edgecolor="white", lw=0.5)
      bottom += votes
    ax.text(j, bottom + 0.3, short_name(retrieval[prompt]["winner"]), ha="center",
            va="bottom", rotation=90, fontsize=7)
  ax.set_xticks(range(len(prompts)),
                [f"{short_name(p)}\n({retrieval[p]['guard']})" for p in prompts], rotation=30,
                ha="right", fontsize=7)
  ax.set_ylabel("votes (one per unlabeled query)")
  ax.set_title("Retrieval of Experts: votes per held-out eval prompt (winner above each bar)")
  handles = [plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in tasks]
  ax.legend(handles, [short_name(t) for t in tasks], title="voted expert's task", fontsize=7,
            title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  top = max((sum(retrieval[p]["votes"].values()) for p in prompts), default=1)
  ax.set_ylim(0, top * 1.8 + 1)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_methods(summary: Mapping[str, Any], path: str) -> None:
  """Mean accuracy by method with bootstrap intervals, one panel per eval group."""
  plt = _pyplot()
  groups = [g for g in GROUP_TITLES if any(m["group"] == g for m in summary["methods"])]
  fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.0 * max(1, len(groups)), 4.0),
                           squeeze=False)
  for ax, group in zip(axes[0], groups):
    methods = [m for m in summary["methods"] if m["group"] == group]
    means = [m["mean"] for m in methods]
    lower = [m["mean"] - m["ci"][0] if m.get("ci") else 0.0 for m in methods]
    upper = [m["ci"][1] - m["mean"] if m.get("ci") else 0.0 for m in methods]
    ax.bar(range(len(methods)), means, yerr=[lower, upper], capsize=4,
           color=[plt.get_cmap("Set2")(i % 8) for i in range(len(methods))])
    for i, mean in enumerate(means):
      ax.text(i, 1, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    chance = [p["chance"] for p in summary["eval_prompts"] if p["group"] == group]
    if chance:
      ax.axhline(100.0 * sum(chance) / len(chance), color="black", ls="--", lw=1,
                 label="chance (mean over prompts)")
      ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(range(len(methods)), [m["name"] for m in methods], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%), mean over datasets")
    ax.set_title(GROUP_TITLES[group], fontsize=10)
  fig.suptitle("Accuracy by method (bars: bootstrap 95% intervals)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_claims(summary: Mapping[str, Any], path: str) -> None:
  """Each claim's headline number with its interval and the verdict's threshold (0)."""
  plt = _pyplot()
  claims = summary["claims"]
  fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.6 * max(1, len(claims))))
  for i, c in enumerate(claims):
    color = "tab:green" if c["verdict"] == demo_claims.HOLDS else "tab:red"
    lo, hi = c["ci"] or (c["value"], c["value"])
    ax.errorbar(c["value"], i, xerr=[[c["value"] - lo], [hi - c["value"]]], fmt="o",
                color=color, capsize=4)
    ax.text(hi, i + 0.25, f" {c['verdict']}", color=color, fontsize=8, va="bottom")
  ax.axvline(0.0, color="black", lw=1, ls="--")
  ax.set_yticks(range(len(claims)), [c["title"] for c in claims], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("headline number (points or %; bars: bootstrap 95% interval)")
  ax.set_title("Claims: verdict holds when the interval clears 0 (see report.md)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# -------------------------------------------------------------------------------- markdown


def _methods_table(summary: Mapping[str, Any]) -> list[str]:
  lines = []
  for group, title in GROUP_TITLES.items():
    methods = [m for m in summary["methods"] if m["group"] == group]
    if not methods:
      continue
    prompts = [p for p in summary["eval_prompts"] if p["group"] == group]
    chance = 100.0 * sum(p["chance"] for p in prompts) / max(1, len(prompts))
    lines += [f"**{title}** ({len(prompts)} prompts, guard `{prompts[0]['guard']}`; chance "
              f"{chance:.1f}%)", "",
              "| method | accuracy (%) | 95% interval | " +
              " | ".join(short_name(p["task"]) for p in prompts) + " |",
              "|---|---:|---|" + "---:|" * len(prompts)]
    for m in methods:
      cells = [_fmt((m["prompts"].get(p["task"]) or {}).get("accuracy")) for p in prompts]
      lines.append(f"| {m['name']} | {_fmt(m['mean'])} | {_ci(m.get('ci'))} | " +
                   " | ".join(cells) + " |")
    lines.append("")
  return lines


def _retrieval_table(summary: Mapping[str, Any]) -> list[str]:
  lines = ["| eval prompt | guard | retrieved expert | winner's votes | same task as the prompt |",
           "|---|---|---|---:|---|"]
  for p in summary["eval_prompts"]:
    r = summary["retrieval"].get(p["task"])
    if r is None:
      continue
    same = {True: "yes", False: "no", None: "n/a (held-out task)"}[r.get("same_task")]
    lines.append(f"| {short_name(p['task'])} | {r['guard']} | {short_name(r['winner'])} | "
                 f"{r['votes'].get(r['winner'], 0)}/{r['total_votes']} | {same} |")
  return lines


def _experts_table(summary: Mapping[str, Any]) -> list[str]:
  lines = ["| expert | kind | trained on | accuracy on its own prompts (%) | chance (%) |",
           "|---|---|---|---:|---:|"]
  for e in summary["experts"]:
    chance = None if e.get("chance") is None else 100.0 * e["chance"]
    lines.append(f"| {short_name(e['id'])} | {e['kind']} | "
                 f"{', '.join(short_name(t) for t in e.get('own_prompts') or []) or '-'} | "
                 f"{_fmt(e.get('own_accuracy'))} | {_fmt(chance)} |")
  return lines


def _checks(summary: Mapping[str, Any]) -> list[str]:
  checks = summary["checks"]
  beat = checks["experts_beat_chance"]
  routing = checks["routing"]
  return [
      f"- Prompt experts above chance on their own prompts: {beat['passed']}/{beat['total']} "
      f"(mean margin {_fmt(beat.get('mean_margin'))} points over chance).",
      f"- Held-out prompts of training tasks routed to an expert of the same task: "
      f"{routing['same_task']}/{routing['total']} prompts; {_fmt(routing.get('vote_share'))}% of "
      f"all their votes went to same-task experts (chance: {_fmt(routing.get('chance_share'))}%).",
  ]


def _claim_details(c: Mapping[str, Any]) -> list[str]:
  """The table under one claim's verdict."""
  d = c["details"]
  if c["id"] == "experts_learn":
    return [f"{d['passed']}/{d['total']} prompt experts are above chance on their own prompt; "
            f"the weakest is {short_name(d['weakest'])} (per-expert numbers under Experts)."]
  if c["id"] == "no_negative_transfer":
    lines = ["| task | own experts (%) | multitask (%) | difference | 95% interval | conflicting |",
             "|---|---:|---:|---:|---|---|"]
    for task, r in d["tasks"].items():
      lines.append(f"| {short_name(task)} | {_fmt(r['expert'])} | {_fmt(r['multitask'])} | "
                   f"{_fmt(r['difference'])} | {_ci(r['ci'])} | "
                   f"{'yes' if r['conflicting'] else 'no'} |")
    return lines
  if c["id"] == "continual_unchanged":
    lines = ["| earlier eval prompt | examples | scores bitwise unchanged |", "|---|---:|---:|"]
    lines += [f"| {short_name(t)} | {r['examples']} | {r['unchanged']} |"
              for t, r in d["tasks"].items()]
    return lines
  if c["id"] == "multitask_forgets":
    costs = dict(d["costs"])
    new = costs.pop("new tasks", {})
    lines = [f"Multitask accuracy on the earlier training prompts: {_fmt(d['before'])}% before, "
             f"{_fmt(d['after'])}% after fine-tuning on the new tasks alone; a multitask adapter "
             f"retrained on every prompt instead: {_fmt(d['retrained'])}%.", "",
             "| new task | base | its new expert | multitask | multitask fine-tuned | "
             "multitask retrained |", "|---|---:|---:|---:|---:|---:|"]
    for task, r in new.items():
      cells = " | ".join(_fmt(v) for v in r.values())
      lines.append(f"| {short_name(task)} | {cells} |")
    lines += ["", "| cost | seconds |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in costs.items()]
    return lines
  if c["id"] == "retrieval_unseen_prompts":
    vs, routing = d["vs_multitask"], d["routing"]
    return [f"RoE minus the multitask model on the same prompts: {_fmt(vs['difference'])} points "
            f"{_ci(vs['ci'])} (reported, no verdict). Prompts routed to an expert of their own "
            f"task: {routing['same_task']}/{routing['total']}."]
  if c["id"] == "merging_composition":
    vs = d["vs_base"]
    return [f"Accuracy: merged {_fmt(d['merged'])}%, single retrieved expert {_fmt(d['roe'])}%, "
            f"base {_fmt(d['base'])}%; merged minus base {_fmt(vs['difference'])} points "
            f"{_ci(vs['ci'])}."]
  return []


def _claims(summary: Mapping[str, Any]) -> list[str]:
  lines = ["## Claims", "", f"![claims]({CLAIMS_FILE})", "",
           "Each claim holds when its bootstrap interval clears the rule's threshold; an interval "
           "that straddles it does not hold.", ""]
  if summary["setup"].get("config", {}).get("name") == "quick":
    lines += ["This is a `--quick` run: its experts train fewer steps, so claims that need "
              "trained experts may not hold here; the full demo is the reference.", ""]
  lines += [demo_claims.verdict_line(c) for c in summary["claims"]] + [""]
  for c in summary["claims"]:
    lines += [f"### {c['title']}", "", f"**Verdict: {c['verdict']}.** {c['statement']}: "
              f"{c['value']:.1f} {c['unit']} {_ci(c['ci'])}; rule: {c['rule']}.", ""]
    lines += _claim_details(c) + [""]
  return lines


def markdown(summary: Mapping[str, Any]) -> str:
  """The report page."""
  setup = summary["setup"]
  timings = summary["timings"]
  total = sum(timings.values())
  lines = ["# expert_t5x demo report", ""]
  lines += [" ".join(setup["sentences"]), ""]
  lines += ["These are numbers from a tiny synthetic setup that runs on a laptop CPU; they "
            "illustrate the pipeline and are not the paper's results, nor evidence for or "
            "against them.", ""]
  lines += _claims(summary)
  lines += ["## Accuracy by method", "", f"![accuracy by method]({METHODS_FILE})", ""]
  lines += _methods_table(summary)
  lines += ["Methods: *base* = the pre-trained tiny T5 alone; *multitask* = one adapter trained "
            "on the mixture of all training prompts; *RoE* = the prompt expert retrieved from "
            "unlabeled queries; *RoE dataset expert* = the dataset expert of the task the "
            "retrieval votes point to; *merged top-k* = uniform merge of the top retrieved "
            "prompt experts; *oracle* = the best prompt expert per eval prompt, chosen with the "
            "labels (an upper bound, not a method).", ""]
  lines += ["## Sanity checks", ""] + _checks(summary) + [""]
  lines += ["## Retrieval of Experts", "", f"![retrieval votes]({RETRIEVAL_FILE})", ""]
  lines += _retrieval_table(summary) + [""]
  lines += ["## Experts", "", f"![expert x eval-prompt accuracy]({HEATMAP_FILE})", ""]
  lines += _experts_table(summary) + [""]
  lines += ["## Run", "", f"Machine: {setup.get('machine', 'unknown')}.", "",
            "| stage | seconds |", "|---|---:|"]
  lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
  lines += [f"| total | {total:.1f} |", ""]
  lines += ["Configuration:", "", "```json", json.dumps(setup.get("config", {}), indent=2,
                                                         sort_keys=True), "```", ""]
  lines += ["Files: `summary.json` (everything above), `results.json` (the claims and verdicts), "
            "`eval/` (the evaluator's predictions.jsonl, results.json, matrix.npz; held-out "
            "prompts), `eval_train/` (training prompts), `eval_continual/` (the continual stage), "
            "`routed/` (RoE and merges), `retrieval.json`, `library/`, `experts/`.",
            ""]
  return "\n".join(lines)


def write_report(summary: Mapping[str, Any], out_dir: str) -> list[str]:
  """Writes report.md and the three plots into `out_dir`; returns the written paths."""
  validate_summary(summary)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, plot in ((CLAIMS_FILE, plot_claims), (HEATMAP_FILE, plot_heatmap),
                     (RETRIEVAL_FILE, plot_retrieval), (METHODS_FILE, plot_methods)):
    path = os.path.join(out_dir, name)
    plot(summary, path)
    paths.append(path)
  path = os.path.join(out_dir, REPORT_FILE)
  file_io.atomic_write_text(path, markdown(summary))
  paths.append(path)
  return paths
