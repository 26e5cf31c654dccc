"""Input pipeline throughput on ImageNet-sized JPEG photos, against the decode-alone ceiling.

Makes ~500x375 quality-90 JPEGs from the sample photos scikit-image ships (random 4:3 crops,
resized, some portrait, some flipped), prepares them as a `folder:` dataset, then measures in one
run, with the same tf.data thread pool:
  1. ceiling: `tf.io.decode_jpeg` alone over the same files (bytes already in memory);
  2. train:   decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1,1) (preset vit_finetune
     at 224), batched, to numpy float32;
  3. eval:    decode|resize_small(256)|central_crop(224)|value_range(-1,1) (preset imagenet_eval)
     and decode_jpeg_and_central_crop(224)|value_range(-1,1) (preset imagenet_eval_fused),
     padded batches, to numpy;
  2b/3b. train and exact eval again, for the A/B in the same run: computed per example (each
     image a tensor of the per-example map, then batched, instead of one op per batch); with
     TensorFlow's decode_and_crop_jpeg instead of the windowed decoder (what a machine without
     libjpeg-turbo runs); with TensorFlow's decode and resize ops (no C++ compiler);
  4. resume:  time to the first batch at start_batch=0 and at the last batch of the first epoch
     (the shuffled records before it are skipped without decoding).

  python benchmarks/input_pipeline.py --num_images=2048 --seconds=8 --rounds=5
"""

import argparse
import gc
import os
import time

import numpy as np


def make_jpegs(folder: str, num_images: int, seed: int = 0) -> list[str]:
  """Writes `num_images` JPEGs (q90, 500x375 or 375x500) into folder/<photo name>/."""
  import skimage.data
  from PIL import Image

  names = [
    'astronaut',
    'coffee',
    'chelsea',
    'rocket',
    'hubble_deep_field',
    'immunohistochemistry',
    'retina',
    'camera',
  ]
  photos = {n: getattr(skimage.data, n)() for n in names}
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(num_images):
    name = names[i % len(names)]
    photo = photos[name]
    photo = np.repeat(photo[..., None], 3, -1) if photo.ndim == 2 else photo[..., :3]
    h, w = photo.shape[:2]
    portrait = rng.random() < 0.25
    aspect = 3 / 4 if portrait else 4 / 3  # width / height
    ch = int(min(h, w / aspect) * rng.uniform(0.6, 1.0))
    cw = int(ch * aspect)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = Image.fromarray(photo[y : y + ch, x : x + cw])
    image = image.resize((375, 500) if portrait else (500, 375), Image.BICUBIC)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    path = os.path.join(folder, name, f'{i:05d}.jpg')
    image.save(path, quality=90)
    paths.append(path)
  return paths


