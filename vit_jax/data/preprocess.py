"""Preprocessing ops composed from a string: `decode|inception_crop(224)|flip_lr|value_range(-1,1)`.

Every op is a factory `name(*args, **kwargs) -> fn(data) -> data` working on one example dict
(`image`, `label`, ...). Random ops are stateless: they read the per-example seed `data['_rng']`
(an int64 [2] tensor) folded with the op's position in the string (`data['_op_index']`), so the
same example at the same stream position always gets the same augmentation, eagerly or in tf.data.
"""

import ast
import dataclasses
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from vit_jax.data import fast_jpeg, fast_resize, randaug

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

  The geometric ops (decode, the crops, resizes, flip_lr, value_range) are lazy: they record what
  to do and the image is computed once, when an op that needs pixels comes or at the end. So only
  the JPEG rows a crop or resize reads are decoded, and a bilinear resize with its window, flip
  and value_range is one pass of the C kernel in `fast_resize`. Results equal the ops applied one
  by one with TensorFlow's kernels, to float32 rounding.

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

  def run(data):
    for i, op in enumerate(ops):
      data['_op_index'] = i  # A Python int: random ops fold it into their seed.
      if hasattr(op, 'deferred'):
        data = op.deferred(data)
      else:
        if not getattr(op, 'image_free', False):
          _materialize(data)
        data = op(data)
    data.pop('_op_index', None)
    return data

  def fn(data, *, batch_plan: bool = False):
    """`batch_plan=True` (inside tf.data, before batching): an image that `BatchPlan` can compute
    for the whole batch is left as its plan (see `plan_for_batch`); others are computed."""
    data = dict(data)
    data.setdefault('_rng', tf.constant([0, 0], tf.int64))
    data = run(data)
    if batch_plan:
      fn.batch_plan = plan_for_batch(data)
    _materialize(data)
    return data

  def batch_fn(data):
    """The same on a whole batch of encoded images (string [b]), in one op; see `batched`."""
    data = dict(data)  # `_keep` (bool [b]), if given: False rows come out zero.
    data['image'] = _start_batch(data['image'])
    data = run(data)
    plan = plan_for_batch(data)
    if plan is None:
      raise NotBatchable(f'{pp!r} does not end in a bilinear resize of a static size')
    return plan(data)

  fn.spec, fn.batch_plan = pp, None
  batchable = all(getattr(op, 'batchable', False) for op in ops)
  fn.batch_fn = batch_fn if batchable and any(hasattr(op, 'deferred') for op in ops) else None
  return fn


class NotBatchable(Exception):
  """Raised while tracing a batch preprocessing function that needs per-example work."""


def batched(fn: Op, extra_specs: dict | None = None) -> Op | None:
  """`fn`'s form that preprocesses a whole batch at once, or None where there is none.

  There is one where every op of the string is deterministic and geometric (decode, resizes,
  central crops, value_range, onehot), the result is a bilinear resize to a static size, and the
  ops in fast_jpeg/fast_resize are built. It takes {'image': string [b], ...} (encoded images;
  JPEGs' headers are read in one op, other formats decoded one by one) and computes all images
  with one op (`BatchPlan`): per example, no tf.data function call, no output tensor, no copy
  into the batch. Its images equal `fn`'s exactly.
  """
  batch_fn = getattr(fn, 'batch_fn', None)
  if batch_fn is None or not (fast_jpeg.available() and fast_resize.available()):
    return None
  specs = {'image': tf.TensorSpec([None], tf.string), **(extra_specs or {})}
  try:
    tf.function(batch_fn, autograph=False).get_concrete_function(specs)
  except NotBatchable:
    return None
  except Exception as e:  # noqa: BLE001 (an optimisation must not break a pipeline that works)
    spec = getattr(fn, 'spec', fn)
    logging.warning(
      'Preprocessing %r runs per example: its batch form failed to trace: %r', spec, e
    )
    return None
  return batch_fn


def _lazy(deferred: Op = None, *, batchable: bool = False):
  """A lazy op: `deferred` may leave a _Lazy image; called alone, the op computes it.

  `batchable`: the op is deterministic and its geometry elementwise, so it also runs on a batched
  _Lazy (every field a vector over the batch; `get_preprocess_fn(...).batch_fn`).
  """
  if deferred is None:
    return lambda deferred: _lazy(deferred, batchable=batchable)

  def fn(data):
    data = deferred(data)
    _materialize(data)
    return data

  fn.deferred = deferred
  fn.batchable = batchable
  return fn


