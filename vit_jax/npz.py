"""The original google-research `.npz` checkpoint format: load, save, fine-tuning init, resizing.

The released files are flat `np.savez` archives whose keys are parameter paths joined by `/`
(`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`). GroupNorm scale/bias of hybrid models are
stored with shape (1, 1, 1, C), as an older Flax wrote them; our modules use (C,). Loading converts,
saving converts back, so `save(load(f))` reproduces `f` key for key and bit for bit.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from flax import nnx

Params = dict[str, Any]

_GROUPNORM = re.compile(r'^gn(\d+|_root|_proj)$')
_LEGACY_PREFIX = 'opt/target/'


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameter tree does not match the model's."""


def _is_remote(path: str) -> bool:
  return '://' in str(path)


def _read_bytes(path: str) -> bytes:
  if _is_remote(path):
    import tensorflow as tf  # Lazy: only needed for gs:// and other remote filesystems.

    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


def _is_groupnorm(path: tuple[str, ...]) -> bool:
  return len(path) > 1 and bool(_GROUPNORM.match(path[-2])) and path[-1] in ('scale', 'bias')


def load_flat(path: str) -> dict[str, np.ndarray]:
  """Reads an `.npz` checkpoint (local or gs://) into `{'a/b/c': array}`, never unpickling."""
  try:
    data = _read_bytes(path)
  except (FileNotFoundError, OSError) as e:
    raise FileNotFoundError(f'checkpoint {path!r} not found or unreadable: {e}') from e
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
      flat = {key: archive[key] for key in archive.files}
  except ValueError as e:  # allow_pickle=False refuses object arrays.
    raise ValueError(f'checkpoint {path!r} holds pickled objects; refusing to load it ({e})') from e
  except Exception as e:
    raise ValueError(
      f'{path!r} is not a readable .npz checkpoint ({type(e).__name__}: {e}); expected a file '
      'written by np.savez, such as the released ViT-B_16.npz'
    ) from e
  if flat and all(k.startswith(_LEGACY_PREFIX) for k in flat):
    flat = {k[len(_LEGACY_PREFIX) :]: v for k, v in flat.items()}
  return flat


def load(path: str) -> Params:
  """Loads an original-format `.npz` checkpoint into the nested params tree our modules use.

  Args:
    path: local path or any filesystem TensorFlow's gfile reads (`gs://bucket/ViT-B_16.npz`).

  Returns:
    Nested dict of numpy arrays with the checkpoint's own dtypes.
  """
  flat = {}
  for key, value in load_flat(path).items():
    parts = tuple(key.split('/'))
    flat[parts] = value.reshape(value.shape[-1:]) if _is_groupnorm(parts) else value
  return flax.traverse_util.unflatten_dict(flat)


