"""Device mesh, logical-axis rules, and sharding of params and batches.

Params carry logical axis names (`embed`, `heads`, `mlp`, ...); a list of
(logical name, mesh axes) rules from the config maps them onto a mesh with axes
(`data`, `fsdp`, `tensor`). Changing the parallelism of a run is a config
change, never a code change.
"""

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Params: FSDP over the model dimension, tensor parallelism over heads, MLP and
# vocab. Activations: batch over data x fsdp, heads and MLP over tensor.
DEFAULT_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the one -1 entry by the number of devices left over."""
  shape = [int(s) for s in mesh_shape]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, {num_devices} are present")
  return tuple(shape)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices; -1 in `mesh_shape` means "the rest"."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} and axis names {tuple(axis_names)} differ in length")
  # Auto axes: shardings flow from jit in/out shardings and logical constraints.
  return jax.make_mesh(shape, tuple(axis_names), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def mesh_from_config(config) -> jax.sharding.Mesh:
  """`config.mesh.shape` / `config.mesh.axes` -> Mesh."""
  return make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes))


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules` as a tuple of (logical, mesh axes) pairs; DEFAULT_RULES when absent."""
  rules = config.mesh.get("rules", None) if "mesh" in config else None
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_to_shardings(logical_specs: Any, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Any:
  """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(shapes: Any, shardings: Any) -> None:
  """Raises naming the param whose dimension the mesh cannot split evenly."""
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, shape), sharding in zip(flat_shapes, flat_shardings):
    for dim, axes in zip(shape.shape, sharding.spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if dim % size:
        raise ValueError(f"param {jax.tree_util.keystr(path)} of shape {shape.shape}: dimension {dim} "
                         f"is not divisible by mesh axes {axes} of size {size}; change config.mesh.rules")


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch-first arrays of any rank split over the data-parallel axes (data x fsdp), the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def check_batch_split(mesh: jax.sharding.Mesh, rows: int, field: str) -> None:
  """Raises naming `field` when a global batch of `rows` cannot be split evenly over the batch axes: at
  start-up, not when the first batch is placed after the model is loaded and compiled."""
  split = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
  if rows % split:
    raise ValueError(f"{field}={rows} is not divisible by the mesh's batch axes (data x fsdp = {split}); "
                     "change it or config.mesh.shape")


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a global host batch on the mesh, split over the batch axis.

  Every process builds the same global batch (data order is a pure function of
  (seed, step)); each one then transfers only the rows of its own devices, so a
  run gives the same result on one host or many.
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, batch)


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly batch-sharded) arrays; on several processes each gets the whole array."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Context in which the model's logical activation constraints take effect.

  Enter it around the *call* of a jitted step (tracing happens there), not inside it.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts multi-host JAX when asked for; returns whether it did.

  TPU VM pods are detected automatically (`jax.distributed.initialize()` with no
  arguments). Elsewhere pass the coordinator explicitly, or set
  SAFE_COMPLETION_DISTRIBUTED=1 to let JAX auto-detect (SLURM, etc.). Single-host
  runs skip it, so CPU tests and colabs stay simple.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
  if os.environ.get("SAFE_COMPLETION_DISTRIBUTED") == "1" or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()
    return True
  return False