def _stack(values, axis: int = 0) -> tf.Tensor:
  """int32 tf.stack of scalars, or of vectors (a batched _Lazy's fields) and scalars broadcast."""
  values = [tf.cast(v, tf.int32) for v in values]
  if any(v.shape.rank for v in values):
    shape = tf.shape(next(v for v in values if v.shape.rank))
    values = [tf.broadcast_to(v, shape) for v in values]
  return tf.stack(values, axis)


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


_JPEG_MARGIN = 2


@dataclasses.dataclass
class _Lazy:
  """An image described, not computed: source, crop, resize, window of it, flip and affine.

  The image it stands for is: decode `raw` (or take `image`), crop `crop` (y, x, h, w), resize
  that to `size`, take `window` (y, x, h, w) of the result, mirror it if `flip`, then
  value * affine[0] + affine[1]. Each step is optional; the order is fixed, and an op that does not
  fit it computes the image first (`_materialize`).
  """

  raw: tf.Tensor | None  # Encoded bytes whose decoding is pending, or None.
  is_jpeg: tf.Tensor | None  # With `raw`: JPEGs decode only the rows and columns needed.
  image: tf.Tensor  # The decoded image (an empty placeholder while a JPEG's decoding is pending).
  shape: tf.Tensor  # int32 [2]: the source's height and width.
  crop: tf.Tensor  # int32 [4].
  size: tuple | None = None
  method: str = 'bilinear'
  antialias: bool = False
  window: tuple | None = None  # Ints or int32 scalars.
  flip: tf.Tensor | None = None
  affine: tuple[float, float] | None = None
  # A batch of images (from _start_batch): raw, is_jpeg [b]; image: uint8 [b, n], pixels of those
  # that are not JPEGs; shape [2, b]; crop [4, b]; size and window ints or [b] vectors.
  batched: bool = False


def _start(data) -> _Lazy:
  """The lazy form of data['image'], started if needed (encoded bytes: decoding deferred)."""
  image = data['image']
  if isinstance(image, _Lazy):
    return image
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.string:
    shape = tf.shape(image)[:2]
    return _Lazy(None, None, image, shape, tf.stack([0, 0, shape[0], shape[1]]))
  is_jpeg = tf.io.is_jpeg(image)

  def jpeg():  # Only the header is read here.
    return tf.zeros([0, 0, 3], tf.uint8), tf.io.extract_jpeg_shape(image)[:2]

  def other():  # PNG, GIF, BMP: decoded whole, once.
    decoded = _to_rgb(tf.io.decode_image(image, channels=3, expand_animations=False))
    return decoded, tf.shape(decoded)[:2]

  decoded, shape = tf.cond(is_jpeg, jpeg, other)
  decoded.set_shape([None, None, 3])
  return _Lazy(image, is_jpeg, decoded, shape, tf.stack([0, 0, shape[0], shape[1]]))


def _start_batch(raw) -> _Lazy:
  """A batched _Lazy of encoded images raw (string [b]): JPEG headers are read in one op; images
  in other formats (rare in photo datasets) are decoded whole, one by one, padded to one size."""
  info = fast_jpeg.jpeg_shapes(raw)  # int32 [b, 3]: is_jpeg, h, w.
  is_jpeg = info[:, 0] > 0

  def jpegs():
    return info[:, 1:], tf.zeros([tf.shape(raw)[0], 0], tf.uint8)

  def others():
    def one(x):
      contents, jpeg = x
      image = tf.cond(
        jpeg,
        lambda: tf.zeros([0, 0, 3], tf.uint8),
        lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
      )
      return tf.shape(image)[:2], tf.reshape(image, [-1])

    shapes, pixels = tf.map_fn(
      one,
      (raw, is_jpeg),
      fn_output_signature=(
        tf.TensorSpec([2], tf.int32),
        tf.RaggedTensorSpec([None], tf.uint8, ragged_rank=0),
      ),
    )
    return tf.where(is_jpeg[:, None], info[:, 1:], shapes), pixels.to_tensor()

  shapes, pixels = tf.cond(tf.reduce_all(is_jpeg), jpegs, others)
  shape = tf.transpose(shapes)  # [2, b]
  zeros = tf.zeros_like(shape[0])
  crop = tf.stack([zeros, zeros, shape[0], shape[1]])
  return _Lazy(raw, is_jpeg, pixels, shape, crop, batched=True)


def _yxhw(box) -> tuple[tf.Tensor, ...]:
  """A box (y, x, h, w), tensor or sequence, as four int32 scalars."""
  if isinstance(box, tf.Tensor):
    box = tf.unstack(box, 4)
  return tuple(tf.cast(v, tf.int32) for v in box)


