"""Per-process tf.data input pipeline: sharding, shuffling, preprocessing, batching, resume.

Deterministic by construction (docs/data.md), so a resumed run needs only the step number: the
stream is a function of (seed, process, process count, batch index).
"""

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import builders
from vit_jax.data import preprocess as preprocess_lib

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Dataset:
  """Iterable of per-process numpy batches; `iter()` starts a fresh, identical iterator.
  `num_examples`: of the whole split; `num_batches`: eval only, batches per pass on each process."""

  num_classes: int
  label_names: list[str]
  num_examples: int
  local_batch_size: int
  num_batches: int | None
  make_tf_dataset: Callable[[], tf.data.Dataset] = dataclasses.field(repr=False)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self.make_tf_dataset().as_numpy_iterator())


def _seed(*parts) -> tf.Tensor:
  """An int64 [2] stateless seed from integers/scalar tensors."""
  out = tf.constant([0x5EED, 0], tf.int64)
  for part in parts:
    out = tf.random.experimental.stateless_fold_in(out, tf.cast(part, tf.int64))
  return out


class _Source:
  """Records of one process's part of a split: sizes, per-epoch record streams, parsing."""

  def __init__(self, dataset, split, data_dir, process_index, process_count):
    self.split, self.process_index, self.process_count = split, process_index, process_count
    self._synthetic = self._specs = self._files = None
    if dataset.split(':')[0] == 'synthetic':
      self._synthetic, self.label_names, sizes = builders.synthetic(dataset)
      self.num_classes = len(self.label_names)
      if split not in sizes:
        raise ValueError(f'Synthetic data has splits {list(sizes)}, not {split!r}.')
      self.num_examples = sizes[split]
      self.local_sizes = [len(range(p, sizes[split], process_count)) for p in range(process_count)]
      return
    self.builder = builders.dataset_builder(dataset, data_dir)
    self._label_key = builders.LABEL_KEYS.get(self.builder.name, 'label')
    label = self.builder.info.features[self._label_key]
    self.num_classes, self.label_names = label.num_classes, list(label.names)
    try:
      self.num_examples = self.builder.info.splits[split].num_examples
      self.subsplits = tfds.even_splits(split, n=process_count)
      self.local_sizes = [self.builder.info.splits[s].num_examples for s in self.subsplits]
    except (KeyError, ValueError) as e:
      raise ValueError(
        f'Bad split {split!r} for dataset {dataset!r} '
        f'(splits: {list(self.builder.info.splits)}): {e}'
      ) from e
    keys = ['image', self._label_key] + ['real_label'] * (self.builder.name == 'imagenet2012_real')
    self._decoders = tfds.decode.PartialDecoding(
      dict.fromkeys(keys, True), decoders={'image': tfds.decode.SkipDecoding()}
    )
    instructions = self.builder.info.splits[self.subsplits[process_index]].file_instructions
    if (
      self.builder.info.file_format == tfds.core.FileFormat.TFRECORD
      and instructions
      and tf.io.gfile.exists(instructions[0].filename)  # Not so under tfds.testing.mock_data.
    ):
      takes = [f.take for f in instructions]
      starts = np.cumsum([0] + takes[:-1])  # Index of each file's first record.
      numbers = [tf.constant(x, tf.int64) for x in ([f.skip for f in instructions], takes, starts)]
      self._files = (tf.constant([f.filename for f in instructions]), *numbers)
    # tf.io.parse_example on just the image bytes and the label where both are plain scalars
    # (Image, ClassLabel): cheaper per record than TFDS's general parser.
    info = self.builder.info.features.get_serialized_info()
    if len(keys) == 2 and all(
      k in info and info[k].shape == () and info[k].dtype in (tf.string, tf.int64) for k in keys
    ):
      self._specs = {k: tf.io.FixedLenFeature([], info[k].dtype) for k in keys}

  def records(self, epoch=None, *, seed=0, shuffle_buffer=0, num_threads=None, indices=False):
    """This process's records (their indices in `records()` if `indices`), in a fixed order.

    epoch=None: in storage order (record i is index i). Else that epoch's order: shards (shuffled
    if `shuffle_buffer`) interleaved, then records shuffled (a buffer of `shuffle_buffer`), seeds
    from (seed, process, epoch). The order depends on counts only: records and indices agree.
    """
    shuffle = epoch is not None and shuffle_buffer > 0 and not self._synthetic
    rng = _seed(seed, self.process_index, epoch) if shuffle else None
    if self._synthetic or (self._files is None and indices):  # Synthetic records are indices.
      records = tf.data.Dataset.range(self.local_sizes[self.process_index])
    elif self._files is None:
      records = self.builder.as_dataset(
        split=self.subsplits[self.process_index], shuffle_files=False, decoders=self._decoders
      )
    else:
      order = tf.range(tf.size(self._files[0]))
      if shuffle:
        order = tf.random.experimental.stateless_shuffle(order, rng)
      shards = tf.data.Dataset.from_tensor_slices(tuple(tf.gather(x, order) for x in self._files))
      read = lambda file, skip, take, start: (
        tf.data.Dataset.range(start, start + take)
        if indices
        else tf.data.TFRecordDataset(file, buffer_size=1 << 20).skip(skip).take(take)
      )
      # Parallel reads hide remote storage's latency (gs://); on local files the hand-off between
      # threads costs more per record than the read itself.
      cycle = 1 if epoch is None else min(16, int(self._files[0].shape[0]))
      remote = '://' in self.builder.data_dir and not indices and cycle > 1
      parallel = min(cycle, num_threads or 16) if remote else None
      records = shards.interleave(read, cycle, num_parallel_calls=parallel)
    if shuffle:
      shuffle_seed = tf.random.stateless_uniform([], rng, 0, 2**62, tf.int64)
      records = records.shuffle(shuffle_buffer, seed=shuffle_seed)
    return records

  def parse(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    """(key, record): one parse op per 256 records (not per record) where `_specs` allow it."""
    if not self._specs or self._files is None:
      return ds
    return ds.batch(256).map(lambda key, r: (key, tf.io.parse_example(r, self._specs))).unbatch()

  def example(self, record) -> dict:
    """A (parsed) record -> {'image': bytes or uint8, 'label': int32, ...}; no decoding."""
    if self._synthetic:
      # Global example index k -> deterministic image and label, whatever the process count.
      k = self.process_index + self.process_count * record
      rng = _seed(0 if self.split == 'train' else 1, k)  # test == validation
      size = self._synthetic['image_size']
      image = tf.random.stateless_uniform([size, size, 3], rng, 0, 256, tf.int32)
      label_rng = tf.random.experimental.stateless_fold_in(rng, 1)
      label = tf.random.stateless_uniform([], label_rng, 0, self.num_classes, tf.int32)
      return {'image': tf.cast(image, tf.uint8), 'label': label}
    if not isinstance(record, dict):  # Serialized; as_dataset (mock data) gives dicts.
      features = self._decoders.extract_features(self.builder.info.features)
      record = features.deserialize_example(record, decoders=self._decoders.decoders)
    out = {'image': record['image'], 'label': tf.cast(record[self._label_key], tf.int32)}
    if 'real_label' in record:  # ImageNet ReaL: multi-hot; all-zero rows are excluded by ReaL.
      real = tf.reduce_sum(tf.one_hot(record['real_label'], self.num_classes), 0)  # float32
      out['real_labels'] = tf.ensure_shape(tf.minimum(real, 1.0), [self.num_classes])
    return out


def _cache(examples: tf.data.Dataset, what: str) -> Callable[[tf.Tensor], dict]:
  """Holds `examples` (dicts) in host memory; returns `lookup(index) -> example`. A key whose
  values differ in shape is stored flat, with each value's end and shape."""
  rows = list(examples.prefetch(AUTOTUNE).as_numpy_iterator())
  tables, size = {}, 0
  for key in rows[0]:
    values = [np.array(r[key], object) if isinstance(r[key], bytes) else r[key] for r in rows]
    size += sum(len(v.item()) if v.dtype == object else v.nbytes for v in values)
    if all(v.shape == values[0].shape for v in values):  # One gather per lookup.
      tables[key] = (tf.constant(np.stack(values)),)
      continue
    shapes = np.array([v.shape for v in values], np.int64)
    static = [d if (shapes[:, i] == d).all() else None for i, d in enumerate(shapes[0])]
    ends = tf.constant(np.cumsum([v.size for v in values]))
    flat = tf.constant(np.concatenate([v.ravel() for v in values]))
    tables[key] = (flat, ends, tf.constant(shapes), static)
  logging.info('Cached %d examples of %s: %.1f MB', len(rows), what, size / 1e6)

  def lookup(i):
    out = {}
    for key, (values, *ragged) in tables.items():
      if ragged:
        end, shape = tf.gather(ragged[0], i), tf.gather(ragged[1], i)
        out[key] = tf.reshape(values[end - tf.reduce_prod(shape) : end], shape)
        out[key].set_shape(ragged[2])
      else:
        out[key] = tf.gather(values, i)
    return out

  return lookup


def get_dataset(
  dataset: str,
  split: str,
  *,
  preprocess: str,
  train: bool,
  global_batch_size: int,
  data_dir: str | None = None,
  seed: int = 0,
  start_batch: int = 0,
  shuffle_buffer: int = 10_000,
  process_index: int | None = None,
  process_count: int | None = None,
  num_threads: int | None = None,
  prefetch: int = 2,
  cache: bool = False,
) -> Dataset:
  """Returns this process's batches of `split` of `dataset`, preprocessed by `preprocess`.

  Args:
    dataset: 'digits', 'folder:/path/to/images', 'imagenet21k', a TFDS name or
      'synthetic[:image_size=224,num_classes=1000,num_examples=10000,num_test=1000]'.
    split: a TFDS split string ('train', 'test', 'train[:90%]').
    preprocess: ops separated by '|' (preprocess.py); its trailing `value_range` ops are left to
      the device (`device_preprocess`) when the rest yields uint8 images, else applied here.
    train: True: shuffled, repeated forever, full batches. False: one pass, the last batches
      padded (zeros, mask=False) to `num_batches`, equal on all processes.
    global_batch_size: examples per step over all processes.
    data_dir: TFDS data directory (default: TFDS's, ~/tensorflow_datasets).
    seed: the data seed (shuffling, augmentation).
    start_batch: train only: start at this batch of the uninterrupted stream (resume).
    shuffle_buffer: example shuffle buffer size.
    process_index, process_count: default jax.process_index() / jax.process_count().
    num_threads: tf.data's thread pool size (default: env VIT_JAX_DATA_THREADS, else half the
      cores when JAX computes on the CPU, else TF's: all cores).
    prefetch: batches prefetched on the host.
    cache: hold this process's examples in host memory after the string's deterministic start
      (its ops before the first random one), computed at the first `iter()`; the same batches.

  Returns:
    A `Dataset` of {'image': uint8 (unless the host applied the whole string), 'label': int32,
    'mask': bool, and 'labels' (with `onehot`) or 'real_labels' (ImageNet ReaL): float32}.

  Raises:
    ValueError: bad batch size, split or preprocessing string; a train split under one batch.
    FileNotFoundError: missing data_dir or unprepared dataset (says how to prepare it).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size={global_batch_size} must be a positive multiple of the process '
      f'count ({process_count}).'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  if start_batch and not train:
    raise ValueError('start_batch is for training streams; evaluation always starts at 0.')
  b = global_batch_size // process_count
  if not num_threads:
    # A model on the CPU needs cores too: tf.data gets half.
    half = max(1, (os.cpu_count() or 2) // 2) if jax.default_backend() == 'cpu' else None
    num_threads = int(os.environ.get('VIT_JAX_DATA_THREADS', 0)) or half
  source = _Source(dataset, split, data_dir, process_index, process_count)
  host_pp, device_pp = preprocess_lib.split(preprocess)
  device_fn = preprocess_lib.get_preprocess_fn(device_pp)
  if train and min(source.local_sizes) < b:
    raise ValueError(
      f'Split {split!r} of dataset {dataset!r} has {source.num_examples} examples '
      f'({min(source.local_sizes)} on the smallest of {process_count} processes), fewer than '
      f'one batch of {global_batch_size}; use a smaller global_batch_size or a larger split.'
    )
  n = source.local_sizes[process_index]
  if n == 0:
    raise ValueError(
      f'Process {process_index} of {process_count} has no examples of split {split!r} of '
      f'{dataset!r} ({source.num_examples} in all); evaluate it with fewer processes.'
    )
  example_seed = _seed(seed, process_index)[0]  # Eager: a constant in the graph.
  num_batches = None if train else math.ceil(max(source.local_sizes) / b)
  cached = preprocess_lib.num_deterministic(host_pp) if cache else 0
  cached_fn = preprocess_lib.get_preprocess_fn(host_pp, stop=cached)
  host_fn = preprocess_lib.get_preprocess_fn(host_pp, start=cached)
  lookup = []

  def prepare(pos, item):
    data = lookup[0](item) if cache else source.example(item)
    data['_rng'] = tf.stack([example_seed, pos])  # Stateless: (hash of seed and process, pos).
    data = host_fn(data)
    if data['image'].dtype != tf.uint8:  # The device part expects uint8: apply it here.
      data = device_fn(data)
    keys = ('image', 'label', 'labels', 'real_labels')
    return {'mask': tf.constant(True), **{k: data[k] for k in keys if k in data}}

  def pad(batch):  # To b rows (eval's last batch): zeros, so mask=False.
    k = b - tf.shape(batch['label'])[0]
    return {key: tf.pad(v, [[0, k]] + [[0, 0]] * (v.shape.rank - 1)) for key, v in batch.items()}

  def make() -> tf.data.Dataset:
    if cache and not lookup:
      examples = source.parse(source.records().enumerate())
      examples = examples.map(lambda _, r: cached_fn(source.example(r)), AUTOTUNE)
      lookup.append(_cache(examples, f'{dataset} {split} (process {process_index})'))
    kw = dict(seed=seed, num_threads=num_threads, indices=cache)
    # (Small sequential maps cost more per element than reading a record, so positions come
    # from `enumerate` alone and everything else happens in the parallel `prepare`.)
    if train:
      first_epoch, skip = divmod(start_batch * b, n)

      def epoch(e):
        records = source.records(e, shuffle_buffer=shuffle_buffer, **kw).enumerate(start=e * n)
        return records.skip(tf.where(e == first_epoch, tf.constant(skip, tf.int64), 0))

      ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
    else:
      ds = source.records(0, **kw).enumerate()  # Interleaved as in training, not shuffled.
    if not cache:
      ds = source.parse(ds)
    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(b, drop_remainder=train).map(pad)
    if not train and num_batches > math.ceil(n / b):  # Whole batches of padding.
      zeros = ds.take(1).map(lambda x: {k: tf.zeros_like(v) for k, v in x.items()}).cache()
      ds = ds.concatenate(zeros.repeat(num_batches - math.ceil(n / b)))
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if num_threads:
      options.threading.private_threadpool_size = num_threads
    return ds.prefetch(prefetch).with_options(options)

  return Dataset(source.num_classes, source.label_names, source.num_examples, b, num_batches, make)
