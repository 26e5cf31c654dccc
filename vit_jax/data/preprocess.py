"""Preprocessing ops composed from a string: `decode|resize_small(256)|central_crop(224)|...`.

Every op is a factory `name(*args, **kwargs) -> fn(data) -> data` on one example dict (`image`,
`label`, ...), a few calls of TensorFlow's own kernels with big_vision's semantics: resizes keep
the input's dtype (uint8 in, uint8 out: clipped and cast back), `resize_small` is `area` without
antialias. Random ops are stateless: they read the per-example seed `data['_rng']` (int64 [2])
salted with the op's position in the string, so an example at a given stream position always gets
the same augmentation, eagerly or in tf.data.

A string splits in two (`split`): trailing `value_range` ops run on the device, inside the jitted
step (`device.py`), so that images cross the host boundary as uint8; everything else runs here.
"""

import ast
from collections.abc import Callable

import tensorflow as tf

from vit_jax.data import randaug

Op = Callable[[dict], dict]
_OPS: dict[str, Callable[..., Op]] = {}
DEVICE_OPS = ('value_range',)  # Ops that may run on the device when they end the string.
LABEL_OPS = ('onehot',)  # Ops that never read the image: they may follow the device ops.


def register(name: str):
  """Decorator adding an op factory to the registry under `name`."""

  def wrap(factory):
    _OPS[name] = factory
    return factory

  return wrap


def parse_op(spec: str) -> tuple[str, tuple, dict]:
  """Parses `'name(1, 2, key="v")'` into `('name', (1, 2), {'key': 'v'})`; literals only."""
  spec = spec.strip()
  try:
    node = ast.parse(spec if '(' in spec else spec + '()', mode='eval').body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
      raise ValueError
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(f'Cannot parse preprocessing op {spec!r}: expected name(literal, ...)') from e
  return node.func.id, args, kwargs


def split(pp: str) -> tuple[str, str]:
  """(host part, device part) of `pp`: the device part is its trailing `value_range` ops.

  Label-only ops (`onehot`) after them stay on the host; they commute with image ops.
  """
  specs = [s.strip() for s in pp.split('|') if s.strip()]
  names = [parse_op(s)[0] for s in specs]
  device = []
  for i in reversed(range(len(specs))):
    if names[i] in DEVICE_OPS:
      device.insert(0, i)
    elif names[i] not in LABEL_OPS:
      break
  host = [s for i, s in enumerate(specs) if i not in device]
  return '|'.join(host), '|'.join(specs[i] for i in device)


def get_preprocess_fn(pp: str) -> Op:
  """Returns `fn(data) -> data` applying the ops of `pp` (separated by `|`) in order.

  Raises:
    ValueError: an unknown op name (the message lists the known ones) or bad arguments.
  """
  ops = []
  for spec in (s for s in pp.split('|') if s.strip()):
    name, args, kwargs = parse_op(spec)
    if name not in _OPS:
      raise ValueError(f'Unknown preprocessing op {name!r} in {pp!r}; known: {sorted(_OPS)}')
    try:
      ops.append(_OPS[name](*args, **kwargs))
    except TypeError as e:
      raise ValueError(f'Bad arguments for preprocessing op {spec!r}: {e}') from e

  def fn(data):
    data = dict(data)
    rng = data.pop('_rng', tf.constant([0, 0], tf.int64))
    for i, op in enumerate(ops):
      data['_rng'], data['_op_index'] = rng, i
      data = op(data)
    data.pop('_op_index', None)
    data.pop('_rng', None)
    return data

  return fn


def _seed(data):
  """The seed of the current random op: the example's, its first word salted with the op's index.

  One add, where a fold_in costs several ops per example: seeds are Philox keys and counters, so
  distinct seeds give independent streams; the salt (a multiple of an odd 64-bit constant) keeps
  the ops' seeds distinct, and apart from other processes' (their first words are hashes).
  """
  salt = (data['_op_index'] * 0x9E3779B97F4A7C15) % (1 << 63)
  return data['_rng'] + tf.constant([salt, 0], tf.int64)


