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


@pytest.mark.parametrize(
  'pp',
  [
    'decode',
    'decode_jpeg_and_inception_crop(32)',
    'decode_jpeg_and_inception_crop(32, area_min=50, area_max=60)',
    'decode_jpeg_and_central_crop(32)',
    'decode|inception_crop(32)',
    'decode|resize(24)',
    'decode|resize((20, 30), method="nearest")',
    'decode|resize_small(30)',
    'decode|central_crop(40)',
    'decode|random_crop(40)',
    'decode|flip_lr',
    'decode|value_range(-1,1)',
    'decode|randaug(2,15)',
    'decode|resize(16)|onehot(10, smoothing=0.1)',
  ],
)
def test_op_eager_equals_tf_data(pp):
  out = _run(pp, {'image': tf.constant(JPEG), 'label': tf.constant(7)})
  assert out['image'].ndim == 3 and out['image'].shape[-1] == 3


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


def test_fused_inception_crop_matches_decode_then_crop():
  decoded = tf.io.decode_jpeg(JPEG, channels=3)
  for seed in range(5):
    rng = tf.constant([seed, 1], tf.int64)
    fused = preprocess.decode_jpeg_and_inception_crop()({'image': tf.constant(JPEG), '_rng': rng})
    plain = preprocess.inception_crop()({'image': decoded, '_rng': rng})
    # Same seed and image size -> same window; decoding only the window (plus a margin) gives
    # exactly the pixels of the full decode.
    np.testing.assert_array_equal(fused['image'], plain['image'])


@pytest.mark.parametrize('h,w,size', [(150, 200, 64), (375, 500, 224), (500, 375, 224)])
def test_fused_central_crop_matches_resize_small_then_central_crop(h, w, size):
  """The fused ImageNet eval op samples the same window as the unfused ops, to under a pixel."""
  y, x = np.mgrid[:h, :w] / max(h, w)
  smooth = np.stack(
    [128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.cos(5 * y - 3 * x), 255 * x * y]
  )
  smooth = np.moveaxis(smooth, 0, -1).astype(np.uint8)
  unfused = f'decode|resize_small({round(size * 256 / 224)})|central_crop({size})'
  for image in (smooth, _encode(smooth, 'PNG'), _encode(smooth, quality=95)):
    example = {'image': tf.constant(image)}
    fused = _run(f'decode_jpeg_and_central_crop({size})', example)['image']
    plain = _run(unfused, example)['image']
    assert fused.shape == plain.shape == (size, size, 3)
    diff = np.abs(fused - plain)
    assert diff.mean() < 0.5 and diff.max() < 4, (diff.mean(), diff.max())


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
  assert out['image'].shape == (32, 32, 3) and out['image'].dtype == np.float32


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


def test_mixup_and_cutmix():
  rng = np.random.default_rng(0)
  images = tf.constant(rng.uniform(-1, 1, (4, 8, 8, 3)), tf.float32)
  batch = {'image': images, 'label': tf.constant([0, 1, 2, 3])}
  seed = tf.constant([1, 2], tf.int64)
  out = preprocess.mixup(dict(batch), seed, p=0.5, num_classes=5)
  again = preprocess.mixup(dict(batch), seed, p=0.5, num_classes=5)
  np.testing.assert_array_equal(out['image'], again['image'])
  labels = out['labels'].numpy()
  np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
  ratio = labels[1, 1]  # Example 1 mixes with example 0 (roll by one).
  np.testing.assert_allclose(labels[1, 0], 1 - ratio, atol=1e-6)
  expected = ratio * images + (1 - ratio) * tf.roll(images, 1, 0)
  np.testing.assert_allclose(out['image'], expected, atol=1e-5)
  cut = preprocess.mixup(dict(batch), seed, p=1.0, cutmix_p=1.0, num_classes=5)
  own = np.isclose(cut['image'], images).all(-1)
  other = np.isclose(cut['image'], tf.roll(images, 1, 0)).all(-1)
  assert (own | other).all()  # Every pixel from the image or its neighbour.
  np.testing.assert_allclose(cut['labels'][:, :4].numpy().diagonal(), own.mean((1, 2)), atol=1e-6)


def test_presets_and_errors():
  augreg = data.preset('augreg')
  assert 'randaug(2,15)' in augreg['train_pp'] and augreg['mixup']['p'] == 0.5
  assert augreg['eval_pp'] == 'decode|resize_small(256)|central_crop(224)|value_range(-1,1)'
  assert 'resize_small(439)|central_crop(384)' in data.preset('imagenet_eval', 384)['eval_pp']
  fused = data.preset('imagenet_eval_fused', 384)['eval_pp']
  assert (
    fused == 'decode_jpeg_and_central_crop(384)|value_range(-1,1)'
  )  # See test_fused_central_...
  vit = data.preset('vit_finetune')
  assert 'inception_crop(384)' in vit['train_pp'] and 'resize(384)' in vit['eval_pp']
  for name in ('augreg', 'vit_finetune', 'imagenet_eval', 'imagenet_eval_fused', 'digits'):
    out = _run(data.preset(name, 32)['train_pp'], {'image': tf.constant(JPEG)})
    assert out['image'].shape == (32, 32, 3) and -1 <= out['image'].min() <= out['image'].max() <= 1
  with pytest.raises(ValueError, match='Unknown preprocessing op .*flip_ud'):
    data.get_preprocess_fn('decode|flip_ud')
  with pytest.raises(ValueError, match='Cannot parse'):
    data.get_preprocess_fn('resize(32')
  with pytest.raises(ValueError, match='Bad arguments'):
    data.get_preprocess_fn('resize(32, colour=1)')
  with pytest.raises(ValueError, match='Unknown preprocessing preset'):
    data.preset('nope')
