"""Routed evaluation: a composed entry whose tasks (or examples) each use their own expert, and
the plan of (chunk, tasks) passes an evaluation runs.

Without a routing every chunk scores every task. With one (RoE, per-prompt merges, oracles; see
`expert_t5x.routed_evaluation`), each task is scored only under the expert routed to it, one chunk
per expert over all of its tasks: one pass per distinct expert, not experts x tasks.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Optional, Sequence

from expert_t5x.eval_experts import BASE_ID, Chunk, ExpertSpec, make_chunks


@dataclasses.dataclass
class Routing:
  """A composed entry whose tasks (or examples) each use their own expert (RoE, merges, oracles).

  Each task is scored only under the expert it was routed to, and each expert once for all of its
  tasks (one chunk per expert), so the work is one pass per distinct expert, not experts x tasks.
  A task routed per example (instance-level RoE) is split: each expert scores only its examples.

  Attributes:
    name: the composed entry's id in results (e.g. 'roe', 'merge').
    routes: {task: id of the expert that evaluates it (an expert id of this run, or 'base'), or
      {example_id: expert id} to route each example of the task on its own}.
    expert_ids: {task: the experts recorded as used (default: those of `routes`; a merge's inputs)}.
    details: {task: JSON-able record kept with the prompt (votes, confidence, ...)}.
    info: JSON-able settings kept in results['routing'] (embedder, guard mode, ...).
  """
  name: str
  routes: Mapping[str, str | Mapping[Any, str]]
  expert_ids: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  details: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def per_example(self, task: str) -> bool:
    return not isinstance(self.routes[task], str)

  def experts_of(self, task: str) -> list[str]:
    """The distinct experts (or 'base') that evaluate `task`'s examples."""
    route = self.routes[task]
    return [route] if isinstance(route, str) else sorted(set(route.values()))

  def routed_to(self, task: str, expert_id: str, example_id: Any = None) -> bool:
    """Whether `expert_id` evaluates `task` (per-example routes: its example `example_id`)."""
    route = self.routes[task]
    return route == expert_id if isinstance(route, str) else route.get(example_id) == expert_id

  def used(self, task: str) -> list[str]:
    """The experts recorded for `task` ([] for the base)."""
    if task in self.expert_ids:
      return list(self.expert_ids[task])
    return [e for e in self.experts_of(task) if e != BASE_ID]

  def to_json(self, tasks: Sequence[str]) -> dict[str, Any]:
    def evaluated_as(t):
      if not self.per_example(t):
        return self.routes[t]
      counts = collections.Counter(self.routes[t].values())
      return {"per_example": {e: counts[e] for e in sorted(counts)}}
    return {"name": self.name, **dict(self.info),
            "tasks": {t: {"evaluated_as": evaluated_as(t), "expert_ids": self.used(t),
                          **dict(self.details.get(t, {}))} for t in tasks}}


# (chunk, the tasks it evaluates): the unit of planning.
Plan = list[tuple[Chunk, list[str]]]


def make_plan(specs: Sequence[ExpertSpec], task_names: Sequence[str], include_base: bool,
              experts_per_pass: int, routing: Optional[Routing] = None) -> Plan:
  """Every chunk on every task; with `routing`, one chunk per expert on the tasks routed to it."""
  if routing is None:
    chunks = ([Chunk([])] if include_base else []) + make_chunks(specs, experts_per_pass)
    return [(c, list(task_names)) for c in chunks]
  known = {s.id for s in specs} | {BASE_ID}
  missing = [t for t in task_names if t not in routing.routes]
  if missing:
    raise ValueError(f"Routing {routing.name!r} has no expert for tasks {missing[:5]}; route every "
                     "evaluated task.")
  experts_of = {t: routing.experts_of(t) for t in task_names}
  unknown = sorted({e for t in task_names for e in experts_of[t]} - known)
  if unknown:
    raise ValueError(f"Routing {routing.name!r} names experts {unknown[:5]} that are not among the "
                     "evaluated experts; pass their directories too.")
  if routing.name in known:
    raise ValueError(
        f"Routing entry name {routing.name!r} equals an expert id; choose another name.")
  plan: Plan = []
  base_tasks = [t for t in task_names if include_base or BASE_ID in experts_of[t]]
  if base_tasks:
    plan.append((Chunk([]), base_tasks))
  for s in specs:
    mine = [t for t in task_names if s.id in experts_of[t]]
    if mine:
      plan.append((Chunk([s]), mine))
  return plan


def check_example_routes(routing: Routing, task: str,
                         examples: Sequence[Mapping[str, Any]]) -> None:
  """A per-example routing must route exactly the examples evaluated."""
  ids = [ex["example_id"] for ex in examples]
  unrouted = [i for i in ids if i not in routing.routes[task]]
  if unrouted:
    raise ValueError(
        f"Routing {routing.name!r} routes task {task!r} per example but not its examples "
        f"{unrouted[:5]}; route every example (or the whole task).")
  unknown = sorted(set(routing.routes[task]) - set(ids), key=str)
  if unknown:
    raise ValueError(
        f"Routing {routing.name!r} routes examples {unknown[:5]} that task {task!r} does not "
        f"have here (another split or max_examples?); route only the evaluated examples.")
