"""Eval preprocessing in stock TensorFlow ops, for predict and the SavedModel's bytes signature.

The training pipeline (`vit_jax.data.preprocess`) computes the same ops through fused custom
kernels that a SavedModel cannot carry to TF Serving; this module applies an eval preprocessing
string op by op with `tf.io.decode_image`, `tf.image.resize` and slicing, the published semantics
(tested equal to the pipeline's). Only the deterministic ops an eval string uses are supported.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from vit_jax.data.preprocess import parse_op

SUPPORTED = ('decode', 'resize', 'resize_small', 'central_crop', 'value_range')


def _size(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _resize_small_shape(shape, size: int):
  h, w = shape[0], shape[1]
  ratio = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
  return (
    tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32),
    tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32),
  )


def eval_preprocess(pp: str) -> Callable[[tf.Tensor], tf.Tensor]:
  """`fn(image) -> float32 [h, w, 3]`, image: encoded bytes (string scalar) or uint8 [h, w, c].

  Raises:
    ValueError: an op that is not a deterministic eval op (the message lists the supported ones).
  """
  ops = [parse_op(s) for s in pp.split('|') if s.strip()]
  for name, _, _ in ops:
    if name not in SUPPORTED:
      raise ValueError(
        f'preprocessing op {name!r} of {pp!r} is not an eval op supported for serving; '
        f'supported: {SUPPORTED}'
      )

  def fn(image: tf.Tensor) -> tf.Tensor:
    x = tf.convert_to_tensor(image)
    for name, args, kwargs in ops:
      if name == 'decode':
        if x.dtype == tf.string:
          x = tf.io.decode_image(x, channels=3, expand_animations=False)
        elif x.shape[-1] == 1:
          x = tf.image.grayscale_to_rgb(x)
        x.set_shape([None, None, 3])
      elif name == 'resize':
        size, method = _size(args[0] if args else kwargs['size']), kwargs.get('method', 'bilinear')
        x = tf.image.resize(x, size, method, antialias=kwargs.get('antialias', False))
      elif name == 'resize_small':
        size = args[0] if args else kwargs['size']
        new = _resize_small_shape(tf.shape(x), size)
        x = tf.image.resize(
          x, new, kwargs.get('method', 'bilinear'), antialias=kwargs.get('antialias', False)
        )
      elif name == 'central_crop':
        ch, cw = _size(args[0] if args else kwargs['size'])
        h, w = tf.shape(x)[0], tf.shape(x)[1]
        x = x[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
      elif name == 'value_range':
        names = ('vmin', 'vmax', 'in_min', 'in_max', 'clip')
        a = dict(zip(names, (-1, 1, 0, 255, False)))
        a.update(zip(names, args), **kwargs)
        scale = (a['vmax'] - a['vmin']) / (a['in_max'] - a['in_min'])
        x = tf.cast(x, tf.float32) * scale + (a['vmin'] - a['in_min'] * scale)
        if a['clip']:
          x = tf.clip_by_value(x, min(a['vmin'], a['vmax']), max(a['vmin'], a['vmax']))
    return tf.cast(x, tf.float32)

  return fn
