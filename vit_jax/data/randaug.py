"""RandAugment (Cubuk et al., 2019) with stateless randomness, on [h, w, 3] images in 0..255.

The op set and magnitude-to-argument mapping are those of the TPU reference implementation that
big_vision's `randaug` op calls for ViT/AugReg (big_vision/pp/archive/autoaugment.py:662-700
`distort_image_with_randaugment`, :506-527 `level_to_arg`): 16 ops (Cutout included, no Identity),
each layer applies one drawn uniformly, always (the drawn probability is unused there), grey (128)
fill, translations in pixels (100 at magnitude 10, `translate_const`), Cutout squares of side
2 * 40 * magnitude / 10 (`cutout_const`). Magnitudes are on the paper's 0..10 scale; larger values
(AugReg uses 15 and 20) extrapolate linearly, as there.
"""

import math

import tensorflow as tf

_MAX_LEVEL = 10.0
_FILL = 128


def _blend(image1, image2, factor):
  """image1 + factor * (image2 - image1), clipped to uint8 (extrapolates for factor > 1)."""
  a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
  return tf.saturate_cast(tf.round(a + factor * (b - a)), tf.uint8)


def _transform(image, transform):
  """Projective transform (output pixel -> input pixel), nearest, grey fill outside."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
    output_shape=tf.shape(image)[:2],
    fill_value=tf.constant(_FILL, tf.float32),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )
  return out[0]


def _signed(value, seed):
  sign = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)
  return sign * value


def cutout(image, level, seed):
  """A square of side 2 * pad (pad = int(level / 10 * 40)) filled with grey, centred uniformly
  over the image and clipped to it (autoaugment.py:132-177, :521)."""
  pad = int(level / _MAX_LEVEL * 40)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cy = tf.random.stateless_uniform([], seed_y, 0, h, tf.int32)
  cx = tf.random.stateless_uniform([], seed_x, 0, w, tf.int32)
  ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
  inside = (ys >= cy - pad) & (ys < cy + pad) & (xs >= cx - pad) & (xs < cx + pad)
  return tf.where(inside[:, :, None], tf.constant(_FILL, tf.uint8), image)


def auto_contrast(image, level, seed):
  def channel(c):
    c = tf.cast(c, tf.float32)
    lo, hi = tf.reduce_min(c), tf.reduce_max(c)
    scaled = (c - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.where(hi > lo, scaled, c)

  out = tf.stack([channel(image[..., i]) for i in range(3)], -1)
  return tf.saturate_cast(tf.round(out), tf.uint8)


def equalize(image, level, seed):
  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.histogram_fixed_width(c, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(hist, hist != 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.where(step == 0, c, tf.gather(lut, c))

  return tf.cast(tf.stack([channel(image[..., i]) for i in range(3)], -1), tf.uint8)


def invert(image, level, seed):
  return 255 - image


def rotate(image, level, seed):
  angle = _signed(level / _MAX_LEVEL * 30.0, seed) * math.pi / 180.0
  h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32) - 1)
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_off = (w - (cos * w - sin * h)) / 2.0
  y_off = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0]))


def posterize(image, level, seed):
  shift = 8 - tf.maximum(tf.cast(level / _MAX_LEVEL * 4, tf.int32), 1)
  shift = tf.cast(tf.maximum(shift, 0), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, level, seed):
  threshold = tf.cast(tf.minimum(level / _MAX_LEVEL * 256, 256), tf.int32)
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, level, seed):
  added = tf.saturate_cast(tf.cast(image, tf.int32) + int(level / _MAX_LEVEL * 110), tf.uint8)
  return tf.where(image < 128, added, image)


def _enhance_factor(level):
  return level / _MAX_LEVEL * 1.8 + 0.1


def color(image, level, seed):
  gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return _blend(gray, image, _enhance_factor(level))


def contrast(image, level, seed):
  gray = tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)
  mean = tf.fill(tf.shape(image), tf.reduce_mean(gray))
  return _blend(mean, image, _enhance_factor(level))


def brightness(image, level, seed):
  return _blend(tf.zeros_like(image), image, _enhance_factor(level))


def sharpness(image, level, seed):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1] * 4, 'VALID')[0]
  smooth = tf.pad(tf.saturate_cast(tf.round(smooth), tf.uint8), [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  interior = tf.pad(tf.ones([h - 2, w - 2, 3], tf.bool), [[1, 1], [1, 1], [0, 0]])
  return _blend(tf.where(interior, smooth, image), image, _enhance_factor(level))


def shear_x(image, level, seed):
  s = _signed(level / _MAX_LEVEL * 0.3, seed)
  return _transform(image, tf.stack([1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, level, seed):
  s = _signed(level / _MAX_LEVEL * 0.3, seed)
  return _transform(image, tf.stack([1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, level, seed):
  # In pixels whatever the image size (translate_const: 100), autoaugment.py:499-501.
  dx = _signed(level / _MAX_LEVEL * 100.0, seed)
  return _transform(image, tf.stack([1.0, 0.0, -dx, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, level, seed):
  dy = _signed(level / _MAX_LEVEL * 100.0, seed)
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -dy, 0.0, 0.0]))


# In the reference's order (autoaugment.py:680-683).
OPS = (
  auto_contrast,
  equalize,
  invert,
  rotate,
  posterize,
  solarize,
  color,
  contrast,
  brightness,
  sharpness,
  shear_x,
  shear_y,
  translate_x,
  translate_y,
  cutout,
  solarize_add,
)


def randaugment(image, num_layers: int, magnitude: float, seed):
  """Applies `num_layers` ops drawn uniformly from OPS at `magnitude`; seed: int [2] tensor."""
  if image.dtype.is_floating:  # After a resize: values are 0..255 floats.
    image = tf.saturate_cast(tf.round(image), tf.uint8)
  elif image.dtype != tf.uint8:
    raise ValueError(f'randaug expects images with values 0..255, got {image.dtype}')
  shape = image.shape
  level = float(magnitude)
  for i in range(num_layers):
    op_seed, arg_seed = tf.unstack(
      tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, i), 2)
    )
    index = tf.random.stateless_uniform([], op_seed, 0, len(OPS), tf.int32)
    branches = [lambda op=op, x=image, s=arg_seed: op(x, level, s) for op in OPS]
    image = tf.switch_case(index, branches)
    image.set_shape(shape)
  return image