def to_numpy(x) -> np.ndarray:
  """A (possibly sharded, multi-process) array as numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def to_released_layout(params: Mapping) -> dict[str, np.ndarray]:
  """Flattens a params tree into the released `.npz` key/value layout (unscanned, GN reshaped)."""
  params = unscan_params(flax.core.unfreeze(params_tree(params)))
  flat = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    value = to_numpy(value)
    if value.dtype.kind not in 'fiub':  # bfloat16 and friends: np.savez cannot hold them.
      value = value.astype(np.float32)
    if _is_groupnorm(path):
      value = value.reshape((1, 1, 1, -1))
    flat['/'.join(path)] = value
  return flat


def save(params, path: str) -> None:
  """Writes an NNX model's params (or a params tree) in the released `.npz` layout, atomically
  (temp file, then rename).

  Scanned encoders are unstacked into `encoderblock_{i}`; bfloat16 arrays are written as float32.
  Only process 0 writes in a multi-process job (all processes must call it for sharded arrays).
  """
  flat = to_released_layout(params)
  if jax.process_index() != 0:
    return
  if _is_remote(path):
    import tensorflow as tf

    buffer = io.BytesIO()  # zipfile needs tell()/seek(), which object stores do not offer.
    np.savez(buffer, **flat)
    tmp = f'{path}.tmp-{os.getpid()}'
    with tf.io.gfile.GFile(tmp, 'wb') as f:
      f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.npz', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def scan_params(params: Mapping) -> Params:
  """Stacks `Transformer/encoderblock_{i}` into `Transformer/encoderblock` (leading layer axis)."""
  params = dict(params)
  encoder = dict(params.get('Transformer', {}))
  blocks = sorted(
    (k for k in encoder if re.fullmatch(r'encoderblock_\d+', k)),
    key=lambda k: int(k.split('_')[1]),
  )
  if not blocks:
    return params
  stacked = [encoder.pop(k) for k in blocks]
  encoder['encoderblock'] = jax.tree.map(lambda *xs: np.stack(xs), *stacked)
  params['Transformer'] = encoder
  return params


def unscan_params(params: Mapping) -> Params:
  """Inverse of `scan_params`: splits a stacked `encoderblock` into `encoderblock_{i}`."""
  params = dict(params)
  encoder = params.get('Transformer')
  if not isinstance(encoder, Mapping) or 'encoderblock' not in encoder:
    return params
  encoder = dict(encoder)
  stacked = encoder.pop('encoderblock')
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    encoder[f'encoderblock_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  params['Transformer'] = encoder
  return params


def fitting_variant(params: Mapping) -> str | None:
  """The registered ViT whose shapes a checkpoint's tree has (width, patch, depth, MLP, heads,
  class token, hybrid stem), or None."""
  from vit_jax.models.registry import MODEL_CONFIGS

  try:
    encoder = unscan_params(params)['Transformer']
    block = encoder['encoderblock_0']
    ph, pw, _, width = np.shape(params['embedding']['kernel'])
    mlp_dim = np.shape(block['MlpBlock_3']['Dense_0']['kernel'])[1]
    num_heads = np.shape(block['MultiHeadDotProductAttention_1']['query']['kernel'])[1]
    num_layers = sum(k.startswith('encoderblock_') for k in encoder)
    token, hybrid = 'cls' in params, 'conv_root' in params
    shape = (width, (ph, pw), num_layers, mlp_dim, num_heads, token, hybrid)
  except (KeyError, TypeError, ValueError):
    return None
  for name, c in MODEL_CONFIGS.items():
    if 'transformer' not in c:
      continue
    t, token = c.transformer, c.classifier in ('token', 'token_unpooled')
    sizes = (c.hidden_size, tuple(c.patches.size), t.num_layers, t.mlp_dim, t.num_heads)
    if shape == (*sizes, token, c.get('resnet') is not None):
      return name
  return None


def check_tree(params: Mapping, expected: Mapping, *, path: str, model_name: str | None) -> None:
  """Raises one CheckpointMismatchError listing every missing/unexpected key and shape mismatch."""
  got = {'/'.join(k): np.shape(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  want = {'/'.join(k): np.shape(v) for k, v in flax.traverse_util.flatten_dict(expected).items()}
  # Shape mismatches first: the first line names the first parameter whose shapes differ.
  problems = [
    f'  shape mismatch: {k}: checkpoint {got[k]} vs model {want[k]}'
    for k in sorted(got.keys() & want.keys())
    if got[k] != want[k]
  ]
  problems += [f'  missing in checkpoint: {k} {want[k]}' for k in sorted(want.keys() - got.keys())]
  problems += [
    f'  unexpected in checkpoint: {k} {got[k]}' for k in sorted(got.keys() - want.keys())
  ]
  if problems:
    variant = fitting_variant(params)
    fits = f'; the checkpoint fits {variant}' if variant and variant != model_name else ''
    raise CheckpointMismatchError(
      f'checkpoint {path!r} does not match model {model_name!r}: {problems[0].strip()}{fits} '
      f'({len(problems)} problems):\n'
      + '\n'.join(problems)
      + '\nCheck that the model config (name, patch size, classifier, representation_size) is the '
      'one the checkpoint was trained with.'
    )


def resize_posemb(
  posemb: np.ndarray, target_shape: tuple[int, ...], *, grid_size: tuple[int, int] | None = None
) -> np.ndarray:
  """Resizes position embeddings (1, [1 +] g*g, d) to `target_shape`, as the published fine-tunes.

  A leading class-token embedding is kept as is; the grid is resized with corner-aligned bilinear
  interpolation (`scipy.ndimage.zoom(order=1)`). Non-square target grids need `grid_size`.
  """
  _, n_old, d = posemb.shape
  _, n_new, d_new = target_shape
  if d != d_new:
    raise ValueError(f'position embedding width {d} does not match the model width {d_new}')
  g_old = int(np.sqrt(n_old))
  has_token = g_old * g_old != n_old
  if has_token:
    g_old = int(np.sqrt(n_old - 1))
    if g_old * g_old != n_old - 1:
      raise ValueError(f'cannot read a square grid from {n_old} position embeddings')
  tok, grid = (posemb[:, :1], posemb[0, 1:]) if has_token else (posemb[:, :0], posemb[0])
  n_grid_new = n_new - tok.shape[1]
  if grid_size is None:
    g = int(np.sqrt(n_grid_new))
    if g * g != n_grid_new:
      raise ValueError(f'target of {n_new} tokens is not a square grid; pass grid_size=(h, w)')
    grid_size = (g, g)
  if grid_size[0] * grid_size[1] != n_grid_new:
    raise ValueError(f'grid_size {grid_size} does not give {n_grid_new} tokens')
  logging.info('resizing position embeddings: grid %s -> %s', (g_old, g_old), tuple(grid_size))
  grid = grid.reshape(g_old, g_old, d)
  zoom = (grid_size[0] / g_old, grid_size[1] / g_old, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, n_grid_new, d)
  return np.concatenate([tok, grid], axis=1).astype(posemb.dtype)


def resize_patch_embedding(kernel: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
  """FlexiViT pseudo-inverse resize of a patch-embedding kernel (ph, pw, c, d) to new_size.

  Finds the kernel w' minimizing |<x, w> - <resize(x), w'>| over patches x, so a patch embedded at
  the new size gives (as nearly as possible) the token the checkpoint gave at the old size.
  """
  ph, pw, c, d = kernel.shape
  if (ph, pw) == tuple(new_size):
    return kernel

  def resize(x):
    return np.asarray(jax.image.resize(x, new_size, method='bilinear', antialias=False))

  basis = np.eye(ph * pw, dtype=np.float32).reshape(ph * pw, ph, pw)
  mat = np.stack([resize(b).reshape(-1) for b in basis], axis=1)  # (new_h*new_w, ph*pw)
  resize_inv = np.linalg.pinv(mat.T)  # (new_h*new_w, ph*pw)
  flat = kernel.reshape(ph * pw, c * d).astype(np.float64)
  return (resize_inv @ flat).reshape(*new_size, c, d).astype(kernel.dtype)


def pretrained_params(
  pretrained: str | Mapping,
  init_params: Mapping,
  *,
  model_name: str | None = None,
  grid_size: tuple[int, int] | None = None,
  source: str | None = None,
) -> Params:
  """Fine-tuning init as a params tree: the body from a checkpoint, the head from `init_params`.

  Args:
    pretrained: original-format `.npz` path (local or gs://), or a params tree in the released
      (unscanned) layout, as `load` or a workdir's restored params give it.
    init_params: freshly initialized params of the target model (defines shapes, the new head, and
      whether the encoder is scanned).
    model_name: the target model's name, for errors. Whether `pre_logits` is kept follows the
      target model: kept when it has a representation layer.
    grid_size: target patch grid for non-square inputs (default: inferred as square).
    source: what errors call a tree `pretrained` (e.g. the workdir it came from).

  Returns:
    Params shaped like `init_params` (same dtypes), with position embeddings resized to the target
    grid and, where the patch size differs, the patch embedding resized (FlexiViT pseudo-inverse).

  Raises:
    CheckpointMismatchError: listing every remaining mismatch, with path and model name.
  """
  init_params = flax.core.unfreeze(init_params)
  if isinstance(pretrained, (str, os.PathLike)):
    pretrained_path, restored = str(pretrained), load(str(pretrained))
  else:  # New dicts (the tree is edited below), the same arrays.
    pretrained_path = source or '<params tree>'
    restored = jax.tree.map(lambda x: x, flax.core.unfreeze(pretrained))
  if 'encoderblock' in init_params.get('Transformer', {}):
    restored = scan_params(restored)

  if 'pre_logits' in restored and 'pre_logits' not in init_params:
    logging.info('load_pretrained: dropping pre_logits (target has no representation layer)')
    del restored['pre_logits']
  elif 'pre_logits' in init_params and 'pre_logits' not in restored:
    logging.info('load_pretrained: checkpoint has no pre_logits; keeping the fresh init')
    restored['pre_logits'] = init_params['pre_logits']
  if 'head' in init_params:
    restored['head'] = init_params['head']
  else:
    restored.pop('head', None)
  _adopt_new_options(restored, init_params)

  encoder = restored.get('Transformer', {})
  if 'posembed_input' in encoder:
    posemb = encoder['posembed_input']['pos_embedding']
    target = init_params['Transformer']['posembed_input']['pos_embedding'].shape
    if posemb.shape != target and posemb.shape[-1] == target[-1]:  # Else check_tree reports it.
      encoder['posembed_input']['pos_embedding'] = resize_posemb(
        posemb, target, grid_size=grid_size
      )
  stem = 'embedding' if 'embedding' in restored else 'stem'
  if stem in restored and stem in init_params:
    kernel, target = restored[stem]['kernel'], init_params[stem]['kernel'].shape
    if kernel.shape[:2] != target[:2] and kernel.shape[2:] == target[2:]:
      logging.info(
        'load_pretrained: resizing patch embedding %s -> %s', kernel.shape[:2], target[:2]
      )
      restored[stem]['kernel'] = resize_patch_embedding(kernel, target[:2])

  check_tree(restored, init_params, path=pretrained_path, model_name=model_name)
  return jax.tree.map(lambda r, i: np.asarray(r).astype(i.dtype), restored, init_params)


def _adopt_new_options(restored: dict, init_params: Mapping) -> None:
  """Fine-tuning a checkpoint into a model with options it lacks (docs/models.md): register
  tokens, LayerScale and QK-norm parameters keep the target's fresh init; a `posemb='sincos2d'`
  target drops the checkpoint's learned position table. Logged; other mismatches stay errors."""
  added = []
  if 'registers' in init_params and 'registers' not in restored:
    restored['registers'] = init_params['registers']
    added.append('registers')
  encoder, target = restored.get('Transformer'), init_params.get('Transformer', {})
  if not isinstance(encoder, dict):
    return
  if 'posembed_input' in encoder and 'posembed_input' not in target and 'encoder_norm' in target:
    logging.info("load_pretrained: dropping the learned position table (target: posemb='sincos2d')")
    del encoder['posembed_input']
  new = ('layerscale_attention', 'layerscale_mlp')
  for name, block in target.items():
    if not name.startswith('encoderblock') or name not in encoder:
      continue
    ours = encoder[name] = dict(encoder[name])
    for key in new:
      if key in block and key not in ours:
        ours[key] = block[key]
        added.append(f'{name}/{key}')
    attention = block.get('MultiHeadDotProductAttention_1', {})
    if 'query_norm' in attention and 'MultiHeadDotProductAttention_1' in ours:
      theirs = ours['MultiHeadDotProductAttention_1'] = dict(ours['MultiHeadDotProductAttention_1'])
      for key in ('query_norm', 'key_norm'):
        if key not in theirs:
          theirs[key] = attention[key]
          added.append(f'{name}/{key}')
  if added:
    logging.info('load_pretrained: not in the checkpoint, fresh init kept: %s', ', '.join(added))


def params_tree(model_or_tree) -> Params:
  """The released nested params tree of an NNX model (or the tree itself)."""
  if isinstance(model_or_tree, nnx.Module):
    model_or_tree = nnx.state(model_or_tree, nnx.Param)
  return model_or_tree.to_pure_dict() if isinstance(model_or_tree, nnx.State) else model_or_tree


def _fill(model, tree: Mapping):
  """Writes `tree` (shaped like the model's params) into the model, keeping each param's dtype
  and sharding."""
  state = nnx.state(model, nnx.Param)

  def one(variable, value):
    old = variable[...]
    value = np.asarray(value).astype(old.dtype)
    sharding = getattr(old, 'sharding', None)
    return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)

  values = jax.tree.map(one, state.to_pure_dict(), flax.core.unfreeze(tree))
  state.replace_by_pure_dict(values)
  nnx.update(model, state)
  return model


