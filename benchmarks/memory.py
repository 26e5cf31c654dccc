r"""Memory of the Trainer's train step vs batch and remat policy, and the largest batch per budget.

  python benchmarks/memory.py --model ViT-B_16 --batch 8,32 \
      --remat none,full,dots_with_no_batch_dims_saveable
  python benchmarks/memory.py --model ViT-L_16 --batch 8,32 --remat none,full --budget_gb 16

Nothing is allocated: the step is compiled ahead of time for the abstract train state and batch,
and XLA's `memory_analysis()` of the compiled program gives its buffers: `temp` (activations
kept for the backward pass and scratch: what remat trades), arguments (train state, batch),
outputs, and the donated bytes that alias them. total = arguments + outputs - aliased + temp: the
step's peak on one device. These are the buffer assignments of the backend it runs on (CPU here:
GPU and TPU compilers plan differently, so rerun there for their figures).

Per model and policy, `total` is fitted as fixed + per_image x batch from the batches given, the
largest batch under `--budget_gb` is predicted from the fit, and that batch is compiled to check.
"""

from __future__ import annotations

import argparse

import _common as common  # Puts this tree's root on sys.path.
import jax
import jax.numpy as jnp

from vit_jax import config as config_lib  # noqa: E402
from vit_jax import sharding, train  # noqa: E402

MB = 2**20


def step_memory(name: str, batch: int, remat: str, args) -> dict:
  config = config_lib.base_config()
  config.model_name = name
  config.model.update(dtype=args.dtype, remat_policy=remat, scan_layers=args.scan)
  config.image_size = args.image_size
  config.batch_size = config.eval_batch_size = batch
  config.optimizer = args.optimizer
  trainer = train.Trainer(config, num_classes=1000, devices=jax.devices()[:1])
  batch_sharding = sharding.batch_sharding(trainer.mesh, trainer.rules, 1)
  size = args.image_size
  batch_shapes = {
    'image': jax.ShapeDtypeStruct((1, batch, size, size, 3), jnp.float32, sharding=batch_sharding),
    'label': jax.ShapeDtypeStruct((1, batch), jnp.int32, sharding=batch_sharding),
  }
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=trainer.replicated)
  compiled, _ = trainer.compile(trainer.abstract_state, batch_shapes, rng)
  m = compiled.memory_analysis()
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  return {
    'model': name,
    'batch': batch,
    'image_size': size,
    'dtype': args.dtype,
    'remat': remat,
    'scan': args.scan,
    'temp_mb': common.rounded(m.temp_size_in_bytes / MB, 5),
    'argument_mb': common.rounded(m.argument_size_in_bytes / MB, 5),
    'output_mb': common.rounded(m.output_size_in_bytes / MB, 5),
    'alias_mb': common.rounded(m.alias_size_in_bytes / MB, 5),
    'total_mb': common.rounded(total / MB, 5),
    'device_kind': jax.devices()[0].device_kind,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-B_16')
  parser.add_argument('--batch', default='8,32', help='two or more batch sizes')
  parser.add_argument('--remat', default='none,full,dots_with_no_batch_dims_saveable')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--optimizer', default='sgd', choices=['sgd', 'adamw'])
  parser.add_argument('--scan', action='store_true')
  parser.add_argument('--budget_gb', type=float, default=16.0)
  args = parser.parse_args()
  batches = [int(b) for b in args.batch.split(',')]
  budget = args.budget_gb * 2**30
  for name in args.model.split(','):
    temps = {}
    for remat in args.remat.split(','):
      records = []
      for batch in batches:
        r = step_memory(name, batch, remat, args)
        records.append(r)
        common.emit(
          r,
          f'{name} b{batch} remat {remat}: temp (activations) {r["temp_mb"]:.0f} MB, '
          f'total {r["total_mb"]:.0f} MB',
        )
      temps[remat] = records[-1]['temp_mb']
      (b0, r0), (b1, r1) = (batches[0], records[0]), (batches[-1], records[-1])
      per_image = (r1['total_mb'] - r0['total_mb']) * MB / (b1 - b0)
      fixed = r0['total_mb'] * MB - per_image * b0
      predicted = int((budget - fixed) // per_image)
      check = step_memory(name, predicted, remat, args)
      if check['total_mb'] * MB > budget:  # The fit was optimistic: step down until it fits.
        while check['total_mb'] * MB > budget and predicted > 1:
          predicted = int(predicted * budget / (check['total_mb'] * MB))
          check = step_memory(name, predicted, remat, args)
      record = {
        'model': name,
        'remat': remat,
        'scan': args.scan,
        'image_size': args.image_size,
        'dtype': args.dtype,
        'budget_gb': args.budget_gb,
        'fixed_mb': common.rounded(fixed / MB, 5),
        'per_image_mb': common.rounded(per_image / MB, 5),
        'largest_batch': predicted,
        'largest_batch_total_mb': check['total_mb'],
        'device_kind': jax.devices()[0].device_kind,
      }
      common.emit(
        record,
        f'{name} remat {remat}: {per_image / MB:.1f} MB/image + {fixed / MB:.0f} MB; largest '
        f'batch in {args.budget_gb:g} GB: {predicted} ({check["total_mb"]:.0f} MB, compiled)',
      )
    if 'none' in temps and 'full' in temps:
      ratio = temps['full'] / temps['none']
      common.emit(
        {
          'model': name,
          'scan': args.scan,
          'batch': batches[-1],
          'activation_ratio_full_vs_none': common.rounded(ratio, 3),
          'device_kind': jax.devices()[0].device_kind,
        },
        f'{name} b{batches[-1]}: remat full needs {ratio:.2f}x the temp memory of none',
      )


if __name__ == '__main__':
  main()
