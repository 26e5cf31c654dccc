"""Whether a fine-tuning source (`config.pretrained_path`) fits the run's model, from shapes alone.

Called by `vit_jax.config.validate` before any data is prepared: the checkpoint's array shapes
(an `.npz`'s headers, never its data; a workdir's orbax metadata) against `jax.eval_shape` of the
model. What `npz.load_pretrained` adapts is allowed: a new head, a dropped or fresh pre-logits
layer, resized position embeddings and a resized patch embedding. The first other mismatch is one
line naming both shapes and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np

from vit_jax.config import ConfigError

_LEGACY_PREFIX = 'opt/target/'  # As vit_jax.npz: very old releases nest params under it.
_ADAPTED = ('head/', 'pre_logits/')  # Replaced or re-initialized when fine-tuning.


def _open(path: str):
  if '://' in path:
    import tensorflow as tf

    return tf.io.gfile.GFile(path, 'rb')
  return open(path, 'rb')


def _exists(path: str) -> bool:
  if '://' in path:
    import tensorflow as tf

    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def workdir_config(path: str) -> dict | None:
  """A training workdir's config.json as a dict; None when `path` is not a workdir."""
  if path.endswith('.npz'):
    return None
  config_path = os.path.join(path, 'config.json')
  if not _exists(config_path):
    return None
  with _open(config_path) as f:
    return json.load(f)


def npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of an `.npz`, read from the array headers only (no data, no pickles)."""
  out = {}
  with _open(path) as f, zipfile.ZipFile(f) as archive:
    for name in archive.namelist():
      if not name.endswith('.npy'):
        continue
      with archive.open(name) as member:
        major, _ = np.lib.format.read_magic(member)
        read = (
          np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(member)
      if dtype.hasobject:
        raise ConfigError(
          f'pretrained_path {path!r} holds pickled objects; refusing it: fix --config.'
          'pretrained_path'
        )
      out[name[: -len('.npy')]] = tuple(shape)
  if out and all(k.startswith(_LEGACY_PREFIX) for k in out):
    out = {k[len(_LEGACY_PREFIX) :]: v for k, v in out.items()}
  return out


def workdir_shapes(workdir: str) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of the params of a workdir's latest checkpoint, from orbax's metadata."""
  import jax
  import orbax.checkpoint as ocp

  directory = os.path.join(workdir, 'checkpoints')
  if '://' not in directory:
    directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise ConfigError(
      f'pretrained_path {workdir!r} is a workdir without a checkpoint yet: train it first, or '
      'fix --config.pretrained_path'
    )
  path = os.path.join(directory, str(step), 'state')
  tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  leaves = jax.tree_util.tree_flatten_with_path(tree.get('params', tree))[0]
  out = {}
  for keys, leaf in leaves:
    parts = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in keys]
    if len(parts) > 1 and parts[-1] == 'value':  # A boxed (logically partitioned) leaf.
      parts = parts[:-1]
    out['/'.join(parts)] = tuple(getattr(leaf, 'shape', ()) or ())
  return _unscan(out)


def adopt_workdir_architecture(config) -> None:
  """`pretrained_path=WORKDIR`: the run's architecture becomes the workdir's (logged once)."""
  from vit_jax import config as config_lib

  path = config['pretrained_path']
  stored = workdir_config(path) if path else None
  if stored is None:
    return
  model = dict(stored.get('model') or {})
  changes = {f'model.{k}': model.get(k) for k in config_lib.ARCHITECTURE if k in config['model']}
  changes = {'model_name': stored['model_name'], **changes}
  changed = []
  for key, value in changes.items():
    value = tuple(value) if isinstance(value, list) else value
    if config_lib.get_field(config, key) != value:
      changed.append(f'{key}={value!r}')
      parent = config['model'] if key.startswith('model.') else config
      parent[key.removeprefix('model.')] = value
  if changed:
    logging.info('pretrained_path %s: its architecture, %s', path, ', '.join(changed))


