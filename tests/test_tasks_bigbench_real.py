"""Both BIG-bench formats on every example of the 13 real tasks (bigbench==1.0.0), against their
owners.

* `bigbench` (`_bbfmt`): BIG-bench's own code from the `bigbench==1.0.0` sdist (Apache-2.0),
  imported from the files `expert-t5x data fetch bigbench` keeps (`<dir>/api/`):
  `JsonTask(task.json)` loads each task (dedup, prefixes, subtasks, `default_format_fn`) and each
  (sub)task's `evaluate_fixed_shot(model, 0)` (what `evaluate_model` runs) hands a recording model
  the exact `inputs` and choice lists it would score; the model stops it there. The gold
  is `default_format_fn`'s own pick (the first key with the maximal score) on the example's scores.
  Only `task_metrics` (scoring, never reached) and the task registry package are stubbed.
* `elm`: an independent reading of joeljang/ELM `retrieval/make_benchmarks.py` (commit 27fc2a3;
  ELM's repository has no licence, so its code is not copied here): lines 15-19 (each prefix from
  the task file, defaults "", "\\nQ: ", "\\nA: ", "\\n choice: ", True), 23-31 (`f'{task_prefix}
  {input_prefix}{input}{choice_prefix + choice_prefix.join(labels) if append_choices_to_input}
  {output_prefix}'`), 85-96 (labels in JSON order, target = the label scored 1; where line 92 raises
  on a second one, the `first` rule keeps the first), pooled in the order of its `bigbench_tasks`
  list (lines 47-61, where conceptual_combinations/homonyms is listed twice; we pool it once).
  Our output also matches, per task, the sha256 of what ELM's script itself wrote
  (ELM_OUTPUT_SHA256).

The files come from the package registry through the project's fetch (pip's cache keeps the sdist);
the test skips only when the registry cannot be reached.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.network, pytest.mark.tf]

from seqio_tasks import examples, names, settings  # noqa: E402
from seqio_tasks import fetch  # noqa: E402
from seqio_tasks.sources import bigbench  # noqa: E402

# ELM's bigbench_tasks (make_benchmarks.py lines 47-61), homonyms once.
ELM_ORDER = {
    "conceptual_combinations": ["contradictions", "emergent_properties",
                                "fanciful_fictional_combinations", "homonyms", "invented_words",
                                "surprising_uncommon_combinations"],
    "logical_deduction": ["five_objects", "seven_objects", "three_objects"],
}
# sha256 of json.dumps([[source, label_list, target], ...]) per task of the bigbench_eval.json that
# ELM's own make_benchmarks.py (commit 27fc2a3) wrote when run on these files, with one line
# changed: line 92's `raise` on a second label scored 1 (hindu_knowledge) became `continue`, i.e.
# the `first` rule; the second homonyms run dropped.
ELM_OUTPUT_SHA256 = {
    "code_line_description":
        "226140971ac15659c44fcf79d11e6c3d7675f1213bba6392d46d1316070ac0d6",
    "conceptual_combinations":
        "091056302c128e8c803cb4336639ee70ac73d7c70c2e69c2cb765c018cde3e9b",
    "formal_fallacies_syllogisms_negation":
        "6cfe33d2299910e5d7f556dcf707e99ed3eafd747ad372a25b9a1c532b25c23c",
    "hindu_knowledge":
        "2507f74ae411a63d104d849402ea694a73f7c4abab16ad081229da86ef4c6ab7",
    "known_unknowns":
        "c7ba6fcb5d32545051d8736b9a5d3e1be5b66181d9961bd2078cfb73d8c9ca0b",
    "language_identification":
        "ff6beeb51466d90fb148bd36004b88fbf753fb2cf7f5d333292c82ce240e133b",
    "logic_grid_puzzle":
        "2e7b4a7f3286d47d56f9bc009c0be5a9dedfb1a7d9e494407caf3ccec9ae0f1b",
    "logical_deduction":
        "daa94ecb1759613e85d1ad4c88d8314b71217b792f520ba4f74cf5cf8a6743fb",
    "misconceptions":
        "08a70c29179f4de3e0bb92a96b7d9b928ce28e1b104e7158711866c56f897eb0",
    "movie_dialog_same_or_different":
        "71b15adec432850c75a94426896a278bada12882ee1b3036f5036fa8d34e6b5a",
    "strategyqa":
        "8ad0ea356408c5d5b56f7e3b489510fbd5bc7e17ef414c616e3e0babd9a5072e",
    "vitaminc_fact_verification":
        "eaa593992915ccb4647205d128a45fd1de53ba435c91bc819ad573c6a38ae007",
    "winowhy":
        "b75f07935ac7bd5f7922cce9f3a1dcc7f8a01a000c66335593af59eb57aed77c",
}
EXPECTED_EXAMPLES = 137126  # 137122 distinct (winowhy 3, strategyqa 1 duplicates).


def _complete(root):
  return all(os.path.isdir(os.path.join(root, t)) for t in names.bigbench_tasks()) and all(
      os.path.isfile(os.path.join(root, "api", f)) for f in fetch.BIGBENCH_API_FILES)


@pytest.fixture(scope="module")
def bigbench_dir(tmp_path_factory):
  """The fetched files: the configured BIG-bench directory when complete, else a fresh fetch."""
  root = settings.get_path("BIGBENCH_DIR")
  if not _complete(root):
    cache = str(tmp_path_factory.mktemp("bigbench_cache"))
    try:
      root = fetch.fetch_bigbench(cache=cache, log=lambda _: None)
    except (RuntimeError, subprocess.CalledProcessError) as e:
      pytest.skip(f"could not fetch {fetch.BIGBENCH_PIN} from the package registry ({e}).")
  old = os.environ.get("EXPERT_T5X_BIGBENCH_DIR")
  os.environ["EXPERT_T5X_BIGBENCH_DIR"] = root
  yield root
  if old is None:
    os.environ.pop("EXPERT_T5X_BIGBENCH_DIR")
  else:
    os.environ["EXPERT_T5X_BIGBENCH_DIR"] = old


@pytest.fixture(scope="module")
def json_task(bigbench_dir, tmp_path_factory):
  """BIG-bench's `bigbench.api.json_task` module, imported from the sdist's own files."""
  pkg = tmp_path_factory.mktemp("bigbench_pkg")
  api = pkg / "bigbench" / "api"
  os.makedirs(api)
  os.makedirs(pkg / "bigbench" / "benchmark_tasks")  # Only the task registry lists it.
  for init in (pkg / "bigbench", api, pkg / "bigbench" / "benchmark_tasks"):
    (init / "__init__.py").write_text("")
  for name in fetch.BIGBENCH_API_FILES:
    with open(os.path.join(bigbench_dir, "api", name), encoding="utf-8") as f:
      (api / name).write_text(f.read())
  (api / "task_metrics.py").write_text("# Scoring metrics: not used when loading tasks.\n")
  sys.path.insert(0, str(pkg))
  try:
    from bigbench.api import json_task as module  # pylint: disable=g-import-not-at-top
    yield module
  finally:
    sys.path.remove(str(pkg))
    for name in [m for m in sys.modules if m == "bigbench" or m.startswith("bigbench.")]:
      del sys.modules[name]


class Recorded(Exception):
  """Stops JsonTask right after it hands the model its multiple-choice query (nothing to score)."""


class RecordingModel:
  """Records what BIG-bench's JsonTask asks a model to score (multiple choice), then stops it."""

  def __init__(self):
    self.calls = []

  def cond_log_prob(self, inputs, targets, absolute_normalization=False):
    del absolute_normalization
    self.calls.append((list(inputs), [[str(c) for c in t] for t in targets]))
    raise Recorded()


