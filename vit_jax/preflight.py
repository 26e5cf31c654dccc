"""The command line: `--config` by recipe name or file, and each flag mistake in one line.

Each mistake becomes a `UserError` whose message is one line: what is wrong, the value, what to
do (the valid names, the closest match). `vit_jax.main` prints it without a traceback. Mistakes in
the config's values are `vit_jax.config.validate`'s.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Sequence
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


def recipe_argv(argv: Sequence[str]) -> list[str]:
  """`argv` with its `--config` value made a file path: a recipe name becomes the installed file.

  Raises:
    UserError: a `--config` that is neither a file nor a recipe name (naming the recipes).
  """
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + _resolve(arg[len('--config=') :])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = _resolve(out[i + 1])
  return out


def _resolve(spec: str) -> str:
  from vit_jax import config as config_lib

  try:
    return config_lib.resolve_recipe(spec)
  except config_lib.ConfigError as e:
    raise UserError(str(e)) from None


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """`NAME[:args]` or `path/x.py[:args]` -> its `get_config(args)`; `UserError` for a missing
  recipe or bad args."""
  path, _, arg = _resolve(spec).partition(':')
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
