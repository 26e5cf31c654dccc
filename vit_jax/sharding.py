"""Device mesh, logical-axis rules and global arrays for sharded training.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
parameters and optimizer state are sharded too, ZeRO-3 style) and `tensor` (Megatron-style model
parallelism over MLP and attention heads). The models name their axes logically (`embed`, `mlp`,
`heads`, `kv`, `batch`, `seq`, `classes`, `layers`); `DEFAULT_RULES` maps those names onto the mesh,
so switching DP -> FSDP -> FSDP x tensor is a change of `config.mesh`, never of code.

For multi-slice TPU jobs `dcn_data` / `dcn_fsdp` give the number of slices along each axis: the mesh
is then built with `mesh_utils.create_hybrid_device_mesh`, keeping slow DCN hops on the outer axes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis name -> mesh axes. Activations and parameters share names; flax assigns each mesh
# axis at most once per array, so an activation ('batch', 'seq', 'embed') gets batch over
# (data, fsdp) and an unsharded embed, while a parameter ('embed', 'mlp') gets embed over fsdp and
# mlp over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ('batch', ('data', 'fsdp')),
  ('embed', 'fsdp'),
  ('mlp', 'tensor'),
  ('heads', 'tensor'),
  ('kv', None),
  ('classes', None),
  ('seq', None),
  ('layers', None),
)


def logical_rules(config=None) -> tuple[tuple[str, Any], ...]:
  """The rules from `config.logical_rules` (pairs), or `DEFAULT_RULES` when empty/absent."""
  rules = config.get('logical_rules') if config is not None else None
  if not rules:
    return DEFAULT_RULES
  out = []
  for pair in rules:
    if len(pair) != 2:
      raise ValueError(f'logical_rules entries must be (name, mesh_axes) pairs, got {pair!r}')
    name, axes = pair
    flat = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
    bad = [a for a in flat if a is not None and a not in MESH_AXES]
    if bad:
      raise ValueError(
        f'logical rule {name!r} names unknown mesh axes {bad}; mesh axes: {MESH_AXES}'
      )
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def _axis_sizes(mesh_config: Mapping, num_devices: int) -> tuple[int, int, int]:
  sizes = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
      f'mesh axis sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}'
    )
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
        f'{num_devices} devices cannot be split into a mesh with fixed axes '
        f'{dict(zip(MESH_AXES, sizes))}; make the product of the fixed sizes divide {num_devices}'
      )
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are '
      'available; set one axis to -1 (config.mesh.data=-1) to use them all'
    )
  return tuple(sizes)


def make_mesh(mesh_config: Mapping, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh from `config.mesh`.

  Args:
    mesh_config: `data`, `fsdp`, `tensor` sizes (one may be -1: all remaining devices), and optional
      `dcn_data`, `dcn_fsdp`: how many slices (DCN-connected groups) each axis spans.
    devices: devices to use (default: all of them, every process).

  Returns:
    A `Mesh` whose axes are Auto-sharded, usable with `NamedSharding` and `jax.jit`.

  Raises:
    ValueError: sizes that do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = _axis_sizes(mesh_config, len(devices))
  dcn = (int(mesh_config.get('dcn_data', 1)), int(mesh_config.get('dcn_fsdp', 1)), 1)
  if math.prod(dcn) > 1:
    for name, size, slices in zip(MESH_AXES, sizes, dcn):
      if size % slices:
        raise ValueError(f'mesh axis {name}={size} is not divisible by its {slices} DCN slices')
    ici = tuple(s // d for s, d in zip(sizes, dcn))
    if devices[0].platform == 'cpu':
      # No slices on CPU: consecutive device groups play the slices (each axis = dcn x ici).
      array = np.asarray(devices, dtype=object).reshape(dcn + ici)
      array = array.transpose(0, 3, 1, 4, 2, 5).reshape(sizes)
    else:
      # TPU: slices are real (`slice_index`); GPU clusters: each process (host) is a granule.
      array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices=devices, process_is_granule=not hasattr(devices[0], 'slice_index')
      )
  elif len(devices) == len(jax.devices()) and jax.devices()[0].platform in ('tpu', 'gpu'):
    array = mesh_utils.create_device_mesh(sizes, devices=devices)
  else:
    array = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(array, MESH_AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str = '') -> P:
  """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
  parts = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, axes in zip(shape, parts):
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in flat)
    if flat and dim % size:
      logging.info(
        'sharding: %s dim %d not divisible by %s=%d; replicating it', name, dim, flat, size
      )
      out.append(None)
    else:
      out.append(axes)
  return P(*out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Unboxed leaves (step counters, rng keys) are replicated. A mesh axis that does not divide the
  dimension it is mapped to is dropped for that array, so tiny test models still shard.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.unbox(abstract_tree)

  def one(path, spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec else P()
    return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

  return jax.tree_util.tree_map_with_path(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def box(params: Any, axes: Any) -> Any:
  """Wraps each array of a params tree with its logical axis names (`models.logical_axes`), so
  `logical_shardings` (and optimizer states built from the boxes) know how to shard it."""
  return jax.tree.map(lambda x, names: nn.LogicallyPartitioned(x, names), params, axes)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names under the active mesh and rules
  (`jax.set_mesh` + `logical_axis_rules`); the identity outside them."""
  return nn.with_logical_constraint(x, names)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """The mesh and logical rules under which `constrain` applies: wrap every trace of the model
  (the training step, the evaluators' programs) in it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh, rules, ndim_prefix: int = 0) -> NamedSharding:
  """Sharding of a batch: dimension `ndim_prefix` over the mesh axes of logical 'batch'."""
  axes = nn.logical_to_mesh_axes(('batch',), rules)[0]
  return NamedSharding(mesh, P(*([None] * ndim_prefix), axes))


def num_batch_shards(mesh: Mesh, rules) -> int:
  axes = nn.logical_to_mesh_axes(('batch',), rules)[0]
  flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in flat)


def global_batch(
  local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules, *, ndim_prefix: int = 0
) -> dict[str, jax.Array]:
  """Turns this process's share of a batch into global `jax.Array`s sharded over 'batch'.

  Args:
    local_batch: numpy arrays whose dimension `ndim_prefix` is this process's rows.
    mesh: the training mesh.
    rules: logical-axis rules.
    ndim_prefix: leading dimensions kept whole (1 for [accum_steps, micro_batch, ...]).

  Returns:
    dict of global arrays with `process_count` times the local rows.
  """
  sharding = batch_sharding(mesh, rules, ndim_prefix)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def to_global(tree: Any, shardings: Any) -> Any:
  """Places host numpy arrays (full copies on every process) onto `shardings`, multi-host safe."""

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


def describe(mesh: Mesh) -> str:
  return ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