def _size(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _to_rgb(image):
  """Grayscale -> RGB, RGBA -> RGB (drops alpha); needs a known channel count."""
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  return image[..., :3] if channels == 4 else image


def _resize(image, size, method, antialias):
  """tf.image.resize, clipped and cast back to the input's dtype (as big_vision)."""
  dtype = image.dtype
  image = tf.image.resize(image, size, method=method, antialias=antialias)
  return tf.cast(tf.clip_by_value(image, dtype.min, dtype.max), dtype)


def _decode(image, channels=3):
  if image.dtype != tf.string:  # Already decoded (e.g. datasets of uint8 arrays).
    return _to_rgb(image) if channels == 3 else image
  return tf.io.decode_image(image, channels=channels, expand_animations=False)


@register('decode')
def decode(channels: int = 3) -> Op:
  """Decodes JPEG/PNG/BMP/GIF bytes into uint8 [h, w, channels]; decoded images pass through."""

  def fn(data):
    data['image'] = _decode(data['image'], channels)
    return data

  return fn


def _inception_box(shape, seed, area_min, area_max, aspect):
  """(begin, size) of a stateless Inception crop of an image of `shape` [h, w, c]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=aspect,
    area_range=(area_min / 100, area_max / 100),
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


@register('inception_crop')
def inception_crop(
  size=None, area_min=5, area_max=100, aspect=(3 / 4, 4 / 3), method='bilinear', antialias=False
) -> Op:
  """Inception crop (random area in % and aspect) of a decoded image, resized to `size` if given."""

  def fn(data):
    image = data['image']
    begin, crop = _inception_box(tf.shape(image), _seed(data), area_min, area_max, aspect)
    image = tf.slice(image, begin, crop)
    image.set_shape([None, None, data['image'].shape[-1]])
    data['image'] = _resize(image, _size(size), method, antialias) if size else image
    return data

  return fn


def _decode_window(raw, window_fn):
  """Decodes the window `window_fn(shape) -> (y, x, h, w)` of an image: of a JPEG only the window
  is decoded (`decode_and_crop_jpeg`); other formats are decoded whole, then cropped."""

  def jpeg():
    return tf.image.decode_and_crop_jpeg(raw, window_fn(tf.image.extract_jpeg_shape(raw)), 3)

  def other():
    image = _decode(raw)
    y, x, h, w = tf.unstack(window_fn(tf.shape(image)))
    return tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, 3]))

  image = tf.cond(tf.io.is_jpeg(raw), jpeg, other) if raw.dtype == tf.string else other()
  image.set_shape([None, None, 3])
  return image


@register('decode_jpeg_and_inception_crop')
def decode_jpeg_and_inception_crop(
  size=None, area_min=5, area_max=100, aspect=(3 / 4, 4 / 3), method='bilinear', antialias=False
) -> Op:
  """`decode|inception_crop(...)` decoding only the crop of a JPEG (big_vision's op:
  extract_jpeg_shape, sample_distorted_bounding_box, decode_and_crop_jpeg, resize)."""

  def fn(data):
    seed = _seed(data)

    def window(shape):
      begin, crop = _inception_box(shape, seed, area_min, area_max, aspect)
      return tf.stack([begin[0], begin[1], crop[0], crop[1]])

    image = _decode_window(data['image'], window)
    data['image'] = _resize(image, _size(size), method, antialias) if size else image
    return data

  return fn


@register('decode_jpeg_and_central_crop')
def decode_jpeg_and_central_crop(size: int, crop_fraction: float = 224 / 256, method='bilinear'):
  """The TPU reference ImageNet eval (tensorflow/tpu resnet_preprocessing `_decode_and_center_crop`,
  CROP_PADDING=32 at 224): the central `crop_fraction` of the shorter side, decoded alone, resized
  to `size`."""

  def window(shape):
    h, w = shape[0], shape[1]
    crop = tf.cast(crop_fraction * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    return tf.stack([(h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop])

  def fn(data):
    data['image'] = _resize(_decode_window(data['image'], window), _size(size), method, False)
    return data

  return fn


@register('resize')
def resize(size, method: str = 'bilinear', antialias: bool = False) -> Op:
  """Resizes to `size` (int or (h, w)); the output keeps the input's dtype."""

  def fn(data):
    data['image'] = _resize(data['image'], _size(size), method, antialias)
    return data

  return fn


@register('resize_small')
def resize_small(size: int, method: str = 'area', antialias: bool = False) -> Op:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio (big_vision's)."""

  def fn(data):
    image = data['image']
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ratio = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
    data['image'] = _resize(image, tf.stack([new_h, new_w]), method, antialias)
    return data

  return fn


@register('central_crop')
def central_crop(size) -> Op:
  """Crops the central `size` window (int or (h, w))."""
  ch, cw = _size(size)

  def fn(data):
    image = data['image']
    dy, dx = (tf.shape(image)[0] - ch) // 2, (tf.shape(image)[1] - cw) // 2
    data['image'] = tf.image.crop_to_bounding_box(image, dy, dx, ch, cw)
    return data

  return fn


@register('random_crop')
def random_crop(size) -> Op:
  """Crops a uniformly random `size` window (int or (h, w))."""
  ch, cw = _size(size)

  def fn(data):
    image = data['image']
    data['image'] = tf.image.stateless_random_crop(image, [ch, cw, image.shape[-1]], _seed(data))
    return data

  return fn


@register('flip_lr')
def flip_lr() -> Op:
  """Flips left-right with probability 1/2."""

  def fn(data):
    data['image'] = tf.image.stateless_random_flip_left_right(data['image'], _seed(data))
    return data

  return fn


@register('value_range')
def value_range(
  vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255, clip: bool = False
) -> Op:
  """Maps pixel values linearly from [in_min, in_max] to [vmin, vmax] as float32.

  Computed as ((x - in_min) * (vmax - vmin) + vmin * (in_max - in_min)) / (in_max - in_min): with
  integer arguments every step before the division is exact, so the ends map exactly (255 -> 1.0)
  even where a compiler fuses the multiply-add. At the end of a string it runs on the device
  instead (`device.value_range`: the same arithmetic, equal to a float32 step).
  """

  def fn(data):
    x = tf.cast(data['image'], tf.float32)
    image = ((x - in_min) * (vmax - vmin) + vmin * (in_max - in_min)) / (in_max - in_min)
    data['image'] = tf.clip_by_value(image, vmin, vmax) if clip else image
    return data

  return fn


@register('onehot')
def onehot(depth: int, smoothing: float = 0.0, key: str = 'label', key_result: str = 'labels'):
  """Adds float32 soft targets: one-hot of `label` with label smoothing (sums to 1)."""
  on, off = 1.0 - smoothing + smoothing / depth, smoothing / depth

  def fn(data):
    label = tf.cast(data[key], tf.int32)
    data[key_result] = tf.one_hot(label, depth, on_value=on, off_value=off, dtype=tf.float32)
    return data

  return fn


@register('randaug')
def randaugment(num_layers: int = 2, magnitude: int = 10) -> Op:
  """RandAugment (Cubuk et al. 2019): `num_layers` random ops at `magnitude`; uint8 output."""

  def fn(data):
    data['image'] = randaug.randaugment(data['image'], num_layers, magnitude, _seed(data))
    return data

  return fn