def bigbench_reference(json_task, bigbench_dir, task):
  """(inputs, choices, gold) per example, as BIG-bench 1.0.0 itself builds them for zero-shot."""
  loaded = json_task.JsonTask(os.path.join(bigbench_dir, task, "task.json"), shot_list=[0])
  model = RecordingModel()
  leaves = loaded.subtasks or [loaded]  # evaluate_model runs the subtasks in this order.
  for leaf in leaves:
    with pytest.raises(Recorded):
      leaf.evaluate_fixed_shot(model, num_shots=0, score=False)
  picks = {}
  out = []
  for leaf, (inputs, targets) in zip(leaves, model.calls):
    assert len(inputs) == len(leaf._ds)  # pylint: disable=protected-access
    for text, choices, sample in zip(inputs, targets, leaf._ds):  # pylint: disable=protected-access
      # default_format_fn's own gold rule, applied to the example's scores alone.
      key = tuple(sample["target_scores"].items())
      if key not in picks:
        picks[key] = json_task.default_format_fn(
            {"input": "", "target_scores": dict(key)}, input_prefix="", output_prefix="",
            choice_prefix="", random_seed=42)["target"][0]
      out.append((text, choices, choices.index(picks[key])))
  return out


def elm_reference(bigbench_dir, task):
  """(inputs, choices, gold) per example, following ELM's make_benchmarks.py (see the docstring)."""
  out = []
  for config in ELM_ORDER.get(task, [None]):
    path = os.path.join(bigbench_dir, task, *([config] if config else []), "task.json")
    with open(path, "r") as file:
      data = json.load(file)
    task_prefix = data.get("task_prefix", "")
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n choice: ")
    append_choices_to_input = data.get("append_choices_to_input", True)
    for example in data["examples"]:
      labels, target = [], None
      for label in example["target_scores"]:
        labels.append(label)
        if example["target_scores"][label] == 1 and target is None:
          target = label
      choices = choice_prefix + choice_prefix.join(labels) if append_choices_to_input else ""
      source = f"{task_prefix}{input_prefix}{example['input']}{choices}{output_prefix}"
      out.append((source, labels, labels.index(target)))
  return out


