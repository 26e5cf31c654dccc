"""Eval preprocessing for predict and the SavedModel's bytes signature: the pipeline's own ops.

The training pipeline's ops (`vit_jax.data.preprocess`) are stock TensorFlow ops, so a SavedModel
can carry them to TF Serving as they are: `eval_preprocess(pp)` applies the whole string, its
device part (`value_range`) included, to one image. Only deterministic ops are accepted.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from vit_jax.data import preprocess as data_preprocess

SUPPORTED = tuple(
  'decode resize resize_small central_crop decode_jpeg_and_central_crop value_range'.split()
)


def eval_preprocess(pp: str) -> Callable[[tf.Tensor], tf.Tensor]:
  """`fn(image) -> float32 [h, w, 3]`, image: encoded bytes (string scalar) or uint8 [h, w, c].

  Raises:
    ValueError: an op that is not a deterministic eval op (the message lists the supported ones).
  """
  for spec in filter(str.strip, pp.split('|')):
    name = data_preprocess.parse_op(spec)[0]
    if name not in SUPPORTED:
      raise ValueError(
        f'preprocessing op {name!r} of {pp!r} is not an eval op supported for serving; '
        f'supported: {SUPPORTED}'
      )
  ops = data_preprocess.get_preprocess_fn(pp)

  def fn(image: tf.Tensor) -> tf.Tensor:
    x = tf.convert_to_tensor(image)
    if x.dtype != tf.string and x.shape.rank == 3 and x.shape[-1] == 1:
      x = tf.image.grayscale_to_rgb(x)
    x = ops({'image': x})['image']
    x.set_shape([None, None, 3])
    return tf.cast(x, tf.float32)

  return fn
