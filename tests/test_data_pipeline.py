"""The input pipeline: per-process sharding, exact-once eval, determinism, resume, errors."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from data_fixtures import batch_ids, make_indexed_folder

from vit_jax import data
from vit_jax.data import pipeline, preprocess

P = 4  # Simulated processes.


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """69 unique images in 3 classes, prepared once: train 63 (16+16+16+15 over 4 processes)."""
  root = tmp_path_factory.mktemp('images')
  ids = make_indexed_folder(root)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.prepare_folder(str(root), data_dir)
  return {'dataset': f'folder:{root}', 'data_dir': data_dir, 'ids': ids}


def _get(folder, split='train', **kw):
  kw = {'preprocess': 'decode', 'process_index': 0, 'process_count': 1, **kw}
  return data.get_dataset(folder['dataset'], split, data_dir=folder['data_dir'], **kw)


def _take(ds, n):
  return list(itertools.islice(iter(ds), n))


def test_info_and_split_sizes(folder):
  num_classes, names, sizes = data.get_dataset_info(folder['dataset'], folder['data_dir'])
  assert (num_classes, names) == (3, ['class_0', 'class_1', 'class_2'])
  assert sizes == {'train': 63, 'validation': 6}  # round(23 * 0.1) = 2 per class held out.


@pytest.mark.parametrize('pp', ['decode', 'decode|resize(8)'])
def test_eval_visits_every_example_once_over_4_processes(folder, pp):
  seen, num_batches = [], set()
  for split, expected in (('train', 63), ('validation', 6)):
    seen = []
    for p in range(P):
      ds = _get(
        folder,
        split,
        train=False,
        global_batch_size=12,
        process_index=p,
        process_count=P,
        preprocess=pp,
      )
      batches = list(ds)
      assert len(batches) == ds.num_batches
      num_batches.add((split, ds.num_batches))
      assert all(b['image'].shape == (3, 8, 8, 3) and b['image'].dtype == np.uint8 for b in batches)
      for b in batches:  # Padding is zeros with mask False.
        assert not b['image'][~b['mask']].any() and b['mask'].dtype == bool
        seen += batch_ids(b)
        labels = [folder['ids'][u] for u in batch_ids(b)]
        assert labels == list(b['label'][b['mask']])
      assert ds.num_examples == expected
    assert sorted(seen) == sorted(set(seen)) and len(seen) == expected
    assert set(seen) <= set(folder['ids'])
  assert num_batches == {('train', 6), ('validation', 1)}  # ceil(16 / 3), ceil(2 / 3)


def test_train_shards_are_disjoint_complete_and_reshuffled(folder):
  parts = []
  for p in range(P):
    ds = _get(folder, train=True, global_batch_size=8, process_index=p, process_count=P)
    n_local = 16 if p < 3 else 15
    stream = [u for b in _take(ds, n_local + 1) for u in batch_ids(b)]  # 2 per batch.
    first, second = stream[:n_local], stream[n_local : 2 * n_local]
    assert len(set(first)) == n_local and set(second) == set(first)  # Whole epochs.
    assert first != second  # Each epoch has its own order.
    parts.append(set(first))
  union = set().union(*parts)
  assert sum(len(s) for s in parts) == len(union) == 63  # Disjoint.
  validation = {
    u for b in _get(folder, 'validation', train=False, global_batch_size=8) for u in batch_ids(b)
  }
  assert union | validation == set(folder['ids']) and not union & validation  # Complete.


def test_same_seed_same_batches_and_resume(folder):
  pp = 'decode|random_crop(6)|flip_lr|value_range(-1,1)|onehot(3)'
  kw = dict(train=True, global_batch_size=8, preprocess=pp, seed=3)
  fresh = _take(_get(folder, **kw), 20)  # 63 examples: epochs end inside batches 7 and 15.
  again = _take(_get(folder, **kw), 20)
  for a, b in zip(fresh, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for start in (1, 7, 8, 15, 17):
    resumed = _take(_get(folder, start_batch=start, **kw), 3)
    for a, b in zip(fresh[start : start + 3], resumed):
      assert a.keys() == b.keys() == {'image', 'label', 'labels', 'mask'}
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'start={start} {key}')
  other = _take(_get(folder, **{**kw, 'seed': 4}), 2)
  assert not np.array_equal(other[0]['label'], fresh[0]['label']) or not np.array_equal(
    other[1]['label'], fresh[1]['label']
  )
  assert fresh[0]['image'].dtype == np.uint8  # value_range is left to the device.
  np.testing.assert_array_equal(fresh[0]['labels'], np.eye(3)[fresh[0]['label']])


@pytest.mark.parametrize(
  'train, pp',
  [
    (True, 'decode|resize(7)|random_crop(6)|flip_lr|value_range(-1,1)|onehot(3)'),
    (False, 'decode|resize(7)|random_crop(6)|flip_lr|value_range(-1,1)|onehot(3)'),
    (True, 'decode_jpeg_and_inception_crop(6)|flip_lr'),  # Nothing deterministic: bytes held.
  ],
)
def test_cache_gives_the_same_batches(folder, train, pp):
  """cache=True: the deterministic start of the string runs once; the stream is unchanged."""
  kw = dict(train=train, global_batch_size=12, preprocess=pp, seed=5, process_count=P)
  for p in range(P):
    for start in (0, 7) if train else (0,):
      args = dict(kw, process_index=p, **(dict(start_batch=start) if train else {}))
      plain, cached = _get(folder, **args), _get(folder, cache=True, **args)
      n = 12 if train else plain.num_batches
      for a, b in zip(_take(plain, n), _take(cached, n), strict=True):
        assert a.keys() == b.keys()
        for key in a:
          np.testing.assert_array_equal(a[key], b[key], err_msg=f'p={p} start={start} {key}')


def test_record_indices_come_in_the_order_of_the_records(tmp_path):
  """The cache's index stream: shards shuffled and interleaved, records shuffled, by counts only."""
  skips, takes, names = [2, 0, 1], [3, 7, 4], []
  for f, (skip, take) in enumerate(zip(skips, takes)):
    names.append(str(tmp_path / f'shard{f}.tfrecord'))
    with tf.io.TFRecordWriter(names[-1]) as writer:
      for j in range(skip + take + 1):
        writer.write(f'{f}/{j}'.encode())
  source = object.__new__(pipeline._Source)  # The files of one process, without a builder.
  source._synthetic, source.process_index = None, 0
  source.builder = type('Builder', (), {'data_dir': str(tmp_path)})
  starts = np.cumsum([0] + takes[:-1])
  source._files = (tf.constant(names),) + tuple(
    tf.constant(x, tf.int64) for x in (skips, takes, starts)
  )
  table = list(source.records().as_numpy_iterator())  # Storage order: index i is record i.
  assert table == [
    f'{f}/{j}'.encode() for f in range(3) for j in range(skips[f], skips[f] + takes[f])
  ]
  for epoch, buffer in ((0, 0), (0, 5), (3, 5)):
    kw = dict(seed=7, shuffle_buffer=buffer)
    records = list(source.records(epoch, **kw).as_numpy_iterator())
    indices = list(source.records(epoch, indices=True, **kw).as_numpy_iterator())
    assert records == [table[i] for i in indices] and sorted(records) == sorted(table)
    assert records != table  # Interleaved (and shuffled), so the check is not trivial.


