"""Images computed per batch (one op per batch) are the per-example pipeline's, bit for bit."""

import contextlib
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax import data
from vit_jax.data import fast_jpeg, pipeline, preprocess

EVAL = data.preset('imagenet_eval', 64)['eval_pp']  # decode|resize_small(73)|central_crop(64)|..
FUSED = data.preset('imagenet_eval_fused', 64)['eval_pp']
TRAIN = data.preset('vit_finetune', 64)['train_pp']  # Inception crop + flip: random.


def _photo(h, w, seed):
  y, x = np.mgrid[:h, :w] / max(h, w)
  rng = np.random.default_rng(seed)
  image = np.stack([128 + 100 * np.sin(9 * x + 3 * y + seed), 255 * x * y, 200 * y], -1)
  return np.clip(image + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  """42 images in 3 classes: JPEGs of several sizes and kinds, some PNGs, a GIF and a grayscale
  PNG (decoded one by one in the batch path), so batches mix both paths."""
  root = tmp_path_factory.mktemp('mixed')
  rng = np.random.default_rng(0)
  for c in range(3):
    os.makedirs(root / f'class_{c}')
    for i in range(14):
      k = c * 14 + i
      h, w = (int(rng.integers(60, 140)), int(rng.integers(60, 140)))
      image = Image.fromarray(_photo(h, w, k))
      if k % 7 == 3:
        image.save(root / f'class_{c}' / f'{i}.png')
      elif k == 11:
        image.convert('L').save(root / f'class_{c}' / f'{i}.png')
      elif k == 25:
        image.convert('P').save(root / f'class_{c}' / f'{i}.gif')
      else:
        kind = [dict(subsampling=2), dict(subsampling=0), dict(progressive=True)][k % 3]
        image = image.convert('L') if k == 20 else image
        image.save(root / f'class_{c}' / f'{i}.jpg', quality=90, **kind)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.prepare_folder(str(root), data_dir)
  return {'dataset': f'folder:{root}', 'data_dir': data_dir}


@contextlib.contextmanager
def _per_example(plan: bool):
  """Builds pipelines without the batch path; `plan=False`: without the per-batch op at all."""
  saved = preprocess.batched, preprocess.plan_for_batch
  preprocess.batched = lambda *args, **kwargs: None
  if not plan:
    preprocess.plan_for_batch = lambda data: None
  try:
    yield
  finally:
    preprocess.batched, preprocess.plan_for_batch = saved


def _batches(mixed, pp, train, batches=None, **kw):
  ds = data.get_dataset(
    mixed['dataset'],
    'train',
    data_dir=mixed['data_dir'],
    preprocess=pp,
    train=train,
    global_batch_size=8,
    process_index=0,
    process_count=1,
    **kw,
  )
  it = iter(ds)
  return ds, [next(it) for _ in range(batches)] if batches else list(it)


@pytest.mark.parametrize(
  'pp,train,batch_level',
  [
    (EVAL, False, True),
    (FUSED, False, True),
    ('decode|resize(48)|value_range(0,1)|onehot(3, 0.1)', False, True),
    (EVAL, True, True),  # Deterministic: per batch in training too.
    (TRAIN, True, False),  # Random: planned per example, computed per batch.
    (f'{TRAIN}|onehot(3)', True, False),
  ],
)
def test_equals_per_example(mixed, pp, train, batch_level):
  ds, got = _batches(mixed, pp, train, batches=6 if train else None)
  assert ds.batch_level == batch_level
  for plan in (True, False):
    with _per_example(plan):
      ds, want = _batches(mixed, pp, train, batches=6 if train else None)
    assert not ds.batch_level
    assert len(got) == len(want)
    for g, w in zip(got, want):
      assert set(g) == set(w)
      for k in g:
        assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
        np.testing.assert_array_equal(g[k], w[k], err_msg=f'{pp} {k} plan={plan}')
  if not train:  # The last batch is padded: zeros, mask False.
    last = got[-1]
    assert not last['mask'].all() and not last['image'][~last['mask']].any()


def test_batched_only_where_it_can():
  labels = {'label': tf.TensorSpec([None], tf.int32)}
  can = [
    EVAL,
    FUSED,
    'decode|resize(32)',
    'resize(32)|value_range(-1,1)',
    'decode|onehot(3)|resize(8)',
  ]
  cannot = [
    'decode',  # No resize: sizes differ per image.
    'decode|central_crop(32)',  # The same.
    'decode|resize_small(64)|value_range(-1,1)',  # Size per image.
    TRAIN,  # Random.
    'decode|resize(32)|randaug(2,5)',  # Per-example op.
    'decode|resize(32, antialias=True)',  # TensorFlow's kernel.
    'decode|resize(32)|value_range(-1,1,clip=True)',
    'decode(1)|resize(32)',
  ]
  for pp in can:
    assert preprocess.batched(preprocess.get_preprocess_fn(pp), labels) is not None, pp
  for pp in cannot:
    assert preprocess.batched(preprocess.get_preprocess_fn(pp), labels) is None, pp


def _jpeg(h, w, seed=0) -> bytes:
  out = io.BytesIO()
  Image.fromarray(_photo(h, w, seed)).save(out, format='JPEG', quality=90)
  return out.getvalue()


def test_jpeg_shapes():
  png = io.BytesIO()
  Image.fromarray(_photo(9, 7, 0)).save(png, format='PNG')
  contents = [_jpeg(31, 45), png.getvalue(), _jpeg(50, 20, 1), b'']
  got = fast_jpeg.jpeg_shapes(tf.constant(contents)).numpy()
  np.testing.assert_array_equal(got, [[1, 31, 45], [0, 0, 0], [1, 50, 20], [0, 0, 0]])
  with pytest.raises(tf.errors.InvalidArgumentError, match='example 1: invalid JPEG data'):
    fast_jpeg.jpeg_shapes(tf.constant([contents[0], b'\xff\xd8\xff garbage']))


def test_decode_resize_batch_keep_and_errors():
  jpegs = [_jpeg(40, 60, s) for s in range(3)]
  contents = tf.constant(jpegs)
  # Each: the whole 40x60 image resized to 20x30, window (0, 0) of 20x30, no flip.
  plan = tf.constant([[1, 40, 60, 0, 0, 40, 60, 20, 30, 0, 0, 0]] * 3)
  pixels = tf.zeros([3, 0], tf.uint8)
  keep = tf.constant([True, False, True])
  out = fast_jpeg.decode_resize_batch(contents, pixels, plan, (20, 30), (1.0, 0.0), keep).numpy()
  assert out.shape == (3, 20, 30, 3) and not out[1].any() and out[0].any() and out[2].any()
  for i in (0, 2):
    want = tf.image.resize(tf.io.decode_jpeg(contents[i], channels=3), [20, 30]).numpy()
    np.testing.assert_allclose(out[i], want, atol=1e-4)
  truncated = tf.constant([*jpegs[:2], jpegs[2][:200]])
  with pytest.raises(tf.errors.InvalidArgumentError, match='example 2: invalid JPEG data'):
    fast_jpeg.decode_resize_batch(truncated, pixels, plan, (20, 30), (1.0, 0.0))
  wrong = tf.tensor_scatter_nd_update(plan, [[1, 1]], [41])  # The plan's size is not the JPEG's.
  with pytest.raises(tf.errors.InvalidArgumentError, match='example 1: the JPEG is 40x60'):
    fast_jpeg.decode_resize_batch(contents, pixels, wrong, (20, 30), (1.0, 0.0))
  outside = tf.tensor_scatter_nd_update(plan, [[2, 3]], [1])  # Crop rows 1..40 of 40.
  with pytest.raises(tf.errors.InvalidArgumentError, match='example 2: crop .* out of bounds'):
    fast_jpeg.decode_resize_batch(contents, pixels, outside, (20, 30), (1.0, 0.0))
  with pytest.raises(tf.errors.InvalidArgumentError, match='example 0: crop .* out of bounds'):
    fast_jpeg.decode_resize_batch(contents, pixels, plan, (21, 30), (1.0, 0.0))  # Window.


def test_fast_record_parsing_equals_tfds(mixed):
  """Plain scalar features parse with tf.io; the same values as TFDS's own parser."""
  source = pipeline._Source(mixed['dataset'], 'train', mixed['data_dir'], 0, 1)
  assert source._specs is not None and source.batch_parsable
  records = list(source.epoch_fn(shuffle=False, seed=0, shuffle_buffer=1, num_threads=1)(0))
  features = source._decoders.extract_features(source.builder.info.features)
  batch = source.parse_batch(tf.stack(records))
  for i, record in enumerate(records):
    want = features.deserialize_example(record, decoders=source._decoders.decoders)
    got = source.parse(record)
    assert got['image'].numpy() == want['image'].numpy() == batch['image'][i].numpy()
    assert got['label'].numpy() == want['label'].numpy() == batch['label'][i].numpy()
