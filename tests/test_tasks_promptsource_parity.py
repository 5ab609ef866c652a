"""Rendering parity with promptsource 0.2.3's own `Template.apply` on all 113 held-out prompts.

Compares with an independent implementation: promptsource's `templates.py` imported from the
`promptsource==0.2.3` sdist (fetched from the package registry; skipped when offline), rendering
the sdist's own YAML templates over fixture rows with the Hugging Face columns of each dataset.
"""

import importlib.util
import os
import random
import subprocess
import sys
import tarfile
import types

import pytest

pytestmark = [pytest.mark.network, pytest.mark.tf]

LONG = "word " * 600  # > 2048 characters: exercises the truncate(2048) rewrite.

ROWS = {
    ("hellaswag", None): [
        {
            "ind": 24, "activity_label": "Roof shingle removal",
            "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
            "ctx": "A man is sitting on a roof. he", "endings": [
                "is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."
            ], "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain",
            "label": "3"
        },
        {
            "ind": 92, "activity_label": "Clean ||| and jerk",
            "ctx_a": "A lady walks ||| to a barbell.", "ctx_b": "she",
            "ctx": "A lady walks ||| to a barbell. she " + LONG,
            "endings": ["swings the bar.", "lifts it over her head.", "drops it.", "sits down."],
            "source_id": "x", "split": "val", "split_type": "zeroshot", "label": "1"
        },
    ],
    ("story_cloze", "2016"): [
        {
            "story_id": "b929f263", "input_sentence_1": "Rick grew up in a troubled household.",
            "input_sentence_2": "He never found good support in family, and turned to gangs.",
            "input_sentence_3": "It wasn't long before Rick got shot in a robbery.",
            "input_sentence_4": "The incident caused him to turn a new leaf.",
            "sentence_quiz1": "He is happy now.", "sentence_quiz2": "He joined a gang.",
            "answer_right_ending": 1
        },
        {
            "story_id": "7cbbc0af", "input_sentence_1": "Laverne needs ||| to prepare.",
            "input_sentence_2": "She gets out the ingredients.",
            "input_sentence_3": "She mixes them.", "input_sentence_4": "She bakes them.",
            "sentence_quiz1": "They burn.", "sentence_quiz2": "They taste great.",
            "answer_right_ending": 2
        },
    ],
    ("anli", None): [
        {
            "uid": "0fd0abfb", "premise": "The Parma trolleybus system forms part of the public "
                                          "transport network of the city of Parma.",
            "hypothesis": "Parma has trolleybuses.", "label": 0, "reason": ""
        },
        {
            "uid": "7ed72ff4", "premise": "Toni Tu ||| is an actor. " + LONG,
            "hypothesis": "Toni is a singer.", "label": 1, "reason": ""
        },
        {
            "uid": "5d2930a3", "premise": "It rained.", "hypothesis": "The ground is dry.",
            "label": 2, "reason": ""
        },
    ],
    ("super_glue", "copa"): [
        {
            "premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
            "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0
        },
        {
            "premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
            "choice2": "He got a hole in his sock.", "question": "effect", "idx": 1, "label": 1
        },
    ],
    ("super_glue", "cb"): [
        {
            "premise": "It was a complex language. Not written down but handed down.",
            "hypothesis": "the language was peeled down", "idx": 0, "label": 0
        },
        {"premise": "Maybe ||| not.", "hypothesis": "It is not.", "idx": 1, "label": 2},
        {"premise": "He left.", "hypothesis": "He stayed.", "idx": 2, "label": 1},
    ],
    ("super_glue", "rte"): [
        {
            "premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
            "hypothesis": "Weapons of Mass Destruction Found in Iraq.", "idx": 0, "label": 1
        },
        {"premise": "A place of sorrow.", "hypothesis": "Sorrow.", "idx": 1, "label": 0},
    ],
    ("super_glue", "wsc.fixed"): [
        {
            "text": "Mark told Pete many lies about himself, which Pete included in his book. He "
                    "should have been more skeptical.", "span1_index": 0, "span2_index": 13,
            "span1_text": "Mark", "span2_text": "He", "idx": 0, "label": 0
        },
        {
            "text": "The trophy doesn't fit into the suitcase because it is too large.",
            "span1_index": 1, "span2_index": 9, "span1_text": "The trophy", "span2_text": "it",
            "idx": 1, "label": 1
        },
    ],
    ("super_glue", "wic"): [
        {
            "word": "place", "sentence1": "Do you want to come over to my place later?",
            "sentence2": "A political system with no place for the less prominent groups.",
            "start1": 31, "start2": 27, "end1": 36, "end2": 32, "idx": 0, "label": 0
        },
        {
            "word": "bank", "sentence1": "He sat on the bank.", "sentence2": "The river bank.",
            "start1": 14, "start2": 10, "end1": 18, "end2": 14, "idx": 1, "label": 1
        },
    ],
    ("winogrande", "winogrande_xl"): [
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder "
                        "cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"
        },
        {
            "sentence": "The cup did not fit in the box because _ was too big.", "option1": "cup",
            "option2": "box", "answer": "2"
        },
    ],
}