def test_cache_holds_examples_of_different_shapes():
  shapes = [(3, 5, 3), (4, 2, 3), (3, 5, 3)]
  examples = [
    {'image': np.full(s, i, np.uint8), 'label': np.int32(i)} for i, s in enumerate(shapes)
  ]
  ds = tf.data.Dataset.from_generator(
    lambda: iter(examples),
    output_signature={
      'image': tf.TensorSpec([None, None, 3], tf.uint8),
      'label': tf.TensorSpec([], tf.int32),
    },
  )
  lookup = pipeline._cache(ds, 'test')
  for i in (2, 0, 1):
    got = tf.data.Dataset.from_tensors(tf.constant(i, tf.int64)).map(lookup).get_single_element()
    np.testing.assert_array_equal(got['image'], examples[i]['image'])
    assert int(got['label']) == i
  spec = tf.data.Dataset.range(3).map(lookup).element_spec
  assert spec['image'].shape.as_list() == [None, None, 3]


def test_eval_padding_rows_are_not_decoded(folder):
  decoded = []
  count = lambda image: tf.py_function(lambda x: decoded.append(1) or x, [image], tf.string)
  preprocess.register('count_calls')(lambda: count)
  try:
    for split, examples in (('train', 63), ('validation', 6)):
      decoded.clear()
      for p in range(P):
        kw = dict(train=False, global_batch_size=16, process_index=p, process_count=P)
        batches = list(_get(folder, split, preprocess='count_calls|decode', **kw))
        assert len(batches) == (4 if split == 'train' else 1)  # No batch of padding alone.
      assert len(decoded) == examples  # 64 and 16 rows, the padding not decoded.
  finally:
    preprocess._OPS.pop('count_calls')


