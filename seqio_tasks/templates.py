"""Promptsource-format prompt templates, rendered in a sandboxed Jinja environment.

Rendering follows promptsource 0.2.3's `Template.apply(example, truncate=True)` and
`Template.get_answer_choices_list(example)` exactly (same rewrite of `}}` into a string-truncating
filter chain, same `|||` protection inside example values, same stripping, answer choices rendered
first and injected as `answer_choices`), with two deliberate differences:

* the environment is `jinja2.sandbox.SandboxedEnvironment`, so a template cannot reach Python
  internals;
* the `choice` filter draws from a `random.Random` seeded by (seed, task, example id) instead of the
  process-global generator, so a rendering does not depend on order, sharding or other threads.

Templates are read from promptsource's YAML tree (`<dir>/<dataset>[/<subset>]/templates.yaml`,
entries tagged `!Template` / `!TemplateMetadata`) without importing promptsource.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import os
import random
from typing import Any, Iterator, Mapping, Sequence

import jinja2
import jinja2.meta
import jinja2.sandbox
import yaml

# Characters kept per substituted variable (promptsource's TEXT_VAR_LENGTH).
TEXT_VAR_LENGTH = 2048
SEPARATOR = "|||"
# Stands in for "|||" inside example values while a template renders. It is one 32-character
# word, like promptsource's, because it is in place when `truncate(2048)` counts characters and
# breaks at whitespace: a sentinel of another length or shape would truncate elsewhere.
_PIPE_SENTINEL = "9b1c07e45fa2d8366e0b4c1fd3a7e52c"

_RNG: contextvars.ContextVar[random.Random | None] = contextvars.ContextVar("template_rng",
                                                                            default=None)


def _choice(choices: Sequence[Any]) -> Any:
  """Jinja filter: one element of `choices`, drawn from the rendering's seeded generator."""
  rng = _RNG.get()
  return (rng or random).choice(choices)


def _most_frequent(items: Sequence[Any]) -> list[Any] | None:
  """Jinja filter: the items that occur most often, in first-occurrence order."""
  if not items:
    return None
  counts = collections.Counter(items).most_common()
  top = counts[0][1]
  return [item for item, count in counts if count == top]


def _highlight(text: str) -> str:
  return "<span style='color: #F08080'>" + text + "</span>"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.sandbox.SandboxedEnvironment:
  """The shared sandboxed environment with promptsource's globals and filters."""
  env = jinja2.sandbox.SandboxedEnvironment(loader=jinja2.BaseLoader())
  env.globals.update(zip=zip)
  env.filters["highlight"] = _highlight
  env.filters["choice"] = _choice
  env.filters["most_frequent"] = _most_frequent
  return env


@functools.lru_cache(maxsize=4096)
def _compile_cached(source: str) -> jinja2.Template:
  return environment().from_string(source)


def _compile(source: str) -> jinja2.Template:
  """Compiles a template; those using `choice` are compiled afresh on every call.

  Jinja folds filters with constant arguments at compile time, so `{{ [1, 2] | choice }}` draws
  when the template is compiled. promptsource compiles on every `apply`; to draw from the same
  seeded generator in the same order, such templates are never served from the cache.
  """
  if "choice" in source:
    return environment().from_string(source)
  return _compile_cached(source)


def example_rng(seed: int, task: str, example_id: int) -> random.Random:
  """The generator behind `choice` for one example: a pure function of (seed, task, id)."""
  return random.Random(f"{seed}/{task}/{example_id}")


@contextlib.contextmanager
def seeded(rng: random.Random | None) -> Iterator[None]:
  """Makes `choice` draw from `rng` while rendering inside the block."""
  token = _RNG.set(rng)
  try:
    yield
  finally:
    _RNG.reset(token)


def _protect(example: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v.replace(SEPARATOR, _PIPE_SENTINEL) if isinstance(v, str) else v
          for k, v in example.items()}


def _unprotect(text: str) -> str:
  return text.replace(_PIPE_SENTINEL, SEPARATOR)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """One promptsource template: a Jinja prompt `input ||| target` and optional answer choices."""
  name: str
  jinja: str
  answer_choices: str | None = None
  original_task: bool | None = None
  choices_in_prompt: bool | None = None
  metrics: tuple[str, ...] | None = None
  id: str = ""
  reference: str = ""

  def get_answer_choices_list(self, example: Mapping[str, Any],
                              rng: random.Random | None = None) -> list[str] | None:
    """The answer choices for `example` (None when the template has none)."""
    if self.answer_choices is None:
      return None
    with seeded(rng) if rng is not None else contextlib.nullcontext():
      rendered = _compile(self.answer_choices).render(**_protect(example))
    return [_unprotect(choice.strip()) for choice in rendered.split(SEPARATOR)]

  def get_fixed_answer_choices_list(self) -> list[str] | None:
    """The answer choices when they do not depend on the example, else None."""
    if self.answer_choices is None:
      return None
    env = environment()
    if jinja2.meta.find_undeclared_variables(env.parse(self.answer_choices)):
      return None
    rendered = _compile(self.answer_choices).render()
    return [choice.strip() for choice in rendered.split(SEPARATOR)]

  def apply(self, example: Mapping[str, Any], truncate: bool = True,
            rng: random.Random | None = None) -> list[str]:
    """Renders `example`: usually `[inputs, targets]` (one element when there is no `|||`)."""
    return self.render(example, truncate=truncate, rng=rng)[0]

  def render(self, example: Mapping[str, Any], truncate: bool = True,
             rng: random.Random | None = None) -> tuple[list[str], list[str] | None]:
    """`apply` plus the answer choices that were injected into the template."""
    source = self.jinja
    if truncate:
      source = source.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
    protected = _protect(example)
    if "answer_choices" in protected:
      raise ValueError(f"template {self.name!r}: the example has a column named 'answer_choices', "
                       "which templates reserve for the rendered choices; rename that column.")
    with seeded(rng) if rng is not None else contextlib.nullcontext():
      # Same order as promptsource: compile the prompt, then render the choices, then the prompt.
      compiled = _compile(source)
      choices = self.get_answer_choices_list(example)
      protected["answer_choices"] = choices
      rendered = compiled.render(**protected)
    return [_unprotect(part).strip() for part in rendered.split(SEPARATOR)], choices