def _measure(pipelines: dict, rounds: int, steps: int, warmup: int = 4) -> dict:
  """Images/s of each pipeline, median over `rounds`; the pipelines alternate within a round so
  that background load on the machine hits all alike. Each runs alone: its iterator is made,
  warmed up (buffers filled, functions traced), timed, then deleted, which stops its threads."""
  rates = {name: [] for name in pipelines}
  for _ in range(rounds):
    for name, (make, count) in pipelines.items():
      iterator = make()
      for _ in range(warmup):
        next(iterator)
      start, n = time.perf_counter(), 0
      for _ in range(steps):
        n += count(next(iterator))
      rates[name].append(n / (time.perf_counter() - start))
      del iterator
      gc.collect()
  return {name: float(np.median(r)) for name, r in rates.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/vit_jax_input_benchmark')
  parser.add_argument('--num_images', type=int, default=2048)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--seconds', type=float, default=10.0, help='rough time per pipeline')
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()

  import tensorflow as tf

  from vit_jax import data
  from vit_jax.data import fast_jpeg, fast_resize, pipeline, preprocess

  if not fast_resize.available():
    print('NOTE: the fused resize op is unavailable here; all rows resize with TensorFlow ops.')
  if not fast_jpeg.available():
    print('NOTE: the windowed JPEG decoder is unavailable here; all rows decode with TensorFlow.')

  folder = os.path.join(args.workdir, f'jpegs_{args.num_images}')
  if not os.path.isdir(folder):
    make_jpegs(folder, args.num_images)
  t = time.perf_counter()
  data.prepare_folder(folder, os.path.join(args.workdir, 'tfds'))
  print(f'prepared folder dataset in {time.perf_counter() - t:.1f}s')
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
  blobs = [open(f, 'rb').read() for f in files]
  print(f'{len(blobs)} JPEGs, mean {np.mean([len(b) for b in blobs]) / 1e3:.0f} kB')
  common = dict(
    data_dir=os.path.join(args.workdir, 'tfds'),
    global_batch_size=args.batch_size,
    process_index=0,
    process_count=1,
    num_threads=args.threads,
  )
  dataset = f'folder:{folder}'
  b, cores = args.batch_size, args.threads

  options = tf.data.Options()
  options.threading.private_threadpool_size = args.threads
  options.threading.max_intra_op_parallelism = 1

  def ceiling():
    ds = tf.data.Dataset.from_tensor_slices(blobs).repeat()
    ds = ds.map(lambda x: tf.shape(tf.io.decode_jpeg(x, channels=3)), tf.data.AUTOTUNE)
    return ds.batch(b).prefetch(2).with_options(options).as_numpy_iterator()

  def get(pp, train, start_batch=0):
    return data.get_dataset(
      dataset, 'train', preprocess=pp, train=train, start_batch=start_batch, **common
    )

  def passes(ds):  # Eval passes back to back, without rebuilding the pipeline each time.
    return ds.make_tf_dataset().repeat().as_numpy_iterator()

  def without(make, *modules, per_example=False):
    """Builds the pipeline with our ops in `modules` switched off and, if `per_example`, without
    the batch-level path (each image computed in the per-example map, then batched)."""

    def wrapped():
      patches = [(m, 'available', lambda: False) for m in modules]
      if per_example:
        off = lambda *args, **kwargs: None
        patches += [(preprocess, 'batched', off), (preprocess, 'plan_for_batch', off)]
      saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
      for obj, name, value in patches:
        setattr(obj, name, value)
      try:
        return make()
      finally:
        for obj, name, value in saved:
          setattr(obj, name, value)

    return wrapped

  # The presets' strings at 224: ViT fine-tuning's train pipeline, the ImageNet eval (exact
  # published ops) and its fused variant.
  train_pp = data.preset('vit_finetune', 224)['train_pp']
  unfused_eval_pp = data.preset('imagenet_eval', 224)['eval_pp']
  eval_pp = data.preset('imagenet_eval_fused', 224)['eval_pp']
  assert train_pp == 'decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1,1)', train_pp
  assert unfused_eval_pp == 'decode|resize_small(256)|central_crop(224)|value_range(-1,1)'
  assert eval_pp == 'decode_jpeg_and_central_crop(224)|value_range(-1,1)', eval_pp
  train_ds = get(train_pp, True)
  real = lambda x: int(x['mask'].sum())
  # Pipelines are built inside each row's `make`: whether a batch runs as one op is decided when
  # the dataset is built, so the A/B rows switch our ops off before that.
  train = lambda: iter(get(train_pp, True))
  exact_eval = lambda: passes(get(unfused_eval_pp, False))

  def without_ours(name, make):  # The A/B rows.
    return {
      f'{name} (the same, computed per example)': (without(make, per_example=True), real),
      f'{name} (the same with TensorFlow decode_and_crop_jpeg)': (without(make, fast_jpeg), real),
      f'{name} (the same with TensorFlow decode and resize ops)': (
        without(make, fast_jpeg, fast_resize),
        real,
      ),
    }

  pipelines = {
    'decode_jpeg alone': (ceiling, len),
    f'train  {train_pp}': (train, real),
    **without_ours('train ', train),
    f'eval   {unfused_eval_pp} (preset imagenet_eval)': (exact_eval, real),
    **without_ours('eval   imagenet_eval', exact_eval),
    f'eval   {eval_pp}': (lambda: passes(get(eval_pp, False)), real),
  }
  steps = max(int(args.seconds * 300 * cores / b / args.rounds), 2)  # ~300 img/s/core expected
  rates = _measure(pipelines, args.rounds, steps)
  ceiling_rate = rates['decode_jpeg alone']
  print(f'\nthreads={cores} batch={b} rounds={args.rounds}: images/s/core (images/s), ratio')
  for name, rate in rates.items():
    print(f'  {rate / cores:7.1f} ({rate:6.0f})  {rate / ceiling_rate:4.2f}x  {name}')

  # Resume. Whole epochs are skipped arithmetically; inside the epoch, the shuffled records before
  # the start are read and dropped before parsing or decoding. Worst case: one epoch of records.
  n = train_ds.num_examples
  per_epoch = n // b
  print(f'\nresume (train split: {n} records, {per_epoch} batches/epoch):')
  for start in (0, 1000 * n, 1000 * n + per_epoch - 1):  # 1000 * n batches = 1000 * b epochs.
    t = time.perf_counter()
    next(iter(get(train_pp, True, start)))
    print(f'  start_batch={start:9d}: first batch after {time.perf_counter() - t:5.2f}s')
  # Skip throughput at scale: the same shard listed `copies` times makes a long epoch; time the
  # first record after skipping `far` records, against skipping none (both fill the buffer).
  source = pipeline._Source(dataset, 'train', common['data_dir'], 0, 1)
  names, skips, takes = source._files()
  copies = 20
  source._files = lambda: (
    tf.repeat(names, copies),
    tf.repeat(skips, copies),
    tf.repeat(takes, copies),
  )
  epoch = source.epoch_fn(shuffle=True, seed=0, shuffle_buffer=10_000, num_threads=args.threads)
  far = copies * n - 1
  seconds = {}
  for count in (0, far):
    t = time.perf_counter()
    next(iter(epoch(tf.constant(7, tf.int64)).skip(count).with_options(options)))
    seconds[count] = time.perf_counter() - t
  rate = far / (seconds[far] - seconds[0])
  record_kb = sum(len(x) for x in blobs) / len(blobs) / 1e3
  print(
    f'  skipping {far} records: {seconds[far]:.2f}s (vs {seconds[0]:.2f}s for none) = '
    f'{rate:.0f} records/s, {rate * record_kb / 1e3:.0f} MB/s at {record_kb:.0f} kB/record'
  )


if __name__ == '__main__':
  main()
