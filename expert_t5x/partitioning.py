"""Declared sharding: logical axis rules, the ('data', 'model') mesh, and jit with shardings.

Every parameter and main activation of the network carries logical axis names; one rules table maps
them to mesh axes. The same code runs on one CPU, 8 fake CPU devices, a GPU and a TPU slice.
Unlike T5X on CPU, `num_partitions` is honoured everywhere (tests use it with fake devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
from flax.core import unfreeze
from flax.linen import partitioning as nn_partitioning
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from expert_t5x import trees
from expert_t5x import validation

PyTree = Any
LogicalRules = Sequence[tuple[str, Optional[str]]]
DATA_AXIS, MODEL_AXIS = "data", "model"


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Optional[LogicalRules] = None) -> LogicalRules:
  """T5X's standard rules (1/1: data parallel + Megatron-style model parallel) plus expert axes.

  `expert`, `adapter` and `lora_rank` (expert-only dimensions) are replicated: experts are small,
  and replicating them keeps every example's expert local to its data shard.
  """
  if activation_partitioning_dims not in (1, 2) or parameter_partitioning_dims not in (1, 2):
    raise ValueError("activation/parameter_partitioning_dims must be 1 or 2; got "
                     f"{activation_partitioning_dims}/{parameter_partitioning_dims}.")
  rules: list[tuple[str, Optional[str]]] = []
  if activation_partitioning_dims == 2:
    rules.append(("embed", MODEL_AXIS))
  if parameter_partitioning_dims == 2:
    rules.append(("embed", DATA_AXIS))
  rules += [
      ("batch", DATA_AXIS), ("vocab", MODEL_AXIS), ("embed", None), ("mlp", MODEL_AXIS),
      ("heads", MODEL_AXIS), ("kv", None), ("joined_kv", MODEL_AXIS),
      ("relpos_buckets", None), ("abspos_buckets", None), ("length", None), ("layers", None),
      ("stack", None), ("mlp_activations", None),
      ("expert", None), ("adapter", None), ("lora_rank", None),
  ]
  return list(additional_rules or []) + rules


def make_mesh(num_partitions: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `(data, model)` mesh over all (global) devices with `num_partitions` along `model`.

  Axis types are Auto: `jax.make_mesh`'s default (Explicit) turns sharding constraints into
  assertions.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_partitions < 1 or len(devices) % num_partitions:
    raise validation.UsageError(
        f"num_partitions={num_partitions} must divide the {len(devices)} devices; set "
        "num_partitions to a divisor of the device count.")
  grid = np.array(devices).reshape(len(devices) // num_partitions, num_partitions)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def params_logical_axes(variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """Flat `{param path: logical axis names}` from a variables dict's `params_axes` collection."""
  axes = unfreeze(nn_partitioning.get_axis_names(variables["params_axes"]))
  return {k: tuple(v) for k, v in trees.flatten(axes).items()}


def logical_axes_tree(params: PyTree, flat_axes: Mapping[str, tuple[str, ...]]) -> PyTree:
  """The params tree with each leaf replaced by its logical `PartitionSpec`."""
  flat = trees.flatten(unfreeze(params))
  missing = sorted(set(flat) - set(flat_axes))
  if missing:
    raise ValueError(f"No logical axes for parameters {missing[:5]}; every parameter must be "
                     "declared with axis names.")
  return trees.unflatten({k: PartitionSpec(*flat_axes[k]) for k in flat})


def logical_to_mesh_sharding(logical_specs: PyTree, mesh: Mesh, rules: LogicalRules) -> PyTree:
  """Maps a tree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`."""
  def to_sharding(spec):
    mesh_spec = nn_partitioning.logical_to_mesh_axes(tuple(spec), rules)
    return NamedSharding(mesh, mesh_spec)
  return jax.tree.map(to_sharding, logical_specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


@dataclasses.dataclass
class PjitPartitioner:
  """T5X-style partitioner: a mesh, logical rules, and `partition(fn, in, out)` = jax.jit.

  Args:
    num_partitions: devices per model-parallel group (along the `model` mesh axis).
    logical_axis_rules: defaults to `standard_logical_axis_rules()`.
  """
  num_partitions: int = 1
  logical_axis_rules: Optional[LogicalRules] = None
  devices: Optional[Sequence[jax.Device]] = None

  def __post_init__(self):
    validation.positive_int(validation.label(self, "num_partitions"), self.num_partitions,
                            "it is the number of model-parallel devices")
    self.rules = list(self.logical_axis_rules or standard_logical_axis_rules())
    self.mesh = make_mesh(self.num_partitions, self.devices)

  @property
  def data_partition_spec(self) -> PartitionSpec:
    return PartitionSpec(DATA_AXIS)

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.data_partition_spec)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape[DATA_AXIS]

  def get_data_layout(self, batch_size: int) -> tuple[int, int]:
    """(shard_id, num_shards) of this host's slice of the global batch."""
    if batch_size % self.data_parallel_size:
      raise ValueError(f"Batch size {batch_size} is not divisible by the data-parallel size "
                       f"{self.data_parallel_size}; choose a multiple of it.")
    return jax.process_index(), jax.process_count()

  def sharding_for(self, logical_specs: PyTree) -> PyTree:
    return logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

  def partition(self, fn: Callable[..., Any], in_shardings: Any, out_shardings: Any,
                static_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = ()) -> Callable:
    """`jax.jit` with shardings, run under the mesh and the logical axis rules."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     static_argnums=tuple(static_argnums), donate_argnums=tuple(donate_argnums))

    def call(*args, **kwargs):
      with jax.set_mesh(self.mesh), nn_partitioning.axis_rules(self.rules):
        return jitted(*args, **kwargs)
    call.lower = lambda *a, **k: _lower(jitted, self, *a, **k)
    return call


def _lower(jitted, partitioner: PjitPartitioner, *args, **kwargs):
  with jax.set_mesh(partitioner.mesh), nn_partitioning.axis_rules(partitioner.rules):
    return jitted.lower(*args, **kwargs)
