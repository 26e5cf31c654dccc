"""Input pipeline throughput per host core, against the bare chain of the same TensorFlow ops.

Makes ~500x375 quality-90 JPEGs from the sample photos scikit-image ships (random 4:3 crops,
resized, some portrait, some flipped), prepares them as a `folder:` dataset, then measures in one
run, interleaved in rounds (median), with the same tf.data thread pool, images per second of
process CPU time (all threads: images/s per fully used core, robust to other load) of:
  - ours: `get_dataset` with the recipe's string (its `value_range` is left to the device): records
    read, shuffled, parsed, seeded, preprocessed and batched as the trainer gets them;
  - tf ops: the same TensorFlow calls written out, mapped over the same JPEG bytes already in
    memory, batched (no records, shuffling, seed bookkeeping or masks).
Both hand their uint8 batches to the JAX devices the same way (`data.prefetch` with
`sharding.global_batch`, as the trainer does), so the ratio is the cost of our machinery. Eval
reads a split of whole batches (the one padded batch per pass is negligible at scale, not here).
Pipelines: `train` = decode_jpeg_and_inception_crop(224)|flip_lr, `augreg` = train|randaug(2,15),
`eval` = decode|resize_small(256)|central_crop(224).

  python benchmarks/input_pipeline.py --json   # one JSON line per pipeline (~2 min on 2 cores)
"""

import argparse
import gc
import json
import os
import time

import numpy as np

PIPELINES = {
  'train': 'decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1,1)',
  'augreg': 'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)',
  'eval': 'decode|resize_small(256)|central_crop(224)|value_range(-1,1)',
}


