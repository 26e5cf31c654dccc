"""Checks of the command line and config before any compilation or data preparation.

Each mistake becomes a `UserError` whose message is one line: what is wrong, the value, what to
do (the valid names, the closest match, the nearest valid sizes). `vit_jax.main` prints it without
a traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


class UserError(Exception):
  """A mistake in the command line or config, explained in one line."""


def _closest(name: str, choices) -> str:
  match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
  return f'did you mean {match[0]!r}? ' if match else ''


def _config_arg(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config=') :]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv: Sequence[str]) -> list[tuple[str, str | None]]:
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config.'):
      key, sep, value = arg[len('--config.') :].partition('=')
      if not sep:
        value = argv[i + 1] if i + 1 < len(argv) else None
      out.append((key, value))
  return out


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """`configs/x.py[:args]` -> its `get_config(args)`; `UserError` for a missing file or bad args."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    recipes = sorted(
      f for f in os.listdir('configs') if f.endswith('.py') and f[0] != '_' and f != 'common.py'
    )
    raise UserError(
      f'config file {path!r} not found; recipes: {", ".join(f"configs/{r}" for r in recipes)}'
      if os.path.isdir('configs')
      else f'config file {path!r} not found'
    )
  spec_ = importlib.util.spec_from_file_location('_vit_jax_recipe', path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except (ValueError, TypeError, KeyError) as e:
    raise UserError(f'{path}: {" ".join(str(e).split())}') from e


def _check_override(config: ml_collections.ConfigDict, key: str, value: str | None) -> None:
  node: Any = config
  parts = key.split('.')
  for i, part in enumerate(parts):
    fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    if part not in fields:
      where = '.'.join(parts[:i]) or 'the config'
      raise UserError(
        f'unknown config field {key!r} (--config.{key}={value}): {_closest(part, fields)}'
        f'valid fields of {where}: {", ".join(sorted(fields))}'
      )
    node = node[part]
  if value is None:
    return
  kinds = ((bool, 'a boolean (true/false)'), (int, 'an integer'), (float, 'a number'))
  for kind, words in kinds:
    if isinstance(node, kind):
      try:
        if kind is bool:
          assert value.lower() in ('true', 'false', '1', '0')
        else:
          kind(value)
      except (ValueError, AssertionError):
        raise UserError(
          f'--config.{key}={value}: {key} is {words} (now {node!r}); e.g. --config.{key}={node}'
        ) from None
      return


def explain_flags_error(argv: Sequence[str], error: Exception) -> str:
  """One line saying what is wrong with a command line that absl could not parse."""
  spec = _config_arg(argv)
  if spec is None:
    if any(a.startswith('--config.') for a in argv):
      return '--config.* overrides need a recipe: --config=configs/<recipe>.py[:args]'
  else:
    try:
      config = load_recipe(spec)
      for key, value in _overrides(argv):
        _check_override(config, key, value)
    except UserError as e:
      return str(e)
  text = ' '.join(str(error).split())
  return text.replace('FATAL Flags parsing error: ', '')


def _nearest(value: int, multiple: int) -> str:
  low = (value // multiple) * multiple
  sizes = [s for s in (low, low + multiple) if s > 0]
  return ', '.join(map(str, sizes))


def check_config(config: Mapping, workdir: str | None) -> None:
  """Catches config mistakes that would otherwise surface late (after compiling, or deep inside).

  Raises:
    UserError: unknown model, image size not divisible by the patch size, batch not divisible by
      the batch shards, missing data_dir, unwritable workdir.
  """
  import jax

  from vit_jax import models, sharding

  name = config['model_name']
  if name not in models.MODEL_CONFIGS:
    raise UserError(
      f'unknown model {name!r} (--config.model_name): {_closest(name, models.MODEL_CONFIGS)}'
      'list them with: python -m vit_jax.main --list_models'
    )
  model_config = models.get_model_config(name)
  patch = tuple(dict(config['model']).get('patches', model_config.patches.size))
  size = int(config['image_size'])
  if 'resnet' not in model_config and (size % patch[0] or size % patch[1]):
    raise UserError(
      f'image_size={size} is not divisible by the patch size {patch[0]} of {name}: '
      f'use --config.image_size= one of {_nearest(size, patch[0])} (and resize to it in pp_*)'
    )
  batch, accum = int(config['batch_size']), int(config['accum_steps'])
  mesh = sharding.make_mesh(config['mesh'])
  shards = sharding.num_batch_shards(mesh, sharding.logical_rules(config))
  step = math.lcm(shards, jax.process_count())
  if (batch // accum) % step:
    raise UserError(
      f'batch_size={batch} / accum_steps={accum} is not divisible by the {shards} batch shards '
      f'of mesh {sharding.describe(mesh)} ({jax.device_count()} devices, '
      f'{jax.process_count()} processes): use --config.batch_size= one of '
      f'{_nearest(batch, step * accum)}'
    )
  data_dir = config['data_dir']
  dataset = config['dataset']
  if data_dir and '://' not in data_dir and not dataset.startswith('synthetic'):
    if not os.path.isdir(os.path.expanduser(data_dir)):
      raise UserError(
        f'data_dir {data_dir!r} does not exist (dataset {dataset!r}): fix --config.data_dir, '
        "or leave it empty for TFDS's default ~/tensorflow_datasets"
      )
  if workdir and '://' not in workdir and jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
      with tempfile.TemporaryFile(dir=workdir):
        pass
    except OSError as e:
      raise UserError(
        f'workdir {workdir!r} is not writable ({e.strerror}): choose another --workdir or fix '
        'its permissions'
      ) from e
