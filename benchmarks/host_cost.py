"""CPU cost per image of the host pipeline, with and without `cache`, on a small dataset.

    python benchmarks/host_cost.py [--dataset digits] [--rounds 5] [--batches 40]

For each preprocessing string (default: the quickstart's train and eval strings) and cache off/on,
`get_dataset` batches are pulled (numpy, as the trainer gets them) and the process CPU time (all
threads) is divided by the images: microseconds of CPU per image, the cost the host part takes
from a train step that shares the cores. For scale, two bare tf.data chains over the same images
held in memory: `map_gather` (a parallel map of one gather per element, then batch) and
`batch_gather` (batch the indices, then one gather per batch). Interleaved in rounds in one
process; medians. One JSON line each: pipeline, cache, cpu_us_per_image, images_per_s (wall),
and for cache=True the ratio of the CPU costs off/on.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import _common
import numpy as np
import tensorflow as tf

from vit_jax import data

STRINGS = {
  'train': 'decode|resize(18)|random_crop(16)|value_range(-1,1)',
  'eval': 'decode|resize(18)|central_crop(16)|value_range(-1,1)',
}


def _first(batch):
  return batch['label'] if isinstance(batch, dict) else batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', default='digits')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--threads', type=int, default=0, help='tf.data threads (0: the default)')
  args = parser.parse_args()
  streams = {}
  for (name, pp), cache in itertools.product(STRINGS.items(), (False, True)):
    kw = dict(preprocess=pp, global_batch_size=args.batch, process_index=0, process_count=1)
    ds = data.get_dataset(args.dataset, 'train', train=name == 'train', cache=cache,
                          num_threads=args.threads or None, **kw)  # fmt: skip
    # Eval passes are repeated (as every eval does); the first iter() builds the cache.
    stream = itertools.chain.from_iterable(itertools.repeat(ds)) if name == 'eval' else iter(ds)
    next(stream)
    streams[name, cache] = stream
  images = np.stack([x['image'] for x in data.get_dataset(
    args.dataset, 'train', preprocess='decode|resize(18)', train=False, global_batch_size=1,
    process_index=0, process_count=1)])  # fmt: skip
  index = tf.data.Dataset.range(len(images)).repeat()
  table = tf.constant(images[:, 0])
  gather = lambda i: tf.gather(table, i)
  bare = {
    'map_gather': index.map(gather, tf.data.AUTOTUNE, deterministic=True).batch(args.batch),
    'batch_gather': index.batch(args.batch).map(gather),
  }
  for name, ds in bare.items():
    streams[name, None] = iter(ds.prefetch(2).as_numpy_iterator())
  cpu, wall = {k: [] for k in streams}, {k: [] for k in streams}
  for _ in range(args.rounds):
    for key, stream in streams.items():
      c, w = time.process_time(), time.perf_counter()
      n = sum(len(_first(next(stream))) for _ in range(args.batches))
      cpu[key].append((time.process_time() - c) / n * 1e6)
      wall[key].append(n / (time.perf_counter() - w))
  for (name, cache), values in cpu.items():
    us = statistics.median(values)
    out = {'pipeline': name, 'cache': cache, 'cpu_us_per_image': round(us, 1),
           'images_per_s': round(statistics.median(wall[name, cache]))}  # fmt: skip
    if cache:
      out['ratio_off_on'] = round(statistics.median(cpu[name, False]) / us, 2)
    _common.emit(out, f'{name} cache={cache}: {us:.1f} us CPU/image')


if __name__ == '__main__':
  main()