def make_jpegs(folder: str, num_images: int, seed: int = 0) -> None:
  """Writes `num_images` JPEGs (q90, 500x375 or 375x500) into folder/<photo name>/."""
  import skimage.data
  from PIL import Image

  names = ['astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'retina', 'camera']
  photos = {n: getattr(skimage.data, n)() for n in names}
  rng = np.random.default_rng(seed)
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
    image.save(os.path.join(folder, name, f'{i:05d}.jpg'), quality=90)


def tf_chains():
  """The bare chains: the TensorFlow calls each pipeline's ops stand for, on (index, bytes)."""
  import tensorflow as tf

  from vit_jax.data import randaug

  def resize(image, size, method):
    return tf.cast(tf.clip_by_value(tf.image.resize(image, size, method=method), 0, 255), tf.uint8)

  def train(i, raw):
    seed = tf.stack([i, tf.constant(0, tf.int64)])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(raw),
      tf.zeros([0, 0, 4], tf.float32),
      seed=seed,
      area_range=(0.05, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3),
      min_object_covered=0,
      use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = resize(tf.image.decode_and_crop_jpeg(raw, window, channels=3), [224, 224], 'bilinear')
    return tf.image.stateless_random_flip_left_right(image, seed + 1)

  def augreg(i, raw):
    return randaug.randaugment(train(i, raw), 2, 15, tf.stack([i, tf.constant(2, tf.int64)]))

  def eval_(i, raw):
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ratio = 256.0 / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
    image = resize(image, tf.stack([new_h, new_w]), 'area')
    return tf.image.crop_to_bounding_box(image, (new_h - 224) // 2, (new_w - 224) // 2, 224, 224)

  return {'train': train, 'augreg': augreg, 'eval': eval_}


def measure(makers: dict, rounds: int, steps: int, warmup: int = 3) -> dict:
  """{name: (images per CPU-second of this process, images per wall-second)}, medians over
  `rounds`. CPU time (all threads) is what a pipeline costs whatever else runs on the machine;
  the pipelines alternate within a round so that background load hits all alike, and each runs
  alone (made, warmed up, timed, deleted)."""
  rates = {name: [] for name in makers}
  for _ in range(rounds):
    for name, make in makers.items():
      iterator = make()
      for _ in range(warmup):
        next(iterator)
      cpu, wall, n = time.process_time(), time.perf_counter(), 0
      for _ in range(steps):
        n += next(iterator)
      rates[name].append((n / (time.process_time() - cpu), n / (time.perf_counter() - wall)))
      del iterator
      gc.collect()
  return {name: tuple(np.median(r, axis=0)) for name, r in rates.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', action='store_true', help='one JSON line per pipeline')
  parser.add_argument('--workdir', default='/tmp/vit_jax_input_benchmark')
  parser.add_argument('--num_images', type=int, default=2048)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--steps', type=int, default=16, help='batches timed per pipeline and round')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--pipelines', default=','.join(PIPELINES))
  args = parser.parse_args()

  import tensorflow as tf

  from vit_jax import data, sharding

  folder = os.path.join(args.workdir, f'jpegs_{args.num_images}')
  if not os.path.isdir(folder):
    make_jpegs(folder, args.num_images)
  data_dir = os.path.join(args.workdir, 'tfds')
  data.prepare_folder(folder, data_dir)
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
  blobs = [open(f, 'rb').read() for f in files]
  b = args.batch_size
  mesh = sharding.make_mesh({'data': -1})
  options = tf.data.Options()
  options.threading.private_threadpool_size = args.threads
  options.threading.max_intra_op_parallelism = 1
  chains = tf_chains()
  put = lambda x: sharding.global_batch(x, mesh, sharding.DEFAULT_RULES)

  def ours(name):
    pp, train = PIPELINES[name], name != 'eval'
    split = 'train' if train else f'train[:{args.num_images * 8 // 10 // b * b}]'
    ds = data.get_dataset(f'folder:{folder}', split, preprocess=pp, train=train,
                          global_batch_size=b, data_dir=data_dir, process_index=0, process_count=1,
                          num_threads=args.threads)  # fmt: skip
    batches = ds.make_tf_dataset()
    batches = batches if train else batches.repeat()  # Eval: passes back to back.
    sizes = {}

    def count(batch):  # Real images delivered (eval padding excluded) and their bytes.
      sizes['bytes_per_image'] = batch['image'].nbytes // batch['image'].shape[0]
      return int(np.asarray(batch['mask']).sum())

    return lambda: map(count, data.prefetch(batches.as_numpy_iterator(), put)), sizes

  def bare(name):
    ds = tf.data.Dataset.from_tensor_slices(blobs).repeat().enumerate()
    ds = ds.map(lambda i, raw: {'image': chains[name](i, raw)}, tf.data.AUTOTUNE).batch(b)
    ds = ds.prefetch(2).with_options(options)
    return lambda: map(lambda x: len(x['image']), data.prefetch(ds.as_numpy_iterator(), put))

  names = args.pipelines.split(',')
  makers, sizes = {}, {}
  for name in names:
    makers[f'{name}/ours'], sizes[name] = ours(name)
    makers[f'{name}/tf'] = bare(name)
  rates = measure(makers, args.rounds, args.steps)
  for name in names:
    (rate, wall), (tf_rate, tf_wall) = rates[f'{name}/ours'], rates[f'{name}/tf']
    result = {
      'pipeline': name,
      'images_per_s_per_core': round(rate, 1),
      'ratio_to_tf_ops': round(rate / tf_rate, 3),
      'bytes_per_image': int(sizes[name]['bytes_per_image']),
    }
    if args.json:
      print(json.dumps(result))
    else:
      print(f'{name:7s} {rate:6.1f} img/s/core (tf ops alone {tf_rate:.1f}), '
            f'ratio {rate / tf_rate:.3f}'
            f' (wall clock: {wall:.0f} vs {tf_wall:.0f} img/s, {wall / tf_wall:.3f}), '
            f'{result["bytes_per_image"]} bytes/image; {PIPELINES[name]}')  # fmt: skip


if __name__ == '__main__':
  main()
