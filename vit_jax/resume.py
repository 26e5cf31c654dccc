"""Resuming a workdir: the newest checkpoint that is whole and fits this config, or none.

`restore` walks the checkpoints newest first. Each one's stored config is compared with the run's
before any array is read: a change that makes the state unusable (model, classes, image size,
optimizer, dtypes, batch) is refused with the fields named; one that does not (schedule, lr, steps,
intervals) is stated in the log. A checkpoint that cannot be read, or whose arrays do not match the
fingerprint saved with them, is moved aside with a one-line warning and the previous one is tried:
never a crash loop, never garbage loaded. The data position comes from the checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax import config as config_lib
from vit_jax import train_state


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def compare(stored: Mapping, new: Mapping) -> tuple[list[str], list[str]]:
  """(refused, stated): `field old -> new` for each differing field of two config dicts."""
  old, cur = _flatten(stored), _flatten(new)
  refused, stated = [], []
  for key in sorted(set(old) | set(cur)):
    a, b = old.get(key, '<absent>'), cur.get(key, '<absent>')
    if a == b or (key.startswith('model.') and {a, b} <= {None, '<absent>'}):
      continue  # An unset model field is the registered model's value, as an absent one was.
    text = f'{key} {a!r} -> {b!r}'
    top, _, leaf = key.partition('.')
    if key == config_lib.RESUME_EMA:
      on = [isinstance(v, int | float) and v > 0 for v in (a, b)]
      if on[0] != on[1]:
        refused.append(f'{text} (turns the weight EMA {"on" if on[1] else "off"})')
      else:
        stated.append(text)
    elif key in config_lib.RESUME_REFUSED or (
      top == 'model' and leaf not in config_lib.RESUME_MODEL_FREE
    ):
      refused.append(text)
    else:
      stated.append(text)
  return refused, stated


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]  # fmt: skip
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def restore(
  ckpt: train_state.Checkpointer,
  abstract_state: Any,
  config: Any,
  *,
  num_classes: int,
  layout: str,
) -> tuple[Any, dict] | None:
  """The state and meta of the newest usable checkpoint in `ckpt`, or None (start fresh).

  Args:
    ckpt: the run's checkpointer.
    abstract_state: the run's state as `jax.ShapeDtypeStruct`s with shardings.
    config: the run's config (a ConfigDict).
    num_classes: the run's resolved number of classes.
    layout: the run's mesh and process count in words (a change is stated: data order differs).

  Raises:
    ResumeError: the checkpoint was made with a config whose state cannot be reused here.
  """
  new = json.loads(config.to_json_best_effort())
  moved = False
  for step in sorted(ckpt.all_steps(), reverse=True):
    meta, state, problem = None, None, None
    try:
      meta = ckpt.read_meta(step)
    except train_state.CorruptCheckpointError as e:
      problem = str(e)
    if train_state.agree(problem is None):
      stored = dict(meta.get('config', {}), num_classes=meta.get('num_classes', num_classes))
      refused, stated = compare(stored, dict(new, num_classes=num_classes))
      if refused:
        raise train_state.ResumeError(
          f'workdir checkpoint {ckpt.directory}/{step} was made with another config: '
          f'{"; ".join(refused)}. Its state cannot be reused: use a new --workdir, or restore '
          'those values.'
        )
      try:
        state = ckpt.restore_verified(abstract_state, step, meta)
        if not bool(_all_finite(state)):
          raise train_state.CorruptCheckpointError('non-finite values in the restored state')
      except train_state.CorruptCheckpointError as e:
        problem = str(e)
    elif problem is None:
      problem = 'unreadable on another process'
    if not train_state.agree(problem is None):
      ckpt.move_aside(step, problem or 'unreadable on another process')
      moved = True
      continue
    if stated:
      logging.warning('resuming step %d with config changes: %s', step, '; '.join(stated))
    if meta.get('layout', layout) != layout:
      logging.warning(
        'checkpoint step %d was written on %s, resuming on %s: state resharded; the data order '
        'from here on differs from an uninterrupted run',
        step,
        meta['layout'],
        layout,
      )
    return state, meta
  if moved:
    logging.warning(
      'no usable checkpoint left in %s (damaged ones are in %s.corrupt): starting from scratch',
      ckpt.directory,
      ckpt.directory,
    )
  return None
