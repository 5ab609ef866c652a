"""Experts to evaluate: their specs, how they are grouped into passes, and the base check.

An `ExpertSpec` is an Expert format v1 directory's id and metadata (tensors are read per pass). A
`Chunk` is the unit of one scoring pass: experts of one kind and shape, stacked on a leading
`expert` axis, or the base alone (no specs). `make_chunks` groups experts into chunks of at most
`experts_per_pass`; full-delta experts go one at a time (they are folded into the base).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional, Sequence

from expert_t5x import expert_format
from expert_t5x import experts as experts_lib

PyTree = Any
BASE_ID = "base"


@dataclasses.dataclass
class ExpertSpec:
  """An expert to evaluate: its id, directory and metadata (tensors are read per chunk)."""
  id: str
  path: str
  metadata: dict[str, Any]

  @property
  def config(self) -> experts_lib.ExpertConfig:
    return experts_lib.config_from_json(self.metadata["config"])

  @property
  def stack_key(self) -> str:
    """Experts with equal keys stack: same kind and every config field but the init seed."""
    cfg = {k: v for k, v in self.metadata["config"].items() if k != "init_seed"}
    return json.dumps(cfg, sort_keys=True)

  def describe(self) -> dict[str, Any]:
    meta = self.metadata
    return {"id": self.id, "path": os.path.abspath(self.path), "type": meta["type"],
            "config": meta["config"], "content_hash": meta.get("content_hash"),
            "base": meta.get("base"), "provenance": meta.get("provenance"),
            "merge": meta.get("merge") or (meta.get("training") or {}).get("merge")}


def load_expert_specs(paths: Sequence[str], names: Optional[Sequence[str]] = None
                      ) -> list[ExpertSpec]:
  """Reads each expert's metadata; ids default to the directory names and must be unique."""
  names = list(names) if names else [os.path.basename(os.path.normpath(p)) for p in paths]
  if len(names) != len(paths):
    raise ValueError(f"{len(names)} expert names for {len(paths)} expert paths; give one name per "
                     "path or none.")
  specs, seen = [], {}
  for name, path in zip(names, paths):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"Expert directory '{path}' does not exist; pass directories written "
                              "by training, import or merge (Expert format v1).")
    if name in seen or name == BASE_ID:
      raise ValueError(f"Expert id {name!r} is used twice ('{seen.get(name, BASE_ID)}' and "
                       f"'{path}'); pass distinct names (expert_names / --expert_names).")
    seen[name] = path
    specs.append(ExpertSpec(name, path, expert_format.read_metadata(path)))
  return specs


def read_expert_list(path: str) -> list[str]:
  """Expert directories listed one per line in a text file ('#' comments, relative to the file)."""
  root = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        out.append(line if os.path.isabs(line) else os.path.join(root, line))
  return out


@dataclasses.dataclass
class Chunk:
  """Experts scored together in one pass (or the base alone: `specs` empty)."""
  specs: list[ExpertSpec]

  @property
  def ids(self) -> list[str]:
    return [s.id for s in self.specs] or [BASE_ID]

  @property
  def config(self) -> Optional[experts_lib.ExpertConfig]:
    return self.specs[0].config if self.specs else None

  @property
  def key(self) -> str:
    """The shard directory name: stable for the same experts (ids and content hashes)."""
    if not self.specs:
      return BASE_ID
    text = json.dumps([[s.id, s.metadata.get("content_hash")] for s in self.specs])
    return "experts-" + hashlib.sha256(text.encode()).hexdigest()[:16]

  def load(self) -> tuple[Optional[PyTree], bool]:
    """(expert tree, stacked): stacked when several experts share this pass."""
    if not self.specs:
      return None, False
    trees = [expert_format.load_expert(s.path)[0] for s in self.specs]
    if len(trees) == 1:
      return trees[0], False
    return experts_lib.stack_experts(trees), True


def make_chunks(specs: Sequence[ExpertSpec], experts_per_pass: int) -> list[Chunk]:
  """Groups experts that can be stacked (same kind and config) into chunks of at most
  `experts_per_pass`; full-delta experts are evaluated one at a time (they are folded)."""
  if experts_per_pass < 1:
    raise ValueError(f"experts_per_pass must be >= 1; got {experts_per_pass}.")
  groups: dict[str, list[ExpertSpec]] = {}
  for s in specs:
    groups.setdefault(s.stack_key, []).append(s)
  chunks = []
  for members in groups.values():
    size = 1 if members[0].metadata["type"] == "full" else experts_per_pass
    chunks.extend(Chunk(members[i:i + size]) for i in range(0, len(members), size))
  return chunks


def check_expert_bases(specs: Sequence[ExpertSpec], base_fingerprint: Optional[str],
                       allow_mismatch: bool = False) -> None:
  """Refuses experts trained on another base (their `base.fingerprint` differs)."""
  for s in specs:
    theirs = (s.metadata.get("base") or {}).get("fingerprint")
    if base_fingerprint and theirs and theirs != base_fingerprint:
      message = (
          f"Expert {s.id!r} ('{s.path}') was trained on base {theirs[:16]}... but the "
          f"evaluated base is {base_fingerprint[:16]}...; pass the base checkpoint it was "
          "trained on, or allow_base_mismatch=True (--allow_base_mismatch) to evaluate anyway.")
      if not allow_mismatch:
        raise ValueError(message)
      logging.warning("%s", message)


def expert_chunk(expert_dir: str, expert_id: str) -> Chunk:
  """A chunk of the one expert directory `expert_dir`, recorded under `expert_id`."""
  return Chunk(load_expert_specs([expert_dir], [expert_id]))
