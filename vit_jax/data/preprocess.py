"""Preprocessing ops composed from a string: `decode|resize_small(256)|central_crop(224)|...`.

Each op is a factory `name(*args, **kwargs)` registered by name, returning a few TensorFlow calls
with big_vision's semantics (docs/data.md has the table). Image ops map one image; random ones
also take a stateless seed: the example's `_rng`, its first word salted with the op's index in the
string, so an example at a given stream position gets the same augmentation, eagerly or in tf.data.
"""

import ast
from collections.abc import Callable

import tensorflow as tf

from vit_jax.data import randaug

_OPS: dict[str, tuple[Callable, str]] = {}  # name -> (factory, kind)


def register(name: str, kind: str = 'image'):
  """Adds an op factory under `name`. kind: 'image' (`fn(image) -> image`), 'random'
  (`fn(image, seed) -> image`) or 'label' (`fn(data) -> data`, reads no image and no seed)."""

  def wrap(factory):
    _OPS[name] = (factory, kind)
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


def _kind(spec: str) -> str | None:
  name = parse_op(spec)[0]
  return 'device' if name == 'value_range' else _OPS.get(name, (None, None))[1]


def split(pp: str) -> tuple[str, str]:
  """(host part, device part) of `pp`: the device part is its trailing `value_range` ops; label
  ops after them stay on the host (they commute with image ops)."""
  specs = [s.strip() for s in pp.split('|') if s.strip()]
  tail = len(specs)
  while tail and _kind(specs[tail - 1]) in ('device', 'label'):
    tail -= 1
  host = specs[:tail] + [s for s in specs[tail:] if _kind(s) == 'label']
  return '|'.join(host), '|'.join(s for s in specs[tail:] if _kind(s) == 'device')


def num_deterministic(pp: str) -> int:
  """How many ops at the start of `pp` read no seed (their results may be cached)."""
  kinds = [_kind(s) for s in pp.split('|') if s.strip()] + ['random']
  return kinds.index('random') if None not in kinds else 0


def get_preprocess_fn(pp: str, start: int = 0, stop: int | None = None) -> Callable:
  """Returns `fn(data) -> data` applying the ops of `pp` (separated by `|`) in order; with
  `start`, `stop` only ops[start:stop], each random op with its seed from the whole string.

  Raises:
    ValueError: an unknown op name (the message lists the known ones) or bad arguments.
  """
  ops = []
  for i, spec in enumerate(s for s in pp.split('|') if s.strip()):
    name, args, kwargs = parse_op(spec)
    if name not in _OPS:
      raise ValueError(f'Unknown preprocessing op {name!r} in {pp!r}; known: {sorted(_OPS)}')
    factory, kind = _OPS[name]
    try:
      ops.append((factory(*args, **kwargs), kind, (i * 0x9E3779B97F4A7C15) % (1 << 63)))
    except TypeError as e:
      raise ValueError(f'Bad arguments for preprocessing op {spec!r}: {e}') from e

  def fn(data):
    data = dict(data)
    rng = data.pop('_rng', tf.constant([0, 0], tf.int64))
    for op, kind, salt in ops[start:stop]:
      if kind == 'label':
        data = op(data)
      elif kind == 'random':
        # One add, where a fold_in costs several ops: seeds are Philox keys, distinct seeds
        # give independent streams; the odd multiplier keeps the ops' seeds apart.
        data['image'] = op(data['image'], rng + tf.constant([salt, 0], tf.int64))
      else:
        data['image'] = op(data['image'])
    return data

  return fn


def _size(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _resize(image, size, method, antialias):
  """tf.image.resize, clipped and cast back to the input's dtype (as big_vision)."""
  dtype = image.dtype
  image = tf.image.resize(image, size, method=method, antialias=antialias)
  return tf.cast(tf.clip_by_value(image, dtype.min, dtype.max), dtype)


@register('decode')
def decode(channels: int = 3):
  """JPEG/PNG/BMP/GIF bytes -> uint8 [h, w, channels]; decoded images pass through (1 or 4
  channels -> RGB)."""

  def fn(image):
    if image.dtype == tf.string:
      return tf.io.decode_image(image, channels=channels, expand_animations=False)
    if channels == 3 and image.shape[-1] == 1:
      return tf.image.grayscale_to_rgb(image)
    return image[..., :3] if channels == 3 and image.shape[-1] == 4 else image

  return fn


def _decode_window(image, window_fn):
  """The window `window_fn(shape) -> (begin, size)` of an image (tf.slice's: [y, x, 0], [h, w, -1]).
  Of a JPEG only the window is decoded (`decode_and_crop_jpeg`); other formats are decoded whole
  (`decode`), then cropped."""
  crop = lambda x: tf.ensure_shape(tf.slice(x, *window_fn(tf.shape(x))), [None, None, x.shape[-1]])
  if image.dtype != tf.string:
    return crop(image)

  def jpeg():
    begin, size = window_fn(tf.image.extract_jpeg_shape(image))
    return tf.image.decode_and_crop_jpeg(image, tf.concat([begin[:2], size[:2]], 0), channels=3)

  return tf.ensure_shape(
    tf.cond(tf.io.is_jpeg(image), jpeg, lambda: crop(decode()(image))), [None, None, 3]
  )


@register('inception_crop', 'random')
@register('decode_jpeg_and_inception_crop', 'random')
def decode_jpeg_and_inception_crop(
  size=None, area_min=5, area_max=100, aspect=(3 / 4, 4 / 3), method='bilinear', antialias=False
):
  """Inception crop (random area in %, aspect) resized to `size` if given (big_vision's op): of
  an encoded JPEG only the crop is decoded; `inception_crop` is the same op on a decoded image."""

  def fn(image, seed):
    window = lambda shape: tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=aspect,
      area_range=(area_min / 100, area_max / 100),
      use_image_if_no_bounding_boxes=True,
    )[:2]
    image = _decode_window(image, window)
    return _resize(image, _size(size), method, antialias) if size else image

  return fn


