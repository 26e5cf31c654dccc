"""TF SavedModel export through `jax2tf` (StableHLO inside `XlaCallModule`), batch-polymorphic.

Signatures:
  serving_default: `images` float32 [batch, H, W, 3] in [-1, 1] -> `logits`, `probabilities`.
  serving_bytes:   `image_bytes` string [batch] (JPEG/PNG/GIF/BMP) -> the same, after the
                   checkpoint's eval preprocessing (`vit_jax.export.preprocess`, stock TF ops).
Parameters are `tf.Variable`s of the SavedModel (not constants folded into the graph).
With a fixed `batch_size` the batch dimension is static: what the TFLite converter needs (it
cannot lower the batch-polymorphic graph's dynamic gathers; see docs/export.md).
"""

from __future__ import annotations

import numpy as np

from vit_jax.export import preprocess

RUNTIME = 'TensorFlow'
PLATFORMS = ('cpu', 'cuda', 'tpu')  # Lowered for each, so TF Serving can run it on any of them.


def save(loaded, directory: str, batch_size: int | None = None) -> str:
  """Writes the SavedModel to `directory` (batch polymorphic unless `batch_size`); returns it."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  size = loaded.image_size
  pp = preprocess.eval_preprocess(loaded.pp_eval)  # Fails early on a non-eval op.
  variables = tf.nest.map_structure(lambda p: tf.Variable(p, trainable=False), loaded.params)

  converted = jax2tf.convert(
    loaded.fn,
    polymorphic_shapes=[None, f'({batch_size or "b"}, {size}, {size}, 3)'],
    with_gradient=False,
    native_serialization_platforms=PLATFORMS,
  )
  module = tf.Module()
  module.variables_list = tf.nest.flatten(variables)

  @tf.function(
    input_signature=[tf.TensorSpec([batch_size, size, size, 3], tf.float32, name='images')],
    autograph=False,
  )
  def serving_default(images):
    logits = converted(variables, images)
    return {'logits': logits, 'probabilities': tf.nn.softmax(logits, axis=-1)}

  @tf.function(input_signature=[tf.TensorSpec([batch_size], tf.string, name='image_bytes')])
  def serving_bytes(image_bytes):
    spec = tf.TensorSpec([size, size, 3], tf.float32)
    images = tf.map_fn(pp, image_bytes, fn_output_signature=spec)
    return serving_default(images)

  module.serving_default, module.serving_bytes = serving_default, serving_bytes
  signatures = {'serving_default': serving_default, 'serving_bytes': serving_bytes}
  tf.saved_model.save(module, directory, signatures=signatures)
  return directory


def run(directory: str, images: np.ndarray, labels=None) -> np.ndarray:
  """Logits of the reloaded SavedModel's `serving_default` for NHWC images in [-1, 1]."""
  del labels
  import tensorflow as tf

  signature = tf.saved_model.load(directory).signatures['serving_default']
  return signature(images=tf.constant(images, tf.float32))['logits'].numpy()


def run_bytes(directory: str, encoded: list[bytes]) -> dict[str, np.ndarray]:
  """Outputs of the reloaded SavedModel's `serving_bytes` for encoded images."""
  import tensorflow as tf

  signature = tf.saved_model.load(directory).signatures['serving_bytes']
  return {k: v.numpy() for k, v in signature(image_bytes=tf.constant(encoded)).items()}
