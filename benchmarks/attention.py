"""Attention implementations on one model: speed of forward+backward and gradient error.

For each implementation ('xla', and 'cudnn' on GPUs) in bfloat16, times a jitted
`value_and_grad` of the cross-entropy and compares logits and gradients with a float32 XLA
reference on the same parameters and batch (relative L2 errors). The reference's time is printed
in the same process, so the speed ratios survive a noisy machine.

  python3 benchmarks/attention.py --model=ViT-B_16 --image_size=224 --batch=64

Measured on one H200 (docs/training.md): ViT-B/16, 224, batch 64, forward+backward: float32 XLA
88.6 ms; bfloat16 XLA 63.3 ms; bfloat16 cuDNN 54.6 ms (1.16x XLA); gradients' relative error vs
float32 1.19e-2 for both.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models


def run(name, impl, dtype, params, x, y, steps):
  model = models.abstract_model(name, 1000, image_size=x.shape[1], dtype=dtype, attention_impl=impl)
  apply = models.functional(model)

  def loss_fn(p):
    logits = apply(p, x).astype(jnp.float32)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return loss, logits

  f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  jax.block_until_ready(f(params))
  t = time.perf_counter()
  for _ in range(steps):
    out = f(params)
  jax.block_until_ready(out)
  (loss, logits), grads = out
  flat = np.concatenate([np.asarray(g, np.float32).ravel() for g in jax.tree.leaves(grads)])
  return float(loss), np.asarray(logits), flat, (time.perf_counter() - t) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-B_16')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()

  model = models.get_model(args.model, 1000, image_size=args.image_size)
  params = models.params_of(model)
  head = params['head']['kernel']  # Zero at init: a random head gives non-trivial logits.
  params['head']['kernel'] = 0.02 * jax.random.normal(jax.random.key(1), head.shape)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.image_size, args.image_size, 3)
  x = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 1000, args.batch))
  rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

  ref = run(args.model, 'xla', jnp.float32, params, x, y, args.steps)
  print(f'{jax.devices()[0].device_kind}: {args.model}, {args.image_size}px, batch {args.batch}')
  print(f'  float32 xla (reference): {ref[3] * 1e3:.1f} ms forward+backward')
  impls = ['xla'] + (['cudnn'] if jax.default_backend() == 'gpu' else [])
  for impl in impls:
    loss, logits, grads, dt = run(args.model, impl, jnp.bfloat16, params, x, y, args.steps)
    print(
      f'  bfloat16 {impl:5s}: {dt * 1e3:.1f} ms ({ref[3] / dt:.2f}x the reference); '
      f'loss {loss:.5f} (reference {ref[0]:.5f}); relative error vs float32: '
      f'logits {rel(logits, ref[1]):.2e}, gradients {rel(grads, ref[2]):.2e}'
    )
  if len(impls) == 1:
    print('  (cuDNN attention needs a GPU; only XLA was measured.)')


if __name__ == '__main__':
  main()
