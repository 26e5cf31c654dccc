"""Forward throughput of ViT models, as a fraction of this machine's f32 matmul ceiling.

  python benchmarks/model_forward.py --models ViT-Ti_16,ViT-B_16 --batch 8 --image_size 224

Both figures come from the same process, so the ratio survives a noisy, shared machine: the
ceiling is the best FLOP/s of a jitted square f32 matmul; the model's FLOPs are XLA's cost analysis
of the compiled forward. Timings interleave model and ceiling runs and keep the best of each.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models


def _best_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> float:
  """Best observed f32 FLOP/s of an n x n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  return 2 * n**3 / _best_time(mm, a, b, repeats=repeats)


def forward_flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ViT-Ti_16,ViT-B_16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()

  print(f'devices: {jax.devices()}  batch {args.batch}  image {args.image_size}  {args.dtype}')
  for name in args.models.split(','):
    model = models.get_model(name, num_classes=1000, dtype=args.dtype)
    params = models.init_params(model, jax.random.key(0), args.image_size)
    images = jax.random.uniform(
      jax.random.key(1), (args.batch, args.image_size, args.image_size, 3), minval=-1
    )
    forward = jax.jit(lambda p, x, m=model: m.apply({'params': p}, x, train=False))
    flops = forward_flops(forward, params, images)
    model_times, ceilings = [], []
    for _ in range(args.rounds):  # Interleaved, so both see the same machine state.
      ceilings.append(matmul_ceiling())
      model_times.append(_best_time(forward, params, images, repeats=3))
    step = min(model_times)
    ceiling = max(ceilings)
    achieved = flops / step
    print(
      f'{name:12s} {args.batch / step:8.1f} img/s  {step * 1e3:8.1f} ms/batch  '
      f'{flops / 1e9:7.1f} GFLOP/batch  {achieved / 1e9:7.1f} GFLOP/s  '
      f'ceiling {ceiling / 1e9:7.1f} GFLOP/s  ratio {achieved / ceiling:.2f}'
    )
    np.testing.assert_array_equal(np.isfinite(forward(params, images)), True)


if __name__ == '__main__':
  main()