def _region(lazy: _Lazy, box) -> tuple[tf.Tensor, tf.Tensor]:
  """(pixels, origin): source pixels covering `box` (y, x, h, w), exact inside it, from (y, x) =
  origin on. A JPEG decodes only about the box: with the windowed decoder (fast_jpeg) when it is
  available, else with TensorFlow's decode_and_crop_jpeg, whose result differs from a full decode
  in its outermost pixels (chroma upsampling without the neighbours; up to 20 levels), so it
  decodes _JPEG_MARGIN more pixels on each side (clamped); one is enough
  (tests/test_data_preprocess.py).
  """
  y, x, h, w = _yxhw(box)
  if lazy.raw is None:
    return lazy.image, tf.zeros([2], tf.int32)
  if fast_jpeg.available():
    jpeg = lambda: fast_jpeg.decode_region(lazy.raw, tf.stack([y, x, h, w]))
  else:

    def jpeg():
      top, left = tf.maximum(y - _JPEG_MARGIN, 0), tf.maximum(x - _JPEG_MARGIN, 0)
      bottom = tf.minimum(y + h + _JPEG_MARGIN, lazy.shape[0])
      right = tf.minimum(x + w + _JPEG_MARGIN, lazy.shape[1])
      region = tf.stack([top, left, bottom - top, right - left])
      return tf.image.decode_and_crop_jpeg(lazy.raw, region, 3), tf.stack([top, left])

  pixels, origin = tf.cond(lazy.is_jpeg, jpeg, lambda: (lazy.image, tf.zeros([2], tf.int32)))
  pixels.set_shape([None, None, 3])
  return pixels, origin


def _pixels(lazy: _Lazy, box) -> tf.Tensor:
  """Exactly the source pixels in `box` (y, x, h, w), as a full decode would give them."""
  y, x, h, w = _yxhw(box)
  pixels, origin = _region(lazy, (y, x, h, w))
  out = tf.slice(pixels, tf.stack([y - origin[0], x - origin[1], 0]), tf.stack([h, w, -1]))
  out.set_shape([None, None, pixels.shape[-1]])
  return out


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How a batch of planned images is computed: one op over the batch (fast_jpeg) decodes each
  JPEG's region and resizes it into its row of the [b, height, width, 3] output, so per example
  tf.data carries only the bytes and 12 integers, and nothing is copied into the batch.

  The per-example keys it reads (and removes): `_jpeg` (string), `_pixels` (uint8 [n]: decoded
  pixels of images that are not JPEGs, else empty; batch them with `padded_batch`) and `_plan`
  (int32 [12]); optional `_keep` (bool: False gives zeros, for padding). Results equal the
  per-example path's exactly (same kernels, same arithmetic).
  """

  height: int
  width: int
  mul: float
  add: float

  def __call__(self, batch: dict) -> dict:
    batch = dict(batch)
    jpeg, pixels, plan = batch.pop('_jpeg'), batch.pop('_pixels'), batch.pop('_plan')
    batch['image'] = fast_jpeg.decode_resize_batch(
      jpeg, pixels, plan, (self.height, self.width), (self.mul, self.add), batch.pop('_keep', None)
    )
    return batch


def plan_for_batch(data) -> BatchPlan | None:
  """If data['image'] is a lazy bilinear resize of encoded bytes with a static output size and the
  ops are built, replaces it by its plan (the `BatchPlan` keys) and returns the plan's static part;
  else returns None and leaves data alone."""
  lazy = data.get('image')
  if not (
    isinstance(lazy, _Lazy)
    and lazy.raw is not None
    and lazy.size is not None
    and lazy.method == 'bilinear'
    and not lazy.antialias
    and fast_jpeg.available()
    and fast_resize.available()
  ):
    return None
  oh, ow = lazy.size
  wy, wx, wh, ww = lazy.window or (0, 0, oh, ow)
  if not (isinstance(wh, int) and isinstance(ww, int)):
    return None
  flip = lazy.flip if lazy.flip is not None else tf.constant(False)
  ints = [lazy.is_jpeg, *tf.unstack(lazy.shape), *tf.unstack(lazy.crop), oh, ow, wy, wx, flip]
  data['_plan'] = _stack(ints, axis=-1)  # [12], or [b, 12] batched.
  data['_jpeg'] = lazy.raw
  data['_pixels'] = lazy.image if lazy.batched else tf.reshape(lazy.image, [-1])
  del data['image']
  mul, add = lazy.affine or (1.0, 0.0)
  return BatchPlan(wh, ww, float(mul), float(add))


def _materialize(data) -> None:
  """Computes data['image'] if it is lazy (in place)."""
  lazy = data.get('image')
  if isinstance(lazy, _Lazy):
    data['image'] = _compute(lazy)


def _compute(lazy: _Lazy) -> tf.Tensor:
  if lazy.batched:
    raise NotBatchable('an op needs the pixels of each example')
  if lazy.size is None:
    image = _pixels(lazy, tf.unstack(lazy.crop))
  else:
    oh, ow = lazy.size
    window = lazy.window or (0, 0, oh, ow)
    image = lazy.image
    if (
      lazy.method == 'bilinear'
      and not lazy.antialias
      and image.dtype == tf.uint8
      and image.shape[-1] == 3
      and fast_resize.available()
    ):
      # One pass over only the source pixels the window reads.
      pixels, origin = _region(
        lazy, fast_resize.region(lazy.shape, lazy.crop, (oh, ow), window, margin=0)
      )
      flip = lazy.flip if lazy.flip is not None else tf.constant(False)
      return fast_resize.resize_window(
        pixels, origin, lazy.crop, (oh, ow), window, flip, lazy.affine or (1.0, 0.0)
      )
    image = _pixels(lazy, tf.unstack(lazy.crop))
    image = _resize(image, tf.stack([oh, ow]), lazy.method, lazy.antialias)
    if isinstance(oh, int) and isinstance(ow, int):
      image.set_shape([oh, ow, None])
    if lazy.window is not None:
      wy, wx, wh, ww = window
      image = tf.slice(image, tf.stack([wy, wx, 0]), tf.stack([wh, ww, -1]))
      if isinstance(wh, int) and isinstance(ww, int):
        image.set_shape([wh, ww, None])
  if lazy.flip is not None:
    flip, image_ = lazy.flip, image
    image = tf.cond(flip, lambda: tf.reverse(image_, [1]), lambda: image_)
    image.set_shape(image_.shape)
  if lazy.affine is not None:
    image = tf.cast(image, tf.float32) * lazy.affine[0] + lazy.affine[1]
  return image


def _lazy_image(data, fits) -> _Lazy:
  """data['image'] as a _Lazy that `fits(lazy)`; pending work that does not fit is done first."""
  lazy = _start(data)
  if not fits(lazy):
    _materialize(data)
    lazy = _start(data)
  data['image'] = lazy
  return lazy


def _crop_source(data, box_fn) -> None:
  """Crops the (lazy) image's source by `box_fn(h, w) -> (y, x, h, w)` of the current crop."""
  # A pending affine commutes with a crop; a resize or flip does not compose with one.
  lazy = _lazy_image(data, lambda lazy: lazy.size is None and lazy.flip is None)
  y, x, h, w = box_fn(lazy.crop[2], lazy.crop[3])
  lazy.crop = _stack([lazy.crop[0] + y, lazy.crop[1] + x, h, w])


