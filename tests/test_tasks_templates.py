"""promptsource-format template rendering: every Jinja feature, seeding, sandboxing, errors.

Expected strings are written out by hand from promptsource 0.2.3's documented behaviour
(`}}` -> `| string | truncate(2048) }}`, `|||` protection, stripping, injected answer choices);
the network test in test_tasks_promptsource_parity.py compares with promptsource itself.
"""

import jinja2.exceptions
import pytest

from seqio_tasks import templates

FIXTURE_YAML = r"""
dataset: toy
templates:
  id-1: !Template
    answer_choices: '{{ option_a }} ||| {{ option_b }}'
    id: id-1
    jinja: 'Q: {{ question }} Options: {{ answer_choices | join(", ") }} ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      metrics:
      - Accuracy
      original_task: true
    name: with choices
    reference: ''
  id-2: !Template
    answer_choices: null
    id: id-2
    jinja: '{% for a, b in zip(xs, ys) %}{{a}}={{b}};{% endfor %} top: {{ votes | most_frequent | join("/") }} ||| {{ [''x'', ''y'', ''z''] | choice }}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics: []
      original_task: false
    name: features
    reference: ''
  id-3: !Template
    answer_choices: Yes ||| No
    id: id-3
    jinja: '{{ text }}'
    metadata: !TemplateMetadata
      original_task: null
    name: no separator
    reference: ''
  id-4: !Template
    answer_choices: Yes ||| No
    id: id-4
    jinja: 'first definition ||| x'
    name: dup
    reference: ''
  id-5: !Template
    answer_choices: Yes ||| No
    id: id-5
    jinja: 'second definition ||| {{ answer_choices[label] }}'
    name: dup
    reference: ''
  id-6: !Template
    id: id-6
    jinja: '{{ "".__class__.__mro__ }} ||| x'
    name: escape attempt
    reference: ''
"""


@pytest.fixture()
def toy():
  return templates.parse_templates(FIXTURE_YAML)


def test_answer_choices_are_rendered_first_and_injected(toy):
  row = {"question": "Which?", "option_a": " red ", "option_b": "blue", "label": 1}
  parts, choices = toy["with choices"].render(row)
  assert choices == ["red", "blue"]  # Each choice stripped.
  assert parts == ["Q: Which? Options: red, blue", "blue"]
  assert toy["with choices"].get_fixed_answer_choices_list() is None
  assert toy["dup"].get_fixed_answer_choices_list() == ["Yes", "No"]


def test_pipes_inside_values_are_protected(toy):
  row = {"question": "a ||| b", "option_a": "x|||y", "option_b": "z", "label": 0}
  parts, choices = toy["with choices"].render(row)
  assert choices == ["x|||y", "z"]
  # Example values are protected, but (as in promptsource) the injected choices are not: a
  # choice containing "|||" splits the rendering.
  assert parts == ["Q: a ||| b Options: x", "y, z", "x", "y"]
  row["option_a"] = "x"
  assert toy["with choices"].apply(row) == ["Q: a ||| b Options: x, z", "x"]


def test_values_are_truncated_to_2048_characters_at_word_boundaries(toy):
  row = {"question": "w " * 2000, "option_a": "a", "option_b": "b", "label": 0}
  inputs = toy["with choices"].apply(row)[0]
  question = inputs[len("Q: "):inputs.index(" Options:")]
  # jinja2's truncate(2048): cut at the last space within 2048 - len("...") chars, then "...".
  assert question.endswith("...") and len(question) <= 2048
  assert question == ("w " * 2000)[:2045].rsplit(" ", 1)[0] + "..."
  assert toy["with choices"].apply(row, truncate=False)[0].count("w") == 2000


def test_zip_most_frequent_and_seeded_choice(toy):
  row = {"xs": [1, 2], "ys": ["a", "b"], "votes": ["p", "q", "q", "p", "r"]}
  rng = templates.example_rng(0, "toy_features", 7)
  parts = toy["features"].apply(row, rng=rng)
  assert parts[0] == "1=a;2=b; top: p/q"
  # Same (seed, task, example id) -> same draw, whatever was drawn before.
  draws = {toy["features"].apply(row, rng=templates.example_rng(0, "toy_features", 7))[1]
           for _ in range(5)}
  assert draws == {parts[1]}
  # Different example ids draw independently (all three values show up over 60 ids).
  values = {toy["features"].apply(row, rng=templates.example_rng(0, "toy_features", i))[1]
            for i in range(60)}
  assert values == {"x", "y", "z"}


def test_no_separator_gives_one_part_and_duplicate_names_keep_the_last(toy):
  assert toy["no separator"].apply({"text": "  hello  "}) == ["hello"]
  assert toy["dup"].apply({"label": 0}) == ["second definition", "Yes"]
  assert toy["with choices"].original_task is True
  assert toy["with choices"].metrics == ("Accuracy",)


def test_sandbox_blocks_python_internals(toy):
  with pytest.raises(jinja2.exceptions.SecurityError):
    toy["escape attempt"].apply({})


def test_reserved_answer_choices_column_is_a_clear_error(toy):
  with pytest.raises(ValueError, match="answer_choices"):
    toy["dup"].apply({"label": 0, "answer_choices": "x"})


def test_bad_yaml_and_missing_files_name_the_input(tmp_path):
  with pytest.raises(ValueError, match="bad.yaml"):
    templates.parse_templates("dataset: x\n", origin="bad.yaml")
  with pytest.raises(FileNotFoundError, match="data fetch promptsource"):
    templates.load_dataset_templates(str(tmp_path / "absent"), "super_glue", "cb")
  (tmp_path / "toy").mkdir()
  (tmp_path / "toy" / "templates.yaml").write_text(FIXTURE_YAML)
  with pytest.raises(KeyError, match="no template named 'nope'"):
    templates.get_template(str(tmp_path), "toy", None, "nope")
  assert templates.get_template(str(tmp_path), "toy", None, "dup").id == "id-5"


def test_render_error_names_dataset_template_and_example():
  from seqio_tasks.sources import prompted
  broken = templates.PromptTemplate(name="divide", jinja="{{ 1 / zero }} ||| x")
  with pytest.raises(ValueError, match=r"template 'divide' of dataset toy/sub failed to render "
                     r"example 12: TypeError"):  # `zero | string` after the rewrite.
    prompted.render_row(broken, {"zero": 0}, task="toy_sub_divide", example_id=12, dataset="toy",
                        subset="sub", prompt="divide")
