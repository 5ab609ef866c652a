"""seqio_tasks.registry: a name registered twice is an error unless replacing is asked for."""

import pytest

pytestmark = pytest.mark.tf

import seqio  # noqa: E402

import seqio_tasks  # noqa: E402
from seqio_tasks import registry, vocab  # noqa: E402

TASK = "demo_sentiment_review"


def _register_again(**options):
  info = seqio_tasks.get_info(TASK)
  source = seqio.TaskRegistry.get(TASK).source
  registry.add_task(info, source, vocabulary=vocab.DEMO_VOCABULARY, scoring=False, **options)


def test_duplicate_task_or_mixture_registration_fails_naming_the_fix():
  before = seqio.TaskRegistry.get(TASK)
  with pytest.raises(ValueError, match=f"Task '{TASK}' is already registered; pass replace=True"):
    _register_again()
  assert seqio.TaskRegistry.get(TASK) is before  # the first registration is kept
  with pytest.raises(ValueError, match="Mixture 'demo_heldout' is already registered"):
    registry.add_mixture("demo_heldout", [TASK])


def test_replacing_is_allowed_when_asked_for():
  before = seqio.TaskRegistry.get(TASK)
  _register_again(replace=True)
  assert seqio.TaskRegistry.get(TASK) is not before and TASK in seqio.TaskRegistry.names()