def _unscan(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
  """Scanned blocks (`encoderblock/...`, layer axis first) as the released `encoderblock_{i}`."""
  out = {}
  for key, shape in shapes.items():
    if '/encoderblock/' not in key:
      out[key] = shape
      continue
    for i in range(shape[0]):
      out[key.replace('/encoderblock/', f'/encoderblock_{i}/')] = shape[1:]
  return out


def _fits(key: str, got: tuple, want: tuple) -> bool:
  if got == want:
    return True
  if key.endswith('pos_embedding'):  # Resized to the new grid (same width).
    return got[-1:] == want[-1:]
  if key in ('embedding/kernel', 'stem/kernel'):  # Resized patch (FlexiViT), same channels.
    return got[2:] == want[2:]
  return len(want) == 1 and got[-1:] == want  # GroupNorm stored as (1, 1, 1, C).


def _architecture(shapes: Mapping[str, tuple]) -> str:
  """The width, depth and MLP width a checkpoint's shapes say, and a registered model with them."""
  from vit_jax import models

  width = shapes.get('Transformer/encoder_norm/scale', (None,))[0]
  depth = len({m.group(1) for k in shapes if (m := re.search(r'encoderblock_(\d+)/', k))})
  mlp = shapes.get('Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel', (None, None))[1]
  if width is None:
    return ''
  names = [
    name
    for name, c in models.MODEL_CONFIGS.items()
    if c.get('hidden_size') == width
    and c.transformer.num_layers == depth
    and c.transformer.mlp_dim == mlp
    and (c.get('resnet') is not None) == any(k.startswith('conv_root') for k in shapes)
  ]
  what = f'width {width}, {depth} layers, MLP {mlp}'
  if names:
    return f'{what}: set --config.model_name={names[0]}'
  return (
    f'{what}: set --config.model.hidden_size={width} --config.model.num_layers={depth} '
    f'--config.model.mlp_dim={mlp} (and num_heads)'
  )


def check_fits(config: Mapping) -> None:
  """Raises one `ConfigError` line when `config.pretrained_path` fits the run's model nowhere.

  Raises:
    ConfigError: a missing path, a workdir without checkpoints, or the first array the model and
      the checkpoint disagree on (both shapes, and the model that fits).
  """
  from flax import traverse_util

  from vit_jax import config as config_lib
  from vit_jax import models

  path = config['pretrained_path']
  if not _exists(path):
    raise ConfigError(f'pretrained_path {path!r} does not exist: fix --config.pretrained_path')
  is_workdir = workdir_config(path) is not None
  try:
    shapes = workdir_shapes(path) if is_workdir else npz_shapes(path)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(
      f'pretrained_path {path!r} is neither a workdir (no config.json) nor a readable .npz '
      f'({type(e).__name__}): fix --config.pretrained_path'
    ) from None
  name = config['model_name']
  kwargs = config_lib.model_kwargs(config)
  if models.model_family(name) != 'mixer':
    kwargs.update(scan_layers=False, remat_policy='none')  # The released layout.
  size = int(config['image_size'])
  model = models.abstract_model(name, 1, image_size=size, **kwargs)
  want = traverse_util.flatten_dict(models.params_of(model), sep='/')
  got = {k: v for k, v in shapes.items() if not k.startswith(_ADAPTED)}
  want = {k: tuple(v.shape) for k, v in want.items() if not k.startswith(_ADAPTED)}
  where = os.path.basename(path.rstrip('/')) or path
  problem = None
  for key in sorted(want):
    if key not in got:
      problem = f'the model has {key} {want[key]}, the checkpoint has not'
    elif not _fits(key, got[key], want[key]):
      problem = f'{key} is {got[key]} in the checkpoint, {want[key]} in the model'
    if problem:
      break
  extra = sorted(set(got) - set(want))
  if problem is None and extra:
    problem = f'the checkpoint has {extra[0]} {got[extra[0]]}, the model has not'
  if problem is None:
    return
  hint = _architecture(got) or 'set --config.model_name / --config.model.* to its architecture'
  raise ConfigError(f'pretrained_path {where} does not fit {name}: {problem}; it has {hint}')
