"""Optimizers and learning-rate schedules from the config (optax).

Recipes of the ViT papers: fine-tuning uses SGD with momentum 0.9 and global-norm clipping at 1.0;
pretraining uses Adam with weight decay on kernels only (`wd_mask='kernels'`), decoupled from the
learning rate as big_vision's (`make_optimizer` writes out the update rule). Every schedule is a
linear warmup from 0 followed by a cosine, linear or constant decay.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'adamw', 'adam')
DECAYS = ('cosine', 'linear', 'constant')
WD_MASKS = ('kernels', 'all', 'none')
WD_MODES = ('decoupled', 'lr_scaled')


def make_schedule(config: Mapping) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps`, then decay to `lr * end_lr_factor` at `total_steps`.

  Args:
    config: with `lr`, `warmup_steps`, `total_steps`, `decay_type`, `end_lr_factor` (default 0).

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


def _names(path) -> list[str]:
  names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  while names and names[-1] in ('value', 'raw_value'):
    names.pop()  # Variable wrappers around an array.
  return names


def weight_decay_mask(params: Any, kind: str) -> Any:
  """Which parameters get weight decay.

  'kernels': the parameters named `kernel`, whatever their rank (big_vision/optax.py:133, default
  `wd_mults=[('.*/kernel$', 1.0)]`): dense, attention (3-D), convolution (4-D) and head kernels;
  never biases (the attention Q/K/V biases are 2-D), norms, position embeddings, class token,
  MAP probe. 'all': every parameter. 'none': none. The scanned and unscanned layouts give the
  same mask (names, not shapes, decide).
  """
  if kind not in WD_MASKS:
    raise ValueError(f'unknown wd_mask {kind!r}; expected one of {WD_MASKS}')

  def one(path, _):
    if kind != 'kernels':
      return kind == 'all'
    names = _names(path)
    return bool(names) and names[-1] == 'kernel'

  return jax.tree_util.tree_map_with_path(one, params)


_BLOCK = re.compile(r'(?:encoderblock|MixerBlock)_(\d+)$')
_SCANNED_BLOCK = 'encoderblock'
_TOP = ('pre_logits', 'head', 'MAPHead_0')
# timm's group_matcher gives the final norm the ordinal MATCH_PREV_GROUP, which joins it to the
# last block's group (timm models/_manipulate.py:77, 125): its multiplier is the last block's.
_LAST_BLOCK = ('encoder_norm', 'pre_head_layer_norm')


def _num_layers(tree: Any) -> int:
  """The encoder depth: numbered blocks, or the leading axis of a scanned stack."""
  depth = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for name in _names(path):
      if match := _BLOCK.match(name):
        depth = max(depth, int(match.group(1)) + 1)
      elif name == _SCANNED_BLOCK:
        depth = max(depth, int(jnp.shape(x)[0]))
  return depth


def layer_decay_multipliers(tree: Any, decay: float) -> Any:
  """BEiT's layer-wise learning-rate decay, with timm's layer ids (timm optim/_param_groups.py
  `param_groups_layer_decay`; ViT's `group_matcher`: stem, blocks, norm): layer 0 for the
  embeddings (patch embedding, class token, registers, position embedding, hybrid stem), block i
  for `encoderblock_i` and the final norm with the last block (timm's MATCH_PREV_GROUP), L + 1
  for the head (pre-logits, MAP pooling); the multiplier
  is `decay ** (L + 1 - layer)`. A scanned stack gets one multiplier per layer along its leading
  axis. Returns a tree of multipliers broadcastable to the leaves of `tree`.
  """
  depth = _num_layers(tree)

  def one(path, x):
    names = _names(path)
    for name in names:
      if match := _BLOCK.match(name):
        return decay ** (depth - int(match.group(1)))
      if name == _SCANNED_BLOCK:
        per_layer = decay ** (depth - jnp.arange(depth, dtype=jnp.float32))
        return per_layer.reshape((depth,) + (1,) * (jnp.ndim(x) - 1))
      if name in _TOP:
        return 1.0
      if name in _LAST_BLOCK:
        return decay
    return decay ** (depth + 1)

  return jax.tree_util.tree_map_with_path(one, tree)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's `layer_decay_multipliers`."""

  def update(updates, state, params=None):
    del params
    mults = layer_decay_multipliers(updates, decay)
    return jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates, mults), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: Mapping) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer (with clipping and weight decay) and its schedule from the config.

  The update of a parameter `p` at optimizer step `t`, with `g` the (accumulated, then clipped)
  gradient, `lr(t) = lr * m(t)` the schedule and `m(t)` its multiplier (warmup then decay, from 0
  to 1 and back), `u = adam(g)` (or the SGD momentum trace of `g`), and `mask(p)` from `wd_mask`:

    weight_decay_mode='decoupled' (default; big_vision/optax.py:143-149, Loshchilov & Hutter's
      AdamW with a schedule multiplier):  p <- p - m(t) * (lr * u + weight_decay * mask(p) * p)
    weight_decay_mode='lr_scaled' (optax.adamw, torch.optim.AdamW):
                                          p <- p - lr(t) * (u + weight_decay * mask(p) * p)

  So with 'decoupled' each step shrinks a decayed parameter by the factor
  `1 - weight_decay * m(t)`, whatever `lr` is (1e-4 at the peak for big_vision's recipes); with
  'lr_scaled' by `1 - weight_decay * lr(t)`. The two agree when the 'decoupled' value is the
  'lr_scaled' one times `lr`.

  Args:
    config: the run config (its optimizer fields: vit_jax/config.py `base_config`);
      `grad_clip_norm` and `layer_decay` 0 are off, `mu_dtype` is the momentum's dtype.

  Returns:
    (tx, schedule): `schedule(t)` is the learning rate `lr(t)` (logged as `train/lr`).

  Raises:
    ValueError: unknown optimizer, decay type, mask or mode; layer_decay outside (0, 1].
  """
  name = config['optimizer']
  if name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}; expected one of {OPTIMIZERS}')
  schedule = make_schedule(config)
  mu_dtype = jnp.dtype(config['mu_dtype']) if config.get('mu_dtype') else None
  wd = float(config.get('weight_decay', 0.0) or 0.0)
  mode = config.get('weight_decay_mode', 'decoupled') or 'decoupled'
  if mode not in WD_MODES:
    raise ValueError(f'unknown weight_decay_mode {mode!r}; expected one of {WD_MODES}')
  layer_decay = float(config.get('layer_decay', 0.0) or 0.0)
  if not 0.0 <= layer_decay <= 1.0:
    raise ValueError(
      f'layer_decay={config.get("layer_decay")} must be in (0, 1] (0: off); '
      'BEiT and timm fine-tune with 0.65-0.75'
    )
  if name == 'adam' and wd:
    raise ValueError('weight_decay with optimizer=adam is ambiguous; use optimizer=adamw')
  mask = lambda p: weight_decay_mask(p, config.get('wd_mask', 'kernels'))
  parts = []
  clip = config.get('grad_clip_norm')
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if name == 'sgd':
    parts.append(optax.trace(decay=float(config.get('momentum', 0.9)), accumulator_dtype=mu_dtype))
  else:
    parts.append(
      optax.scale_by_adam(
        b1=float(config.get('b1', 0.9)),
        b2=float(config.get('b2', 0.999)),
        eps=float(config.get('eps', 1e-8)),
        mu_dtype=mu_dtype,
      )
    )
  layers = [scale_by_layer_decay(layer_decay)] if layer_decay else []
  if wd and mode == 'lr_scaled':
    parts.append(optax.add_decayed_weights(wd, mask))
  if not wd or mode == 'lr_scaled':  # Layer decay scales the lr: the decay too (as timm's groups).
    parts += [*layers, optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts), schedule
  # big_vision's order (optax.py:143-149): the lr (and per-layer lr multipliers, where big_vision
  # puts its lr_mults, :115-123), then the decay, then the schedule multiplier.
  keys = ('warmup_steps', 'total_steps', 'decay_type', 'end_lr_factor')
  multiplier = make_schedule({**{k: config.get(k) for k in keys}, 'lr': 1.0})
  parts += [
    optax.scale(float(config['lr'])),
    *layers,
    optax.add_decayed_weights(wd, mask),
    optax.scale_by_schedule(multiplier),
    optax.scale(-1.0),
  ]
  return optax.chain(*parts), schedule