def _resize_lazy(data, size_fn, method, antialias) -> None:
  """Makes data['image'] a lazy resize of its crop to `size_fn(h, w)`."""
  fits = lambda lazy: lazy.size is None and lazy.flip is None and lazy.affine is None
  lazy = _lazy_image(data, fits)
  lazy.size, lazy.method, lazy.antialias = size_fn(lazy.crop[2], lazy.crop[3]), method, antialias


@register('decode')
def decode(channels: int = 3) -> Op:
  """Decodes JPEG/PNG/BMP/GIF bytes into uint8 [h, w, 3]; already-decoded images pass through."""

  @_lazy(batchable=channels == 3)
  def fn(data):
    image = data['image']
    if channels != 3:
      if isinstance(image, _Lazy):
        _materialize(data)
        image = data['image']
      if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=channels, expand_animations=False)
      data['image'] = image
      return data
    if not isinstance(image, _Lazy):
      if image.dtype != tf.string:
        data['image'] = _to_rgb(image)
      data['image'] = _start(data)
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
  return inception_crop(size, area_min, area_max, aspect, method)


@register('decode_jpeg_and_central_crop')
def decode_jpeg_and_central_crop(size: int, crop_fraction: float = 224 / 256, method='bilinear'):
  """The window of `resize_small(round(size / crop_fraction))|central_crop(size)`, resized once.

  Takes the source window that the unfused ops sample (rounded to whole pixels) and resizes it to
  `size` once. The sampling grid differs from the unfused one by under a pixel, so pixels differ
  slightly (at edges most), as in the TPU reference ResNet/EfficientNet input pipelines, which also
  crop the central 224/256 of the shorter side and resize it once. The unfused string decodes the
  same window and is within ~0.07x of its speed (docs/data.md): prefer it (preset
  `imagenet_eval`), the published ops.
  """
  small = round(size / crop_fraction)

  def window(h, w):
    # resize_small's output size and central_crop's offset, mapped back to source pixels.
    h, w = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ratio = small / tf.minimum(h, w)
    new_h, new_w = tf.round(h * ratio), tf.round(w * ratio)
    scale_h, scale_w = h / new_h, w / new_w
    top, left = tf.floor((new_h - size) / 2) * scale_h, tf.floor((new_w - size) / 2) * scale_w
    crop_h = tf.minimum(tf.maximum(tf.round(size * scale_h), 1), h)
    crop_w = tf.minimum(tf.maximum(tf.round(size * scale_w), 1), w)
    top = tf.clip_by_value(tf.round(top), 0, h - crop_h)
    left = tf.clip_by_value(tf.round(left), 0, w - crop_w)
    return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))

  @_lazy(batchable=True)
  def fn(data):
    if not isinstance(data['image'], _Lazy) and data['image'].dtype != tf.string:
      data['image'] = _to_rgb(data['image'])
    _crop_source(data, window)
    _resize_lazy(data, lambda h, w: (size, size), method, False)
    return data

  return fn


