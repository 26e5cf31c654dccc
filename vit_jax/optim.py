"""Optimizers and learning-rate schedules from the config (optax).

Recipes of the ViT papers: fine-tuning uses SGD with momentum 0.9 and global-norm clipping at 1.0;
pretraining uses Adam(W) with decoupled weight decay applied to kernels only (`wd_mask='kernels'`).
Every schedule is a linear warmup from 0 followed by a cosine, linear or constant decay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'adamw', 'adam')
DECAYS = ('cosine', 'linear', 'constant')
WD_MASKS = ('kernels', 'all', 'none')


def make_schedule(config: Mapping) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps`, then decay to `lr * end_lr_factor` at `total_steps`.

  Args:
    config: with `lr`, `warmup_steps`, `total_steps`, `decay_type` ('cosine' | 'linear' |
      'constant') and optionally `end_lr_factor` (default 0).

  Returns:
    A schedule mapping the optimizer step (an update, not a micro-batch) to the learning rate.
  """
  lr = float(config['lr'])
  warmup = int(config['warmup_steps'])
  total = int(config['total_steps'])
  decay_type = config['decay_type']
  end = lr * float(config.get('end_lr_factor', 0.0) or 0.0)
  if decay_type not in DECAYS:
    raise ValueError(f'unknown decay_type {decay_type!r}; expected one of {DECAYS}')
  if warmup < 0 or warmup > total:
    raise ValueError(f'warmup_steps={warmup} must be in [0, total_steps={total}]')
  decay_steps = max(total - warmup, 1)
  if decay_type == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif decay_type == 'linear':
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params: Any, kind: str) -> Any:
  """Which parameters get weight decay: 'kernels' (ndim > 1: no biases, norms, posemb... ), 'all',
  'none'. Position embeddings and the class token are 3-D but are not kernels: never decayed."""
  if kind not in WD_MASKS:
    raise ValueError(f'unknown wd_mask {kind!r}; expected one of {WD_MASKS}')

  def one(path, x):
    name = jax.tree_util.keystr(path)
    if kind == 'none':
      return False
    if kind == 'all':
      return True
    return jnp.ndim(x) > 1 and 'pos_embedding' not in name and "'cls'" not in name

  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(config: Mapping) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer (with clipping and weight decay) and its schedule from the config.

  Args:
    config: the run config; reads `optimizer` ('sgd' | 'adamw' | 'adam'), `lr`, `warmup_steps`,
      `total_steps`, `decay_type`, `end_lr_factor`, `grad_clip_norm` (0/None: off),
      `weight_decay`, `wd_mask`, `momentum`, `b1`, `b2`, `eps`, `mu_dtype` (optimizer-state
      dtype for momentum/first moment, e.g. 'bfloat16' to halve its memory).

  Returns:
    (tx, schedule).

  Raises:
    ValueError: unknown optimizer, decay type or mask.
  """
  name = config['optimizer']
  if name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}; expected one of {OPTIMIZERS}')
  schedule = make_schedule(config)
  mu_dtype = config.get('mu_dtype') or None
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None
  wd = float(config.get('weight_decay', 0.0) or 0.0)
  mask = lambda p: weight_decay_mask(p, config.get('wd_mask', 'kernels'))
  parts = []
  clip = config.get('grad_clip_norm')
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if name == 'sgd':
    if wd:  # Coupled L2 (added to the gradient), as classic SGD weight decay.
      parts.append(optax.add_decayed_weights(wd, mask))
    parts.append(optax.trace(decay=float(config.get('momentum', 0.9)), accumulator_dtype=mu_dtype))
    parts.append(optax.scale_by_learning_rate(schedule))
  else:
    parts.append(
      optax.scale_by_adam(
        b1=float(config.get('b1', 0.9)),
        b2=float(config.get('b2', 0.999)),
        eps=float(config.get('eps', 1e-8)),
        mu_dtype=mu_dtype,
      )
    )
    if name == 'adamw' and wd:  # Decoupled: decay scaled by the learning rate, not by Adam.
      parts.append(optax.add_decayed_weights(wd, mask))
    elif name == 'adam' and wd:
      raise ValueError('weight_decay with optimizer=adam is ambiguous; use optimizer=adamw')
    parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