@register('decode_jpeg_and_central_crop')
def decode_jpeg_and_central_crop(size: int, crop_fraction: float = 224 / 256, method='bilinear'):
  """The TPU reference eval (resnet_preprocessing `_decode_and_center_crop`): the central
  `crop_fraction` of the shorter side, decoded alone, resized to `size`."""

  def window(shape):
    crop = tf.cast(crop_fraction * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32), tf.int32)
    begin = tf.stack([(shape[0] - crop + 1) // 2, (shape[1] - crop + 1) // 2, 0])
    return begin, tf.stack([crop, crop, -1])

  return lambda image: _resize(_decode_window(image, window), _size(size), method, False)


@register('resize')
def resize(size, method: str = 'bilinear', antialias: bool = False):
  """Resizes to `size` (int or (h, w)); the output keeps the input's dtype."""
  return lambda image: _resize(image, _size(size), method, antialias)


@register('resize_small')
def resize_small(size: int, method: str = 'area', antialias: bool = False):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio (big_vision's)."""

  def fn(image):
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.cast(tf.round(hw * (size / tf.reduce_min(hw))), tf.int32)
    return _resize(image, new_hw, method, antialias)

  return fn


@register('central_crop')
def central_crop(size):
  """Crops the central `size` window (int or (h, w))."""
  ch, cw = _size(size)
  return lambda image: tf.image.crop_to_bounding_box(
    image, (tf.shape(image)[0] - ch) // 2, (tf.shape(image)[1] - cw) // 2, ch, cw
  )


@register('random_crop', 'random')
def random_crop(size):
  """Crops a uniformly random `size` window (int or (h, w))."""
  ch, cw = _size(size)
  return lambda image, seed: tf.image.stateless_random_crop(image, [ch, cw, image.shape[-1]], seed)


@register('flip_lr', 'random')
def flip_lr():
  """Flips left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right


@register('randaug', 'random')
def randaugment(num_layers: int = 2, magnitude: int = 10):
  """RandAugment (Cubuk et al. 2019): `num_layers` random ops at `magnitude`; uint8 output."""
  return lambda image, seed: randaug.randaugment(image, num_layers, magnitude, seed)


def value_range_fn(vmin=-1, vmax=1, in_min=0, in_max=255, clip=False, *, clip_fn=tf.clip_by_value):
  """`fn(x)` mapping float32 x linearly from [in_min, in_max] to [vmin, vmax], on tf or jnp arrays.

  ((x - in_min) * (vmax - vmin) + vmin * (in_max - in_min)) / (in_max - in_min): with integer
  arguments every step before the division is exact, so the ends map exactly (255 -> 1.0) even
  where a compiler fuses the multiply-add.
  """

  def fn(x):
    x = ((x - in_min) * (vmax - vmin) + vmin * (in_max - in_min)) / (in_max - in_min)
    return clip_fn(x, vmin, vmax) if clip else x

  return fn


@register('value_range')
def value_range(*args, **kwargs):
  """`value_range(vmin=-1, vmax=1, in_min=0, in_max=255, clip=False)`: pixel values as float32
  (`value_range_fn`); at the end of a string it runs on the device (`device.device_preprocess`)."""
  fn = value_range_fn(*args, **kwargs)
  return lambda image: fn(tf.cast(image, tf.float32))


@register('onehot', 'label')
def onehot(depth: int, smoothing: float = 0.0, key: str = 'label', key_result: str = 'labels'):
  """Adds float32 soft targets: one-hot of `label` with label smoothing (sums to 1)."""
  on, off = 1.0 - smoothing + smoothing / depth, smoothing / depth
  one_hot = lambda label: tf.one_hot(tf.cast(label, tf.int32), depth, on, off, dtype=tf.float32)
  return lambda data: {**data, key_result: one_hot(data[key])}
