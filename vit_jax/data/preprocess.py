"""Preprocessing ops composed from a string: `decode|inception_crop(224)|flip_lr|value_range(-1,1)`.

Every op is a factory `name(*args, **kwargs) -> fn(data) -> data` working on one example dict
(`image`, `label`, ...). Random ops are stateless: they read the per-example seed `data['_rng']`
(an int64 [2] tensor) folded with the op's position in the string (`data['_op_index']`), so the
same example at the same stream position always gets the same augmentation, eagerly or in tf.data.
"""

import ast
from collections.abc import Callable

import tensorflow as tf

from vit_jax.data import randaug

Op = Callable[[dict], dict]
_OPS: dict[str, Callable[..., Op]] = {}


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
    data.setdefault('_rng', tf.constant([0, 0], tf.int64))
    for i, op in enumerate(ops):
      data['_op_index'] = i  # A Python int: random ops fold it into their seed.
      data = op(data)
    data.pop('_op_index', None)
    return data

  return fn


def _size(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _seed(data):
  return tf.random.experimental.stateless_fold_in(data['_rng'], data.get('_op_index', 0))


def _to_rgb(image):
  """Grayscale -> RGB, RGBA -> RGB (drops alpha); needs a known channel count."""
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 4:
    return image[..., :3]
  return image


def _resize(image, size, method, antialias=False):
  # Output float32 (values still 0..255), kept by the ops: a cast back to uint8 and then to float
  # for value_range would cost three more passes over every pixel. Non-nearest methods resize a
  # float32 copy: TF's float kernels are ~2x faster than its uint8 ones and give identical values
  # (they convert each input pixel to float32 anyway).
  if method != 'nearest' and image.dtype != tf.float32:
    image = tf.cast(image, tf.float32)
  return tf.image.resize(image, size, method=method, antialias=antialias)


@register('decode')
def decode(channels: int = 3) -> Op:
  """Decodes JPEG/PNG/BMP/GIF bytes into uint8 [h, w, 3]; already-decoded images pass through."""

  def fn(data):
    image = data['image']
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    data['image'] = _to_rgb(image)
    return data

  return fn


def _inception_box(shape, seed, area_min, area_max, aspect):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
    seed=seed,
    area_range=(area_min / 100, area_max / 100),
    aspect_ratio_range=aspect,
    min_object_covered=0.0,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


@register('decode_jpeg_and_inception_crop')
def decode_jpeg_and_inception_crop(
  size=None, area_min: float = 5, area_max: float = 100, aspect=(3 / 4, 4 / 3), method='bilinear'
) -> Op:
  """Inception crop fused with JPEG decoding: only the sampled window is decoded.

  `area_min`/`area_max` are percentages of the image area. Non-JPEG bytes (PNG, ...) are decoded
  fully, then cropped with the same window. `size=None` keeps the crop's own size.
  """

  def fn(data):
    raw = data['image']
    if raw.dtype != tf.string:
      return inception_crop(size, area_min, area_max, aspect, method)(data)

    def jpeg():
      shape = tf.io.extract_jpeg_shape(raw)
      begin, crop = _inception_box(shape, _seed(data), area_min, area_max, aspect)
      window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
      return tf.image.decode_and_crop_jpeg(raw, window, channels=3)

    def other():
      image = tf.io.decode_image(raw, channels=3, expand_animations=False)
      begin, crop = _inception_box(tf.shape(image), _seed(data), area_min, area_max, aspect)
      return tf.slice(image, begin, crop)

    image = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    image.set_shape([None, None, 3])
    if size is not None:
      image = _resize(image, _size(size), method)
    data['image'] = image
    return data

  return fn


@register('decode_jpeg_and_central_crop')
def decode_jpeg_and_central_crop(size: int, crop_fraction: float = 224 / 256, method='bilinear'):
  """`decode|resize_small(round(size / crop_fraction))|central_crop(size)`, fused.

  Decodes only the source window that the unfused ops sample (rounded to whole pixels), then
  resizes it to `size` once; the JPEG outside the window is not decoded. The sampling grid
  differs from the unfused one by under a pixel, so pixels differ slightly (at edges most), as in
  the TPU reference ResNet/EfficientNet input pipelines, which also crop the central 224/256 of
  the shorter side and resize it once. Non-JPEG bytes (and decoded images) are cropped the same
  way after a full decode.
  """
  small = round(size / crop_fraction)

  def window(shape):
    # resize_small's output size and central_crop's offset, mapped back to source pixels.
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    ratio = small / tf.minimum(h, w)
    new_h, new_w = tf.round(h * ratio), tf.round(w * ratio)
    scale_h, scale_w = h / new_h, w / new_w
    top, left = tf.floor((new_h - size) / 2) * scale_h, tf.floor((new_w - size) / 2) * scale_w
    crop_h = tf.minimum(tf.maximum(tf.round(size * scale_h), 1), h)
    crop_w = tf.minimum(tf.maximum(tf.round(size * scale_w), 1), w)
    top = tf.clip_by_value(tf.round(top), 0, h - crop_h)
    left = tf.clip_by_value(tf.round(left), 0, w - crop_w)
    return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)

  def fn(data):
    raw = data['image']

    def jpeg():
      return tf.image.decode_and_crop_jpeg(raw, window(tf.io.extract_jpeg_shape(raw)), 3)

    def other():
      image = tf.io.decode_image(raw, channels=3, expand_animations=False)
      w = window(tf.shape(image))
      return tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3])

    if raw.dtype != tf.string:  # Already decoded.
      image = _to_rgb(raw)
      w = window(tf.shape(image))
      image = tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3])
    else:
      image = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    image.set_shape([None, None, 3])
    data['image'] = _resize(image, (size, size), method)
    return data

  return fn


