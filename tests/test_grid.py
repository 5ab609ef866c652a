"""The shipped training grid (`expert_t5x/data/grid.json`) against the paper's own configs.

Compared with `tests/fixtures/elm_grid_reference.json`: a trimmed copy of the reference grids read
from joeljang/ELM's `configs/experiment/*/*.json` (commit 27fc2a3; provenance inside the file),
whose raw values were re-checked against every config at that commit. Then: the sweep turns every
entry into the trainer's gin bindings, stacks only experts that share every setting, and a dry run
prints the settings of every expert. Pure JSON and argument parsing: no TensorFlow, no training.
"""

import collections
import json
import os
import re

import pytest

from launch import sweep

HERE = os.path.dirname(os.path.abspath(__file__))
LR = "optimizers.create_learning_rate_scheduler.base_learning_rate"


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference():
  return _load(os.path.join(HERE, "fixtures", "elm_grid_reference.json"))


@pytest.fixture(scope="module")
def shipped():
  return _load(sweep.GRID_SETTINGS_PATH)


def _key(e):
  return (e["dataset"], e["subset"], e.get("prompt"))


def test_prompt_experts_equal_the_paper_configs_entry_by_entry(reference, shipped):
  ref = {_key(e): e for e in reference["prompt_experts"]}
  got = {_key(e): e for e in shipped["prompt_experts"]}
  assert len(ref) == len(got) == 296 and set(ref) == set(got)
  for key, r in ref.items():
    g = got[key]
    assert (g["learning_rate"], g["batch_size"], g["gradient_accumulation_steps"], g["num_epochs"],
            g["max_examples"], g["inputs_length"], g["targets_length"], g["config_file"]) == (
                r["learning_rate"], r["train_batch_size"], r["gradient_accumulation_steps"],
                r["num_train_epochs"], r["num_train_examples"], r["input_length"],
                r["output_length"], r["config_file"]), key
  # The three per-prompt deviations, by prompt name (quartz3.json, app_reviews3.json, samsum7.json).
  assert got[("quartz", None, "use_info_from_paragraph_question")]["num_epochs"] == 10
  assert got[("app_reviews", None, "convert_to_star_rating")]["learning_rate"] == 3e-4
  assert got[("samsum", None, "Sum up the following dialogue")]["learning_rate"] == 3e-4
  batches = collections.Counter(e["batch_size"] for e in got.values())
  assert batches == {8: 127, 16: 61, 4: 59, 2: 43, 1: 6}  # 169 PEs not at batch 8


def test_dataset_experts_equal_the_paper_configs_entry_by_entry(reference, shipped):
  ref = {_key(e): e for e in reference["dataset_experts"]}
  got = {_key(e): e for e in shipped["dataset_experts"]}
  assert len(ref) == len(got) == 36 and set(ref) == set(got)
  assert sum(e["paper_config"] for e in got.values()) == 35  # wiki_bio has no _all.json
  for key, r in ref.items():
    g = got[key]
    assert (g["learning_rate"], g["batch_size"], g["gradient_accumulation_steps"], g["num_epochs"],
            g["examples_per_prompt"], g["inputs_length"], g["targets_length"], g["config_file"],
            g["num_prompts"], g["paper_config"]) == (
                r["learning_rate"], r["train_batch_size"], r["gradient_accumulation_steps"],
                r["num_train_epochs"], r["examples_per_prompt"], r["input_length"],
                r["output_length"], r["config_file"], len(r["prompts"]), r["de_config_exists"]), key
    # The paper's per-prompt cap summed over the prompts, then its trainer's 50k cap.
    per = r["examples_per_prompt"]
    assert g["max_examples"] == (50000 if per is None else min(50000, per * len(r["prompts"]))), key
  assert len({(e["learning_rate"], e["batch_size"], e["inputs_length"]) for e in got.values()}) > 1


def _expected_bindings(g):
  out = {LR: g["learning_rate"], "NUM_EPOCHS": g["num_epochs"], "MAX_EXAMPLES": g["max_examples"],
         "BATCH_SIZE": g["batch_size"] * g["gradient_accumulation_steps"],
         "TASK_FEATURE_LENGTHS": {"inputs": g["inputs_length"], "targets": g["targets_length"]}}
  if g["gradient_accumulation_steps"] > 1:
    out["NUM_MICROBATCHES"] = g["gradient_accumulation_steps"]
  return out


@pytest.mark.parametrize("expert_type,table", [("prompt", "prompt_experts"),
                                               ("dataset_adapter", "dataset_experts")])
def test_sweep_applies_each_experts_own_settings(expert_type, table, shipped):
  experts = sweep.paper_grid(expert_type)
  want = {_key(g): _expected_bindings(g) for g in shipped[table]}
  got = {(e.dataset, e.subset, e.prompt): e.settings_dict for e in experts}
  assert got == want


def test_setting_bindings_are_macros_of_the_recipes():
  """Each binding the sweep writes is a macro the trainer's gin files define (or a configurable)."""
  root = os.path.join(os.path.dirname(HERE), "gin")
  text = "".join(open(os.path.join(root, f), encoding="utf-8").read()
                 for f in ("runs/finetune.gin", "experts/prompt_expert.gin"))
  for binding in sweep.SETTING_BINDINGS.values():
    scope, _, name = binding.rpartition(".")
    pattern = rf"^{re.escape(scope)}:\n(  .*\n)*  {name} =" if scope else rf"^{name} ="
    assert re.search(pattern, text, re.M), binding


def test_stacks_share_every_setting(tmp_path):
  # The trainer takes one batch shape, lengths, learning rate and epoch count per job; the step
  # budgets inside a stack still differ with each task's size (tests/test_train_trainer.py checks
  # that such a stack equals the separate runs).
  args = sweep._parser().parse_args(["list", "--grid=paper", "--stack=8",
                                     f"--library={tmp_path}/lib", f"--model_root={tmp_path}/runs"])
  jobs, _ = sweep.build_jobs(sweep.select_experts(args), args, [])
  for job in jobs:
    assert len({e.settings for e in job.experts}) == 1
    for k, v in job.experts[0].settings_dict.items():
      assert sweep.common.gin_flag(k, v) in job.argv
  alone = {j.experts[0].prompt for j in jobs if len(j.experts) == 1}
  assert {"use_info_from_paragraph_question", "convert_to_star_rating",
          "Sum up the following dialogue"} <= alone


def test_dry_run_shows_settings_per_expert(tmp_path, capsys):
  code = sweep.main(["slurm", "--grid=paper", "--stack=8", "--only=^(samsum|multi_news)",
                     f"--library={tmp_path}/lib", f"--model_root={tmp_path}/runs", "--dry_run"])
  out = capsys.readouterr().out
  assert code == 0 and not os.path.exists(tmp_path / "runs")
  lines = {
      l.split("\t")[2]: l.split("\t")[3] for l in out.splitlines() if l.startswith("settings\t")
  }
  assert len(lines) == 7 + 6
  assert lines["samsum_Sum_up_the_following_dialogue"] == (
      "batch=2 max_examples=10000 epochs=5 lengths=512/128 lr=0.0003")
  assert lines["samsum_Summarize_"].endswith("lr=0.0001")
  assert all(v.startswith("batch=1 ") for k, v in lines.items() if k.startswith("multi_news"))
