"""Windowed JPEG decoding as a TensorFlow op: only the rows and columns a crop needs.

`decode_window(contents, box)` returns `tf.io.decode_jpeg(contents, channels=3)[box]` bit for bit
(tests/test_data_fast_jpeg.py), but decodes less than TensorFlow's `decode_and_crop_jpeg`: it
stops after the box's last row (TensorFlow entropy-decodes the whole file) and skips the IDCT and
colour conversion of the columns outside it. `decode_region` returns what libjpeg decoded around
the box, with its origin, without copying the box out: the fused resize op reads it in place. In
the input pipeline this is what the `decode` of a lazy crop runs.

The op (_jpeg_op.cc) is compiled on first use against a libjpeg-turbo >= 1.5, the first that
builds and passes a self-test of:
  1. the system's (`-ljpeg`; Debian/Ubuntu: `apt install libjpeg-turbo8-dev` or
     `libjpeg62-turbo-dev`; conda: `libjpeg-turbo`), with its headers;
  2. the copy bundled in Pillow's wheel (`pillow.libs/libjpeg-*.so*`), with the headers that
     TensorFlow's wheel ships.
Where neither works, or `VIT_JAX_FAST_JPEG=0` is set, `available()` is False and the pipeline
uses TensorFlow's `decode_and_crop_jpeg` (same pixels, slower), with a warning once.
"""

import functools
import glob
import os

import numpy as np
import tensorflow as tf
from absl import logging

from vit_jax.data import fast_resize

_CC = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_jpeg_op.cc')


def _candidates() -> list[tuple[str, list[str], list[str]]]:
  """(name, cflags, libs) of each libjpeg-turbo to try, in order."""
  found = [('system libjpeg', [], ['-ljpeg'])]
  try:
    import PIL

    libs = sorted(
      glob.glob(os.path.join(os.path.dirname(PIL.__file__), '..', 'pillow.libs', 'libjpeg*.so*'))
    )
  except ImportError:
    libs = []
  headers = os.path.join(tf.sysconfig.get_include(), 'external', 'libjpeg_turbo')
  if libs and os.path.exists(os.path.join(headers, 'jpeglib.h')):
    lib = os.path.realpath(libs[0])
    found.append(('Pillow libjpeg', ['-I', headers], [lib, f'-Wl,-rpath,{os.path.dirname(lib)}']))
  return found


def _build(cflags, libs) -> str:
  """The op library (with the resize kernel, which the batch op calls) for one libjpeg."""
  return fast_resize.build_op_library('jpeg_op', _CC, fast_resize._C, cflags=cflags, libs=libs)


def _self_test(module) -> None:
  """Raises unless the op reproduces TensorFlow's decode on a 4:2:0 JPEG, windows at odd offsets."""
  yy, xx = np.mgrid[0:45, 0:61]
  image = np.stack([yy * 5, xx * 4, (yy * xx) % 256], -1).astype(np.uint8)
  contents = tf.io.encode_jpeg(image, quality=90, chroma_downsampling=True)
  full = tf.io.decode_jpeg(contents, channels=3).numpy()
  for y, x, h, w in ((0, 0, 45, 61), (3, 5, 17, 29), (19, 33, 26, 28)):
    region, (oy, ox) = module.vit_jax_decode_jpeg_region(contents, tf.constant([y, x, h, w]))
    got = region.numpy()[y - oy : y - oy + h, x - ox : x - ox + w]
    if not np.array_equal(got, full[y : y + h, x : x + w]):
      raise RuntimeError(f'self-test: window {(y, x, h, w)} differs from tf.io.decode_jpeg')


@functools.cache
def _load():
  if os.environ.get('VIT_JAX_FAST_JPEG', '1') == '0':
    return None
  causes = []
  for name, cflags, libs in _candidates():
    module = None
    try:
      module = tf.load_op_library(_build(cflags, libs))
      with tf.init_scope():  # Eagerly, even when first called while tracing a tf.data map.
        _self_test(module)
      return module
    except (OSError, RuntimeError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
      causes.append(f'{name}: {str(e)[-600:]}')
      if module is not None:  # Loaded, so its op is registered: no other library can be.
        break
  logging.warning(
    "The windowed JPEG decoder could not be built, so JPEG crops decode with TensorFlow's "
    'decode_and_crop_jpeg (same pixels, slower). It needs a C++ compiler and libjpeg-turbo '
    '(e.g. apt install libjpeg-turbo8-dev, or pip install pillow). Causes:\n%s',
    '\n'.join(causes),
  )
  return None


@tf.autograph.experimental.do_not_convert
def available() -> bool:
  """Whether the op is built and enabled (env VIT_JAX_FAST_JPEG=0 disables it)."""
  return _load() is not None


def _box(box) -> tf.Tensor:
  if isinstance(box, tf.Tensor):
    return tf.cast(box, tf.int32)
  return tf.stack([tf.cast(v, tf.int32) for v in box])


@tf.autograph.experimental.do_not_convert
def decode_region(contents, box) -> tuple[tf.Tensor, tf.Tensor]:
  """(uint8 [rows, cols, 3], int32 (y, x)): decoded pixels that cover `box`, and their origin.

  Inside `box` (y, x, h, w; h or w <= 0: to the image's edge) the pixels equal
  `tf.io.decode_jpeg(contents, channels=3)`'s; the region may extend a few pixels above, left and
  right of it (what libjpeg decodes anyway), where they may differ. Decodes only what the box
  needs. Errors (InvalidArgumentError) on data that is not a JPEG, a truncated file, or a box
  outside the image.
  """
  image, origin = _load().vit_jax_decode_jpeg_region(contents, _box(box))
  image.set_shape([None, None, 3])
  return image, origin


@tf.autograph.experimental.do_not_convert
def decode_window(contents, box) -> tf.Tensor:
  """uint8 [h, w, 3]: `tf.io.decode_jpeg(contents, channels=3)` inside `box`, exactly."""
  box = _box(box)
  image, origin = decode_region(contents, box)
  size = tf.where(box[2:] > 0, box[2:], tf.shape(image)[:2] - (box[:2] - origin))
  return tf.slice(image, tf.concat([box[:2] - origin, [0]], 0), tf.concat([size, [3]], 0))


@tf.autograph.experimental.do_not_convert
def decode_resize_batch(contents, pixels, plan, size, affine, keep=None) -> tf.Tensor:
  """float32 [b, h, w, 3]: each example's window, decoded, resized, flipped, mapped, in one op.

  Args:
    contents: string [b]: JPEG bytes (examples whose plan says JPEG).
    pixels: uint8 [b, n]: decoded pixels (h * w * 3 first) of the examples that are not JPEGs.
    plan: int32 [b, 12]: is_jpeg, the source's h, w, crop (y, x, h, w), the size the crop is
      resized to (h, w), the window's y, x in it, flip.
    size: (h, w) of every window, static.
    affine: (mul, add): output = value * mul + add.
    keep: bool [b] or None (all): where False the image is zeros (not decoded).
  """
  if keep is None:
    keep = tf.ones(tf.shape(plan)[:1], tf.bool)
  return _load().vit_jax_decode_resize_batch(
    contents, pixels, plan, keep, height=size[0], width=size[1], mul=affine[0], add=affine[1]
  )


@tf.autograph.experimental.do_not_convert
def jpeg_shapes(contents) -> tf.Tensor:
  """int32 [b, 3]: (1, height, width) of each JPEG in contents (string [b]), from its header;
  (0, 0, 0) for data that is not a JPEG (tf.io.is_jpeg's test). Errors on a corrupt header."""
  return _load().vit_jax_jpeg_shapes(contents)