def test_digits_matches_scikit_learn(tmp_path):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  data_dir = str(tmp_path)
  num_classes, names, sizes = data.get_dataset_info('digits', data_dir)
  assert (num_classes, sizes) == (10, {'train': 1437, 'test': 360}) and names[3] == '3'
  ds = data.get_dataset(
    'digits',
    'test',
    preprocess='decode',
    train=False,
    global_batch_size=128,
    data_dir=data_dir,
    process_index=0,
    process_count=1,
  )
  got = sorted(
    (b['image'][i].tobytes(), int(b['label'][i])) for b in ds for i in np.flatnonzero(b['mask'])
  )
  digits = load_digits()
  _, test = train_test_split(np.arange(1797), test_size=360, stratify=digits.target, random_state=0)
  scaled = np.round(digits.images * 255 / 16).astype(np.uint8)
  expected = sorted(
    (np.repeat(scaled[i][..., None], 3, -1).tobytes(), int(digits.target[i])) for i in test
  )
  assert got == expected
  assert np.bincount([label for _, label in got]).min() >= 35  # Stratified: ~36 per class.
  # Upscaled to 32 as uint8; the device part of the string maps them to [-1, 1].
  pp = 'decode|resize(32)|value_range(-1,1)'
  batch = next(
    iter(
      data.get_dataset(
        'digits',
        'train',
        preprocess=pp,
        train=True,
        global_batch_size=32,
        data_dir=data_dir,
        process_index=0,
        process_count=1,
      )
    )
  )
  assert batch['image'].shape == (32, 32, 32, 3) and batch['image'].dtype == np.uint8
  image = np.asarray(data.device_preprocess(pp)(batch['image']))
  assert image.dtype == np.float32 and image.min() == -1 and image.max() <= 1
  assert batch['label'].dtype == np.int32


def test_synthetic():
  name = 'synthetic:image_size=16,num_classes=7,num_examples=50,num_test=10'
  kw = dict(preprocess='decode|value_range(-1,1)', global_batch_size=8)
  train = data.get_dataset(name, 'train', train=True, process_index=0, process_count=1, **kw)
  a, b = _take(train, 8), _take(train, 8)
  np.testing.assert_array_equal(a[7]['image'], b[7]['image'])
  assert a[0]['image'].shape == (8, 16, 16, 3) and train.num_classes == 7
  assert 0 <= min(x['label'].min() for x in a) and max(x['label'].max() for x in a) < 7
  resumed = next(
    iter(
      data.get_dataset(
        name, 'train', train=True, start_batch=5, process_index=0, process_count=1, **kw
      )
    )
  )
  np.testing.assert_array_equal(resumed['image'], a[5]['image'])
  total = 0
  for p in range(2):
    ds = data.get_dataset(name, 'test', train=False, process_index=p, process_count=2, **kw)
    total += sum(int(x['mask'].sum()) for x in ds)
    assert ds.num_batches == 2  # ceil(5 / 4)
  assert total == 10


def test_errors(folder, tmp_path):
  kw = dict(preprocess='decode', train=True, global_batch_size=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="Unknown dataset 'cifar_11'"):
    data.get_dataset('cifar_11', 'train', **kw)
  with pytest.raises(FileNotFoundError, match='data_dir .*missing.* does not exist'):
    data.get_dataset('cifar10', 'train', data_dir=str(tmp_path / 'missing'), **kw)
  with pytest.raises(ValueError, match='fewer than one batch of 128'):
    _get(folder, 'validation', train=True, global_batch_size=128)
  with pytest.raises(ValueError, match='multiple of the process count'):
    _get(folder, train=True, global_batch_size=10, process_count=4)
  with pytest.raises(ValueError, match="Bad split 'test'"):
    _get(folder, 'test', train=False, global_batch_size=8)
  with pytest.raises(ValueError, match='Process 7 of 8 has no examples'):
    iter(
      _get(folder, 'validation', train=False, global_batch_size=8, process_index=7, process_count=8)
    )
  with pytest.raises(ValueError, match='Synthetic data has splits'):
    data.get_dataset('synthetic', 'train[:10]', **kw)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.get_dataset('folder:/nonexistent/images', 'train', **kw)


def test_a_string_that_ends_in_float_on_the_host_is_applied_whole(folder):
  """A host part that ends in float32 (value_range, then a resize) gets the device part too."""
  pp = 'decode|value_range(0,255)|resize(6, method="bicubic")|value_range(-1,1)'
  batch = next(iter(_get(folder, train=True, global_batch_size=8, preprocess=pp)))
  assert batch['image'].dtype == np.float32 and -1.5 < batch['image'].min() < 0
  # The device part leaves such images alone.
  np.testing.assert_array_equal(data.device_preprocess(pp)(batch['image']), batch['image'])


def test_tensorflow_sees_no_accelerators():
  assert tf.config.get_visible_devices('GPU') == []
  assert tf.config.get_visible_devices('TPU') == []