@pytest.fixture(scope="module")
def promptsource_sdist(tmp_path_factory):
  """promptsource 0.2.3 unpacked: (templates.py module, templates directory)."""
  dest = tmp_path_factory.mktemp("promptsource")
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python",
         "promptsource==0.2.3", "-d", str(dest)]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    pytest.skip("could not download promptsource==0.2.3 from the package registry "
                f"({result.stderr.strip().splitlines()[-1:]}); run with registry access.")
  sdist = next(dest.glob("promptsource-0.2.3.tar.gz"))
  with tarfile.open(sdist) as tar:
    tar.extractall(dest, filter="data")
  package = dest / "promptsource-0.2.3" / "promptsource"
  # Stub the imports templates.py needs only for features the test does not use.
  stubs = {"pandas": types.ModuleType("pandas"), "pkg_resources": types.ModuleType("pkg_resources")}
  stubs["pkg_resources"].resource_filename = lambda _, name: str(package / name)
  saved = {k: sys.modules.get(k) for k in stubs}
  sys.modules.update(stubs)
  try:
    spec = importlib.util.spec_from_file_location("promptsource_templates_023",
                                                  package / "templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  return module, str(package / "templates")


def _heldout():
  from seqio_tasks import names
  return names.heldout_prompts()


def test_all_113_heldout_prompts_render_like_promptsource(promptsource_sdist):
  ps, templates_dir = promptsource_sdist
  from seqio_tasks import templates
  specs = _heldout()
  assert len(specs) == 113
  compared = 0
  for spec in specs:
    ours = templates.get_template(templates_dir, spec.dataset, spec.subset, spec.prompt)
    theirs = ps.DatasetTemplates(spec.dataset, spec.subset)[spec.prompt]
    for example_id, row in enumerate(ROWS[(spec.dataset, spec.subset)]):
      # promptsource's `choice` uses the global generator: seed it exactly as ours is seeded.
      random.seed(f"0/{spec.task}/{example_id}")
      expected = theirs.apply(dict(row), truncate=True)
      random.seed(f"0/{spec.task}/{example_id}")
      expected_choices = theirs.get_answer_choices_list(dict(row))
      got, got_choices = ours.render(row, rng=templates.example_rng(0, spec.task, example_id))
      assert got == expected, (spec.task, example_id)
      assert got_choices == expected_choices, (spec.task, example_id)
      compared += 1
  assert compared >= 226


def test_all_409_prompt_names_resolve_in_promptsource(promptsource_sdist):
  ps, templates_dir = promptsource_sdist
  from seqio_tasks import names
  specs = names.train_prompts() + names.heldout_prompts()
  assert len(specs) == 409
  for spec in specs:
    template = ps.DatasetTemplates(spec.dataset, spec.subset)[spec.prompt]
    # Shipped metadata (answer choices present, original_task) agrees with promptsource's YAML.
    assert (template.answer_choices is not None) == spec.answer_choices, spec.task
    assert template.metadata.original_task == spec.original_task, spec.task


def test_fetch_promptsource_unpacks_templates(promptsource_sdist, tmp_path):
  _, templates_dir = promptsource_sdist
  from seqio_tasks import fetch
  sdist = next(p for p in (tmp_path.parent.parent).rglob("promptsource-0.2.3.tar.gz"))
  target = tmp_path / "promptsource" / "templates"
  count = fetch.extract_promptsource_templates(str(sdist), str(target))
  expected = sum(1 for _, _, files in os.walk(templates_dir) for f in files
                 if f == "templates.yaml")
  assert count == expected
  assert (target / "super_glue" / "cb" / "templates.yaml").read_bytes() == (
      open(os.path.join(templates_dir, "super_glue", "cb", "templates.yaml"), "rb").read())