def load_into(model, path_or_tree):
  """Fills `model` (an NNX ViT/Mixer, scanned or not) from a released checkpoint and returns it.

  Args:
    model: the target model; its parameter shapes must be the checkpoint's.
    path_or_tree: an `.npz` path (local or gs://) or a tree as `load` returns it.

  Raises:
    CheckpointMismatchError: the checkpoint does not fit the model (every problem listed).
  """
  path = path_or_tree if isinstance(path_or_tree, (str, os.PathLike)) else '<params tree>'
  tree = load(str(path_or_tree)) if path != '<params tree>' else dict(path_or_tree)
  target = params_tree(model)
  if 'encoderblock' in target.get('Transformer', {}):
    tree = scan_params(tree)
  check_tree(tree, target, path=str(path), model_name=getattr(model, 'model_name', None))
  return _fill(model, tree)


def load_pretrained(model, path: str, *, grid_size: tuple[int, int] | None = None):
  """Fine-tuning init in place: the body from the checkpoint at `path`, the model's own head,
  position embeddings resized to its grid, the patch embedding resized to its patch size.
  Returns the model.
  """  # fmt: skip
  params = pretrained_params(
    path, params_tree(model), model_name=getattr(model, 'model_name', None), grid_size=grid_size
  )
  return _fill(model, params)