def _ours(task, suffix):
  return [(e["inputs"], e["answer_choices"], e["label_index"])
          for e in examples.load_examples(f"bigbench_{task}{suffix}", "validation")]


def _first_difference(got, want):
  for i, (g, w) in enumerate(zip(got, want)):
    if g != w:
      return f"example {i}: ours {g!r} != reference {w!r}"
  return f"{len(got)} examples, reference has {len(want)}"


def test_bigbench_format_equals_bigbench_json_task_on_every_example(bigbench_dir, json_task):
  total = 0
  for task in names.bigbench_tasks():
    want = bigbench_reference(json_task, bigbench_dir, task)
    got = _ours(task, "_bbfmt")
    assert got == want, f"{task}: {_first_difference(got, want)}"
    total += len(got)
  assert total == EXPECTED_EXAMPLES - 4


def test_elm_format_equals_make_benchmarks_on_every_example(bigbench_dir):
  total = 0
  for task in names.bigbench_tasks():
    assert bigbench.list_subtasks(task) == sorted(ELM_ORDER.get(task, []))
    assert bigbench.list_subtasks(task) == ELM_ORDER.get(task, [])  # Pooled in ELM's order.
    want = elm_reference(bigbench_dir, task)
    got = _ours(task, "")
    assert got == want, f"{task}: {_first_difference(got, want)}"
    rows = [[text, choices, choices[gold]] for text, choices, gold in got]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == ELM_OUTPUT_SHA256[task], f"{task}: differs from what ELM's script wrote"
    total += len(got)
  assert total == EXPECTED_EXAMPLES


def test_multiple_gold_rules_on_hindu_knowledge(bigbench_dir):
  """The one real example with two choices scored 1: `first` keeps it, `skip` drops and counts
  it."""
  for fmt in bigbench.FORMATS:
    first, skipped = examples.ExampleStats(), examples.ExampleStats()
    kept = list(bigbench.iter_examples("hindu_knowledge", fmt=fmt, rule="first", stats=first))
    rest = list(bigbench.iter_examples("hindu_knowledge", fmt=fmt, rule="skip", stats=skipped))
    assert (len(kept), len(rest)) == (175, 174)
    assert sum(first.kept.values()) == 1 and sum(skipped.skipped.values()) == 1
    tie = next(e for e in kept if "Vaishya" in e["inputs"])
    assert tie["targets"] == "Merchants"  # Before "Artisans" in JSON order.
    with pytest.raises(ValueError, match="2 choices share the top score"):
      list(bigbench.iter_examples("hindu_knowledge", fmt=fmt, rule="error"))
