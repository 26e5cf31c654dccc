r"""Train-step throughput and MFU, against a matmul ceiling measured in the same process.

    .venv/bin/python benchmarks/train_step.py --model=ViT-Ti_16 --image_size=64 --batch=32
    .venv/bin/python benchmarks/train_step.py --model=ViT-B_16 --batch=256 --dtype=bfloat16  # GPU

Prints the step time, images/s, the step's FLOPs from XLA's cost analysis (and the 6 * params *
tokens estimate as a cross-check), achieved FLOP/s, and MFU against (a) the same process's best
jitted matmul and (b) the device's table peak when it has one (TPU/GPU). The machine's speed can
drift between runs, so only the ratios printed by one run are comparable.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import common
from vit_jax import metrics, models, train


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--accum_steps', type=int, default=1)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--optimizer', default='adamw', choices=['adamw', 'sgd'])
  parser.add_argument('--remat', default='none')
  parser.add_argument('--scan', action='store_true')
  parser.add_argument(
    '--attention_impl', default=None, choices=[None, 'xla', 'cudnn'], help='None: XLA picks'
  )
  parser.add_argument('--fsdp', type=int, default=1)
  parser.add_argument('--tensor', type=int, default=1)
  parser.add_argument('--matmul_size', type=int, default=2048)
  args = parser.parse_args()

  ceiling = metrics.measure_matmul_flops(args.matmul_size)
  config = common.base_config()
  config.model_name = args.model
  config.model = common.model_overrides(
    args.model, dtype=args.dtype, scan_layers=args.scan, remat_policy=args.remat
  )
  if args.attention_impl:
    config.model.attention_impl = args.attention_impl
  config.image_size = args.image_size
  config.batch_size = args.batch
  config.accum_steps = args.accum_steps
  config.eval_batch_size = args.batch
  config.optimizer = args.optimizer
  config.mesh.update(fsdp=args.fsdp, tensor=args.tensor)
  trainer = train.Trainer(config, num_classes=1000)
  state = trainer.init_state(0)
  micro = args.batch // args.accum_steps
  rng = np.random.default_rng(0)
  local = {
    'image': rng.uniform(-1, 1, (args.accum_steps, micro, args.image_size, args.image_size, 3)),
    'label': rng.integers(0, 1000, (args.accum_steps, micro)).astype(np.int32),
  }
  local['image'] = local['image'].astype(np.float32)
  batch = trainer.global_batch(local, stacked=True)
  key = jax.random.key_data(jax.random.key(0))
  t = time.perf_counter()
  _, flops = trainer.compile(state, batch, key)
  compile_s = time.perf_counter() - t
  state, out = trainer.train_step(state, batch, key)  # Warm-up.
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(args.steps):
    state, out = trainer.train_step(state, batch, key)
  jax.block_until_ready(out)
  step_s = (time.perf_counter() - t) / args.steps

  n_params = models.count_params(trainer.model, args.image_size)
  patch = models.get_model_config(args.model).patches.size[0]
  tokens = (args.image_size // patch) ** 2 + 1
  estimate = 6 * n_params * tokens * args.batch
  achieved = flops / step_s if flops else float('nan')
  devices = trainer.mesh.size
  print(
    f'device: {jax.devices()[0].device_kind} x {devices}; model {args.model} '
    f'({n_params / 1e6:.2f}M params), {args.image_size}px, batch {args.batch}, {args.dtype}, '
    f'attention {args.attention_impl or "default"}'
  )
  print(
    f'compile: {compile_s:.1f}s; step: {step_s * 1e3:.1f} ms; '
    f'{args.batch / step_s:.1f} img/s ({args.batch / step_s / devices:.1f}/device)'
  )
  compiled = metrics.compiled_flops(trainer.compiled_train_step, devices) or float('nan')
  print(
    f'FLOPs/step: for MFU (Trainer.compile) {flops:.3g}; 6*params*tokens*batch '
    f'{estimate:.3g} (ratio {flops / estimate:.2f}); compiled program {compiled:.3g}'
  )
  print(
    f'matmul ceiling (same process, {args.matmul_size}^2 f32): {ceiling / 1e9:.1f} GFLOP/s; '
    f'achieved {achieved / 1e9:.1f} GFLOP/s; MFU vs ceiling {achieved / ceiling:.1%}'
  )
  peak = metrics.device_peak_flops()
  if peak:
    print(
      f'MFU vs table peak ({peak / 1e12:.0f} TFLOP/s x {devices}): '
      f'{achieved / (peak * devices):.1%}'
    )


if __name__ == '__main__':
  main()
