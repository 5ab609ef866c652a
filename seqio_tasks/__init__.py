"""SeqIO tasks of the paper: T0 prompts (P3 / promptsource), BIG-bench, continual,
compositional, synthetic demo.

Importing this package registers every task and mixture with seqio (and with the provenance side
registry). Registration reads only the package's own grid data: no vocabulary, template or dataset
file is opened and nothing touches the network until a task is used.
"""

from seqio_tasks import bigbench_tasks
from seqio_tasks import compositional_tasks
from seqio_tasks import continual_tasks
from seqio_tasks import demo
from seqio_tasks import mixtures
from seqio_tasks import names
from seqio_tasks import provenance
from seqio_tasks import t0
from seqio_tasks import vocab
from seqio_tasks.examples import load_examples
from seqio_tasks.examples import make_example
from seqio_tasks.mixtures import suite
from seqio_tasks.provenance import TaskInfo

T0_TASKS = t0.register_all()
BIGBENCH_TASKS = bigbench_tasks.register_all()
CONTINUAL_TASKS = continual_tasks.register_all()
COMPOSITIONAL_TASKS = compositional_tasks.register_all()
DEMO_TASKS = demo.register_all()
MIXTURES = mixtures.register_all()


def get_info(name: str) -> TaskInfo:
  """Provenance of a registered task (unknown names suggest close ones)."""
  return provenance.get(name)