class _TemplateLoader(yaml.SafeLoader):
  """Safe YAML loader that reads promptsource's `!Template` tags as plain mappings."""


def _construct_mapping(loader: yaml.Loader, node: yaml.Node) -> dict[str, Any]:
  return loader.construct_mapping(node, deep=True)


_TemplateLoader.add_constructor("!Template", _construct_mapping)
_TemplateLoader.add_constructor("!TemplateMetadata", _construct_mapping)


def _from_record(record: Mapping[str, Any]) -> PromptTemplate:
  meta = record.get("metadata") or {}
  metrics = meta.get("metrics")
  return PromptTemplate(
      name=str(record["name"]), jinja=str(record["jinja"]),
      answer_choices=record.get("answer_choices"),
      original_task=meta.get("original_task"), choices_in_prompt=meta.get("choices_in_prompt"),
      metrics=tuple(metrics) if metrics is not None else None,
      id=str(record.get("id", "")), reference=str(record.get("reference", "")))


def parse_templates(text: str, origin: str = "<string>") -> dict[str, PromptTemplate]:
  """Parses a promptsource `templates.yaml` text into {template name: template}.

  As in promptsource, when two entries share a name the later one wins.
  """
  try:
    document = yaml.load(text, Loader=_TemplateLoader)
  except yaml.YAMLError as e:
    raise ValueError(f"{origin}: not a valid promptsource templates YAML file ({e}).") from e
  if not isinstance(document, dict) or not isinstance(document.get("templates"), dict):
    raise ValueError(f"{origin}: expected a YAML mapping with a 'templates' mapping "
                     "(promptsource's templates.yaml format).")
  by_name: dict[str, PromptTemplate] = {}
  for record in document["templates"].values():
    template = _from_record(record)
    by_name[template.name] = template
  return by_name


def load_templates_file(path: str | os.PathLike[str]) -> dict[str, PromptTemplate]:
  """Reads one promptsource-format YAML file (e.g. a user's continual-task templates)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"templates file {os.fspath(path)!r} does not exist; write it in "
                            "promptsource's templates.yaml format.")
  with open(path, encoding="utf-8") as f:
    return parse_templates(f.read(), origin=os.fspath(path))


def templates_yaml_path(templates_dir: str | os.PathLike[str], dataset: str,
                        subset: str | None) -> str:
  parts = [os.fspath(templates_dir), dataset] + ([subset] if subset else [])
  return os.path.join(*parts, "templates.yaml")


@functools.lru_cache(maxsize=512)
def _load_dataset_templates_cached(path: str, mtime: float) -> dict[str, PromptTemplate]:
  del mtime  # Part of the cache key only: a re-fetched file is read again.
  return load_templates_file(path)


def load_dataset_templates(templates_dir: str | os.PathLike[str], dataset: str,
                           subset: str | None) -> dict[str, PromptTemplate]:
  """The templates of one (dataset, subset) from a promptsource templates tree."""
  path = templates_yaml_path(templates_dir, dataset, subset)
  if not os.path.exists(path):
    if not os.path.isdir(templates_dir):
      raise FileNotFoundError(
          f"promptsource templates not found: {os.fspath(templates_dir)!r} does not exist; run "
          "`expert-t5x data fetch promptsource` or set EXPERT_T5X_PROMPTSOURCE_DIR.")
    raise FileNotFoundError(f"no promptsource templates for dataset {dataset!r} subset {subset!r}: "
                            f"{path!r} does not exist.")
  return _load_dataset_templates_cached(path, os.path.getmtime(path))


def get_template(templates_dir: str | os.PathLike[str], dataset: str, subset: str | None,
                 name: str) -> PromptTemplate:
  """One named template; an unknown name lists the dataset's template names."""
  templates = load_dataset_templates(templates_dir, dataset, subset)
  if name not in templates:
    raise KeyError(f"dataset {dataset!r} subset {subset!r} has no template named {name!r}; "
                   f"available: {sorted(templates)}.")
  return templates[name]