@register('inception_crop')
def inception_crop(size=None, area_min=5, area_max=100, aspect=(3 / 4, 4 / 3), method='bilinear'):
  """Inception crop of an already decoded image, then resize to `size` (if given)."""

  def fn(data):
    image = data['image']
    begin, crop = _inception_box(tf.shape(image), _seed(data), area_min, area_max, aspect)
    image = tf.slice(image, begin, crop)
    if size is not None:
      image = _resize(image, _size(size), method)
    data['image'] = image
    return data

  return fn


@register('resize')
def resize(size, method: str = 'bilinear', antialias: bool = False) -> Op:
  """Resizes to `size` (int or (h, w)); float32 output, values in the input's range."""

  def fn(data):
    image = data['image']
    data['image'] = _resize(image, _size(size), method, antialias)
    return data

  return fn


@register('resize_small')
def resize_small(size: int, method: str = 'bilinear', antialias: bool = False) -> Op:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio; float32 output."""

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
    top, left = (tf.shape(image)[0] - ch) // 2, (tf.shape(image)[1] - cw) // 2
    # A plain slice: crop_to_bounding_box adds shape assertions that cost more than the copy.
    data['image'] = tf.slice(image, tf.stack([top, left, 0]), [ch, cw, image.shape[-1] or -1])
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
  """Maps pixel values linearly from [in_min, in_max] to [vmin, vmax] as float32."""

  scale = (vmax - vmin) / (in_max - in_min)
  offset = vmin - in_min * scale

  def fn(data):
    image = tf.cast(data['image'], tf.float32) * scale + offset
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


def mixup(batch: dict, seed, *, p: float, cutmix_p: float = 0.0, num_classes: int) -> dict:
  """Mixes each example with its neighbour in the batch (roll by one), as in big_vision.

  The mixing ratio is drawn per batch from Beta(p, p); with probability `cutmix_p` the batch uses
  CutMix (a box pasted from the neighbour, ratio = its area) instead of blending. `labels` (soft
  targets, created from `label` if missing) are mixed with the same ratio; `label` is unchanged.
  """
  seeds = tf.random.experimental.stateless_split(seed, 4)
  alpha = tf.constant(max(p, 1e-6), tf.float32)
  g = tf.random.stateless_gamma([2], seeds[0], alpha=alpha)
  ratio = g[0] / (g[0] + g[1])
  images = tf.cast(batch['image'], tf.float32)
  other = tf.roll(images, 1, axis=0)
  if 'labels' not in batch:
    batch['labels'] = tf.one_hot(tf.cast(batch['label'], tf.int32), num_classes)
  h, w = tf.shape(images)[1], tf.shape(images)[2]

  def blend():
    return ratio * images + (1 - ratio) * other, ratio

  def cut():
    # Box covering (1 - ratio) of the area, centred uniformly, clipped to the image.
    frac = tf.sqrt(1.0 - ratio)
    bh = tf.cast(frac * tf.cast(h, tf.float32), tf.int32)
    bw = tf.cast(frac * tf.cast(w, tf.float32), tf.int32)
    cy = tf.random.stateless_uniform([], seeds[1], 0, h, tf.int32)
    cx = tf.random.stateless_uniform([], seeds[2], 0, w, tf.int32)
    y0, y1 = tf.maximum(cy - bh // 2, 0), tf.minimum(cy + bh - bh // 2, h)
    x0, x1 = tf.maximum(cx - bw // 2, 0), tf.minimum(cx + bw - bw // 2, w)
    ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    box = tf.cast(box, tf.float32)[None, :, :, None]
    kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
    return images * (1 - box) + other * box, kept

  use_cut = tf.random.stateless_uniform([], seeds[3]) < cutmix_p
  mixed, ratio = tf.cond(use_cut, cut, blend)
  batch['image'] = tf.cast(mixed, batch['image'].dtype)
  labels = batch['labels']
  batch['labels'] = ratio * labels + (1 - ratio) * tf.roll(labels, 1, axis=0)
  return batch


# Published recipes. `{size}` is the training/eval resolution.
def preset(name: str, image_size: int | None = None) -> dict:
  """Named preprocessing recipes: returns {'train_pp', 'eval_pp', 'mixup', 'image_size'}.

  - `vit_finetune`: original ViT fine-tuning (Dosovitskiy et al.): Inception crop + flip for
    train, plain resize for eval, at 384.
  - `augreg`: AugReg (Steiner et al.) at 224: Inception crop, flip, RandAugment 2x15, mixup 0.5;
    eval `resize_small(256)|central_crop(224)` (ImageNet eval).
  - `imagenet_eval`: `resize_small(size*256/224)|central_crop(size)` for both (no augmentation).
  - `imagenet_eval_fused`: the same window decoded alone and resampled once
    (`decode_jpeg_and_central_crop`): ~1.3x faster, pixels differ by under a source pixel's shift.
  - `digits`: the 8x8 digits upscaled to 32 (bilinear), no augmentation.

  Raises:
    ValueError: unknown preset name.
  """
  defaults = {
    'vit_finetune': 384,
    'augreg': 224,
    'imagenet_eval': 224,
    'imagenet_eval_fused': 224,
    'digits': 32,
  }
  if name not in defaults:
    raise ValueError(f'Unknown preprocessing preset {name!r}; known: {sorted(defaults)}')
  s = image_size or defaults[name]
  norm = 'value_range(-1,1)'
  crop = f'decode_jpeg_and_inception_crop({s})|flip_lr'
  # The published ImageNet eval, exactly; the fused form decodes only the central window.
  imagenet_eval = f'decode|resize_small({round(s * 256 / 224)})|central_crop({s})|{norm}'
  fused_eval = f'decode_jpeg_and_central_crop({s})|{norm}'
  recipes = {
    'vit_finetune': (f'{crop}|{norm}', f'decode|resize({s})|{norm}', None),
    'augreg': (f'{crop}|randaug(2,15)|{norm}', imagenet_eval, {'p': 0.5, 'cutmix_p': 0.0}),
    'imagenet_eval': (imagenet_eval, imagenet_eval, None),
    'imagenet_eval_fused': (fused_eval, fused_eval, None),
    'digits': (f'decode|resize({s})|{norm}', f'decode|resize({s})|{norm}', None),
  }
  train_pp, eval_pp, mix = recipes[name]
  return {'train_pp': train_pp, 'eval_pp': eval_pp, 'mixup': mix, 'image_size': s}
