"""The command line: `--config` by recipe name or file, and each flag mistake in one line.

Each mistake becomes a `UserError` whose message is one line: what is wrong, the value, what to
do (the valid names, the closest match). `vit_jax.main` prints it without a traceback. Mistakes in
the config's values are `vit_jax.config.validate`'s.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from vit_jax.config import _closest


class UserError(Exception):
  """A mistake in the command line or config, explained in one line."""


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


def recipe_names() -> list[str]:
  """The recipes installed with the library (`vit_jax.configs`): quickstart, finetune, pretrain."""
  from vit_jax import configs

  folder = os.path.dirname(configs.__file__)
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith('.py') and f[0] != '_')


def recipe_path(name: str) -> str | None:
  """The file of an installed recipe, by name ('quickstart') or 'configs/quickstart.py'; or None.

  A path that exists is the user's own file: `resolve_recipe` keeps it as it is.
  """
  from vit_jax import configs

  stem = os.path.basename(name)[: -len('.py')] if name.endswith('.py') else name
  if '/' in name and os.path.basename(os.path.dirname(name)) != 'configs':
    return None  # Another folder's file of that name is the user's own.
  if stem not in recipe_names():
    return None
  return os.path.join(os.path.dirname(configs.__file__), f'{stem}.py')


def resolve_recipe(spec: str) -> str:
  """`--config` value -> 'FILE[:args]': a file path as given, else an installed recipe by name.

  Raises:
    UserError: neither a file nor a recipe name; the line names the known recipes.
  """
  path, sep, arg = spec.partition(':')
  if os.path.isfile(path):
    return spec
  found = recipe_path(path)
  if found is None:
    raise UserError(
      f'--config={spec}: no recipe {path!r} (not a file here, not a recipe name); recipes: '
      f'{", ".join(recipe_names())} (e.g. --config=quickstart:runlocal), or a path to a .py file'
    )
  return f'{found}{sep}{arg}'


def recipe_argv(argv: Sequence[str]) -> list[str]:
  """`argv` with its `--config` value made a file path: a recipe name becomes the installed file.

  Raises:
    UserError: a `--config` that is neither a file nor a recipe name (naming the recipes).
  """
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + resolve_recipe(arg[len('--config=') :])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_recipe(out[i + 1])
  return out


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """`NAME[:args]` or `path/x.py[:args]` -> its `get_config(args)`; `UserError` for a missing
  recipe or bad args."""
  path, _, arg = resolve_recipe(spec).partition(':')
  spec_ = importlib.util.spec_from_file_location('_vit_jax_recipe', path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except (ValueError, TypeError, KeyError) as e:
    name = os.path.basename(path)
    raise UserError(f'{name}: {" ".join(str(e).split())}') from e


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
        if kind is not bool:
          kind(value)
        elif value.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(value)
      except ValueError:
        raise UserError(
          f'--config.{key}={value}: {key} is {words} (now {node!r}); e.g. --config.{key}={node}'
        ) from None
      return


def explain_flags_error(argv: Sequence[str], error: Exception) -> str:
  """One line saying what is wrong with a command line that absl could not parse."""
  spec = _config_arg(argv)
  if spec is None:
    if any(a.startswith('--config.') for a in argv):
      return '--config.* overrides need a recipe: --config=<recipe>[:args], e.g. quickstart'
  else:
    try:
      config = load_recipe(spec)
      for key, value in _overrides(argv):
        _check_override(config, key, value)
    except UserError as e:
      return str(e)
  text = ' '.join(str(error).split())
  return text.replace('FATAL Flags parsing error: ', '')


def _yaml_scalar(value) -> str:
  import json
  import re

  if isinstance(value, str) and re.fullmatch(r'[A-Za-z_][\w./+-]*', value):
    if value.lower() not in ('true', 'false', 'null', 'yes', 'no', 'on', 'off', 'none'):
      return value  # Plain: names, splits, paths.
  if isinstance(value, tuple | list):
    return '[' + ', '.join(_yaml_scalar(v) for v in value) + ']'
  return json.dumps(value)  # Quoted strings, numbers, true/false, null: valid YAML too.


def to_yaml(config: Mapping, indent: int = 0) -> str:
  """The config as plain YAML (tuples as lists, no Python tags), for `--print_config`."""
  lines = []
  for key in sorted(config):
    value, pad = config[key], ' ' * indent
    if isinstance(value, Mapping | ml_collections.ConfigDict):
      lines.append(f'{pad}{key}:' + ('' if len(value) else ' {}'))
      if len(value):
        lines.append(to_yaml(value, indent + 2))
    else:
      lines.append(f'{pad}{key}: {_yaml_scalar(value)}')
  return '\n'.join(lines)