@register('inception_crop')
def inception_crop(size=None, area_min=5, area_max=100, aspect=(3 / 4, 4 / 3), method='bilinear'):
  """Inception crop (random area and aspect), then resize to `size` (if given).

  On encoded JPEG bytes only the window is decoded (as `decode_jpeg_and_inception_crop`).
  """

  @_lazy
  def fn(data):
    seed = _seed(data)

    def box(h, w):
      begin, crop = _inception_box(tf.stack([h, w, 3]), seed, area_min, area_max, aspect)
      return begin[0], begin[1], crop[0], crop[1]

    _crop_source(data, box)
    if size is not None:
      _resize_lazy(data, lambda h, w: _size(size), method, False)
    return data

  return fn


@register('resize')
def resize(size, method: str = 'bilinear', antialias: bool = False) -> Op:
  """Resizes to `size` (int or (h, w)); float32 output, values in the input's range."""

  @_lazy(batchable=True)
  def fn(data):
    _resize_lazy(data, lambda h, w: _size(size), method, antialias)
    return data

  return fn


@register('resize_small')
def resize_small(size: int, method: str = 'bilinear', antialias: bool = False) -> Op:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio; float32 output."""

  def new_size(h, w):
    ratio = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
    return new_h, new_w

  @_lazy(batchable=True)
  def fn(data):
    _resize_lazy(data, new_size, method, antialias)
    return data

  return fn


@register('central_crop')
def central_crop(size) -> Op:
  """Crops the central `size` window (int or (h, w))."""
  ch, cw = _size(size)

  @_lazy(batchable=True)
  def fn(data):
    lazy = _lazy_image(data, lambda lazy: lazy.flip is None)
    if lazy.size is None:  # A crop of the source.
      _crop_source(data, lambda h, w: ((h - ch) // 2, (w - cw) // 2, ch, cw))
    else:  # A window of the resized image.
      wy, wx, wh, ww = lazy.window or (0, 0, *lazy.size)
      lazy.window = (wy + (wh - ch) // 2, wx + (ww - cw) // 2, ch, cw)
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

  @_lazy
  def fn(data):
    if not isinstance(data['image'], _Lazy):
      data['image'] = tf.image.stateless_random_flip_left_right(data['image'], _seed(data))
      return data
    # The draw of tf.image.stateless_random_flip_left_right, so both give the same flips.
    flip = tf.random.stateless_uniform([], _seed(data), 0, 1.0) < 0.5
    lazy = data['image']
    lazy.flip = flip if lazy.flip is None else tf.math.logical_xor(lazy.flip, flip)
    return data

  return fn


@register('value_range')
def value_range(
  vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255, clip: bool = False
) -> Op:
  """Maps pixel values linearly from [in_min, in_max] to [vmin, vmax] as float32."""

  scale = (vmax - vmin) / (in_max - in_min)
  offset = vmin - in_min * scale

  @_lazy(batchable=not clip)
  def fn(data):
    lazy = data['image']
    if isinstance(lazy, _Lazy) and lazy.affine is None and not clip:
      lazy.affine = (scale, offset)
      return data
    _materialize(data)
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

  fn.image_free = fn.batchable = True  # Labels only, elementwise: also on a batch.
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
  - `imagenet_eval_fused`: the same window resampled once (`decode_jpeg_and_central_crop`), as
    the TPU reference pipelines do; pixels differ by under a source pixel's shift. Decodes the
    same window as `imagenet_eval`, which is within ~0.07x of its speed.
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
