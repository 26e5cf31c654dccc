"""Preprocessing ops: each eagerly and inside tf.data (same output), and checked for its effect."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax import data
from vit_jax.data import preprocess, randaug


def _photo(h=60, w=80, seed=0):
  """A smooth colour image (JPEG-friendly) with some texture."""
  y, x = np.mgrid[:h, :w]
  rng = np.random.default_rng(seed)
  image = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + 60], -1)
  return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def _encode(image, fmt='JPEG', mode=None, **kw):
  out = io.BytesIO()
  pil = Image.fromarray(image)
  (pil.convert(mode) if mode else pil).save(out, format=fmt, **kw)
  return out.getvalue()


def _run(pp, example, seed=(3, 4)):
  """Runs `pp` eagerly and inside tf.data on the same example; asserts equal; returns eager."""
  fn = data.get_preprocess_fn(pp)
  example = dict(example, _rng=tf.constant(seed, tf.int64))
  eager = {k: v.numpy() for k, v in fn(example).items()}
  graph = next(iter(tf.data.Dataset.from_tensors(example).map(fn).as_numpy_iterator()))
  assert eager.keys() == graph.keys()
  for key in eager:
    np.testing.assert_allclose(eager[key], graph[key], rtol=1e-6, atol=1e-5, err_msg=f'{pp} {key}')
  return eager


JPEG = _encode(_photo(), quality=95)
PHOTO = _photo()
RNG = (3, 4)


def _op_seed(index):
  """The seed of the op at `index` in the string (the example's, salted with the index)."""
  return tf.constant(RNG, tf.int64) + [(index * 0x9E3779B97F4A7C15) % (1 << 63), 0]


def _tf_resize(image, size, method='bilinear'):
  """big_vision's resize: tf.image.resize, clipped and cast back to uint8."""
  return tf.cast(tf.clip_by_value(tf.image.resize(image, size, method=method), 0, 255), tf.uint8)


def _tf_inception_box(shape, seed):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    tf.zeros([0, 0, 4], tf.float32),
    seed=seed,
    area_range=(0.05, 1.0),
    aspect_ratio_range=(3 / 4, 4 / 3),
    min_object_covered=0,
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def _tf_decode_jpeg_and_inception_crop():
  (
    begin,
    size,
  ) = _tf_inception_box(tf.image.extract_jpeg_shape(JPEG), _op_seed(0))
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  return _tf_resize(tf.image.decode_and_crop_jpeg(JPEG, window, channels=3), [32, 32])


def _tf_inception_crop():
  decoded = tf.io.decode_jpeg(JPEG, channels=3)
  begin, size = _tf_inception_box(tf.shape(decoded), _op_seed(1))
  return _tf_resize(tf.slice(decoded, begin, size), [32, 32])


def _tf_central_crop_jpeg():  # tensorflow/tpu resnet_preprocessing._decode_and_center_crop.
  h, w = 60, 80
  crop = int(224 / (224 + 32) * min(h, w))
  window = [(h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop]
  return _tf_resize(tf.image.decode_and_crop_jpeg(JPEG, window, channels=3), [32, 32])


_DECODED = lambda: tf.io.decode_jpeg(JPEG, channels=3)
# Each op against the TensorFlow calls that define it (big_vision's semantics).
DEFINITIONS = {
  'decode': _DECODED,
  'decode_jpeg_and_inception_crop(32)': _tf_decode_jpeg_and_inception_crop,
  'decode|inception_crop(32)': _tf_inception_crop,
  'decode_jpeg_and_central_crop(32)': _tf_central_crop_jpeg,
  'decode|resize(24)': lambda: _tf_resize(_DECODED(), [24, 24]),
  'decode|resize((20, 30), method="nearest")': lambda: _tf_resize(_DECODED(), [20, 30], 'nearest'),
  'decode|resize_small(30)': lambda: _tf_resize(_DECODED(), [30, 40], 'area'),
  'decode|resize_small(30, method="bilinear")': lambda: _tf_resize(_DECODED(), [30, 40]),
  'decode|central_crop(40)': lambda: tf.image.crop_to_bounding_box(_DECODED(), 10, 20, 40, 40),
  'decode|random_crop(40)': lambda: tf.image.stateless_random_crop(
    _DECODED(), [40, 40, 3], _op_seed(1)
  ),
  'decode|flip_lr': lambda: tf.image.stateless_random_flip_left_right(_DECODED(), _op_seed(1)),
  # The exact value (float64) rounded once to float32.
  'decode|value_range(-1,1)': lambda: tf.cast(
    tf.cast(_DECODED(), tf.float64) / 255 * 2 - 1, tf.float32
  ),
  'decode|randaug(2,15)': lambda: randaug.randaugment(_DECODED(), 2, 15, _op_seed(1)),
  'decode|resize(16)|onehot(10, smoothing=0.1)': lambda: _tf_resize(_DECODED(), [16, 16]),
}


@pytest.mark.parametrize('pp', DEFINITIONS)
def test_op_equals_its_tensorflow_definition_eagerly_and_in_tf_data(pp):
  out = _run(pp, {'image': tf.constant(JPEG), 'label': tf.constant(7)}, RNG)
  want = DEFINITIONS[pp]().numpy()
  assert out['image'].dtype == want.dtype and out['image'].shape == want.shape
  np.testing.assert_array_equal(out['image'], want)


def test_inception_crop_of_other_formats_uses_the_same_window():
  png = _encode(PHOTO, 'PNG')
  for seed in range(4):
    fused = _run('decode_jpeg_and_inception_crop', {'image': tf.constant(png)}, (seed, 1))
    begin, size = _tf_inception_box(
      tf.constant([60, 80, 3]),
      tf.constant([seed, 1], tf.int64),  # The op is first in the string: salt 0.
    )
    np.testing.assert_array_equal(fused['image'], tf.slice(PHOTO, begin, size))


def test_resize_small_is_area_not_bilinear():
  """big_vision's default: a 4x area downscale averages each 4x4 block (bilinear would sample)."""
  image = np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype(np.uint8)
  out = _run('resize_small(10)', {'image': tf.constant(image)})['image']
  blocks = image.reshape(10, 4, 12, 4, 3).astype(np.float64).mean((1, 3))
  assert out.dtype == np.uint8 and out.shape == (10, 12, 3)
  assert np.abs(out - blocks).max() < 1.0  # Cast back to uint8 truncates.


def test_decode_formats_to_rgb():
  png = _run('decode', {'image': tf.constant(_encode(PHOTO, 'PNG'))})['image']
  np.testing.assert_array_equal(png, PHOTO)  # Lossless: exact.
  gray = _run('decode', {'image': tf.constant(_encode(PHOTO, 'PNG', mode='L'))})['image']
  assert gray.shape == PHOTO.shape and (gray[..., 0] == gray[..., 2]).all()
  rgba = np.concatenate([PHOTO, np.full(PHOTO.shape[:2] + (1,), 9, np.uint8)], -1)
  np.testing.assert_array_equal(
    _run('decode', {'image': tf.constant(_encode(rgba, 'PNG'))})['image'], PHOTO
  )
  bmp = _run('decode', {'image': tf.constant(_encode(PHOTO, 'BMP'))})['image']
  np.testing.assert_array_equal(bmp, PHOTO)


def test_inception_crop_area_range_and_png_fallback():
  areas = []
  for seed in range(10):
    out = _run(
      'decode_jpeg_and_inception_crop(area_min=30, area_max=40)',
      {'image': tf.constant(_encode(PHOTO, 'PNG'))},
      (seed, 0),
    )
    h, w, _ = out['image'].shape
    areas.append(h * w / (60 * 80))
  assert 0.25 <= min(areas) and max(areas) <= 0.45, areas
  out = _run('decode_jpeg_and_inception_crop(32)', {'image': tf.constant(JPEG)})
  assert out['image'].shape == (32, 32, 3) and out['image'].dtype == np.uint8


def test_geometry_ops():
  image = {'image': tf.constant(PHOTO)}
  assert _run('resize_small(30)', image)['image'].shape == (30, 40, 3)
  assert _run('resize((20, 30))', image)['image'].shape == (20, 30, 3)
  np.testing.assert_array_equal(_run('central_crop(40)', image)['image'], PHOTO[10:50, 20:60])
  constant = {'image': tf.fill([9, 13, 3], tf.constant(77, tf.uint8))}
  np.testing.assert_allclose(_run('resize(31)', constant)['image'], 77, atol=1e-3)
  # random_crop: a window of the input, and it moves with the seed.
  corners = set()
  for seed in range(8):
    crop = _run('random_crop(20)', image, (seed, 9))['image']
    hits = [
      (y, x)
      for y in range(41)
      for x in range(61)
      if np.array_equal(PHOTO[y : y + 20, x : x + 20], crop)
    ]
    assert hits, 'random_crop output is not a window of the input'
    corners.add(hits[0])
  assert len(corners) > 4


def test_flip_lr_flips_about_half_the_time():
  flips = 0
  for seed in range(40):
    out = _run('flip_lr', {'image': tf.constant(PHOTO)}, (seed, 0))['image']
    if np.array_equal(out, PHOTO[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out, PHOTO)
  assert 8 <= flips <= 32


def test_value_range_and_onehot():
  pixels = tf.constant([[[0, 255, 51]]], tf.uint8)
  out = _run('value_range(-1,1)', {'image': pixels})['image']
  np.testing.assert_allclose(out, [[[-1.0, 1.0, -0.6]]], atol=1e-6)
  out = _run('value_range(0,1)', {'image': pixels})['image']
  np.testing.assert_allclose(out, [[[0.0, 1.0, 0.2]]], atol=1e-6)
  labels = _run('onehot(10, smoothing=0.1)', {'image': pixels, 'label': tf.constant(3)})['labels']
  np.testing.assert_allclose(labels.sum(), 1.0, atol=1e-6)
  assert labels.argmax() == 3 and np.isclose(labels[3], 0.91) and np.isclose(labels[0], 0.01)


def test_randaug_deterministic_and_varied():
  fn = data.get_preprocess_fn('randaug(2, 10)')
  seeds = tf.data.Dataset.range(8).map(lambda s: {'image': PHOTO, '_rng': tf.stack([s, s + 1])})
  outs = [x['image'] for x in seeds.map(fn).as_numpy_iterator()]
  again = [x['image'] for x in seeds.map(fn).as_numpy_iterator()]
  assert all(np.array_equal(a, b) for a, b in zip(outs, again))
  assert all(o.dtype == np.uint8 and o.shape == PHOTO.shape for o in outs)
  assert len({o.tobytes() for o in outs}) >= 5
  # Float input (after a resize) is accepted and rounded to uint8.
  assert _run('resize(40)|randaug(1, 5)', {'image': tf.constant(PHOTO)})['image'].dtype == np.uint8


@pytest.mark.parametrize('op', randaug.OPS, ids=lambda op: op.__name__)
def test_randaug_op_eager_equals_graph(op):
  seed = tf.constant([5, 6], tf.int64)
  eager = op(tf.constant(PHOTO), 7.0, seed).numpy()
  graph = tf.function(lambda x: op(x, 7.0, seed))(tf.constant(PHOTO)).numpy()
  np.testing.assert_array_equal(eager, graph)
  assert eager.shape == PHOTO.shape and eager.dtype == np.uint8


def test_randaug_op_facts():
  x, seed = tf.constant(PHOTO), tf.constant([1, 1], tf.int64)
  np.testing.assert_array_equal(randaug.invert(randaug.invert(x, 0, seed), 0, seed), PHOTO)
  np.testing.assert_array_equal(randaug.rotate(x, 0.0, seed), PHOTO)
  np.testing.assert_array_equal(randaug.posterize(x, 10.0, seed), PHOTO & 0xF0)
  low = tf.constant(PHOTO // 2 + 10)
  stretched = randaug.auto_contrast(low, 0, seed).numpy()
  assert stretched.min() == 0 and stretched.max() == 255
  equalized = randaug.equalize(low, 0, seed).numpy()
  assert equalized.max() > 240 and equalized.min() < 20
  # Solarize at level 10 inverts everything >= 256 * 1.0: nothing.
  np.testing.assert_array_equal(randaug.solarize(x, 10.0, seed), PHOTO)


def test_randaug_is_the_references_op_set_and_arguments():
  """big_vision/pp/archive/autoaugment.py (the op big_vision's AugReg configs use): the 16 ops of
  :680-683 (Cutout, no Identity); TranslateX/Y by level / 10 * 100 px (:499-501, :522-525,
  translate_const=100 at :679) whatever the image size; Cutout a grey square of side
  2 * int(level / 10 * 40) (:521, cutout_const=40; :132-177)."""
  reference = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
    'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout',
    'SolarizeAdd',
  ]  # fmt: skip
  assert [op.__name__.replace('_', '') for op in randaug.OPS] == [r.lower() for r in reference]
  big = np.zeros((300, 400, 3), np.uint8)
  big[150, 200] = 255  # One white pixel in the middle.
  for level, shift in ((10.0, 100), (5.0, 50), (15.0, 150)):
    for seed in range(2):
      moved = randaug.translate_x(tf.constant(big), level, tf.constant([seed, 0], tf.int64))
      ys, xs = np.nonzero(moved.numpy()[..., 0] == 255)
      assert list(ys) == [150] and abs(int(xs[0]) - 200) == shift, (level, xs)
  flat = tf.constant(np.zeros((200, 200, 3), np.uint8))
  for level, side in ((10.0, 80), (5.0, 40), (0.0, 0)):
    out = randaug.cutout(flat, level, tf.constant([3, 4], tf.int64)).numpy()
    grey = out[..., 0] == 128
    rows, cols = np.nonzero(grey.any(1))[0], np.nonzero(grey.any(0))[0]
    assert grey.sum() == len(rows) * len(cols) and len(rows) <= side and len(cols) <= side
    assert (out[grey] == 128).all() and (out[~grey] == 0).all()
  # Centred away from the borders, the square is whole.
  sizes = [
    int((randaug.cutout(flat, 10.0, tf.constant([s, 1], tf.int64)).numpy() == 128).sum() // 3)
    for s in range(20)
  ]
  assert 80 * 80 in sizes


# The recipes' strings (configs/*.py): every op and argument accepted; the host part ends in uint8.
RECIPES = [
  'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)',
  'decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1,1)',
  'decode|resize_small(256)|central_crop(224)|value_range(-1,1)',
  'decode|resize(18)|random_crop(16)|value_range(-1,1)',
  'decode|resize(18)|central_crop(16)|value_range(-1,1)',
  'decode|resize(384)|value_range(-1,1)',
]


@pytest.mark.parametrize('pp', RECIPES)
def test_recipe_strings_leave_uint8_and_the_value_range_to_the_device(pp):
  host, device = preprocess.split(pp)
  assert device == 'value_range(-1,1)' and host == pp.rsplit('|', 1)[0]
  out = _run(host, {'image': tf.constant(_encode(_photo(300, 400), quality=90))})
  assert out['image'].dtype == np.uint8 and out['image'].shape[-1] == 3


def test_split():
  assert preprocess.split('value_range(-1,1)') == ('', 'value_range(-1,1)')
  assert preprocess.split('decode|value_range(0,1)|onehot(3)') == (
    'decode|onehot(3)',
    'value_range(0,1)',
  )
  assert preprocess.split('decode|value_range(-1,1)|randaug(2,5)') == (
    'decode|value_range(-1,1)|randaug(2,5)',
    '',
  )
  assert preprocess.split('decode|resize(8)') == ('decode|resize(8)', '')


def test_errors():
  with pytest.raises(ValueError, match='Unknown preprocessing op .*flip_ud'):
    data.get_preprocess_fn('decode|flip_ud')
  with pytest.raises(ValueError, match='Cannot parse'):
    data.get_preprocess_fn('resize(32')
  with pytest.raises(ValueError, match='Bad arguments'):
    data.get_preprocess_fn('resize(32, colour=1)')
  with pytest.raises(ValueError, match='Bad arguments'):
    data.device_preprocess('decode|value_range(-1, 1, colour=1)')
