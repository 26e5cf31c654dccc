r"""Lower + compile time of a ViT train step, scanned vs unscanned, ours (and big_vision's).

  python benchmarks/compile_time.py --model ViT-B_16,ViT-L_16,ViT-H_14,ViT-g_14
  python benchmarks/compile_time.py --model ViT-H_14 --big_vision /path/to/big_vision --rounds 3

Nothing is allocated: parameters are `jax.eval_shape`d and the step is lowered and compiled ahead
of time for abstract inputs. The step is the wrapper of `peers.py` (cross-entropy,
`value_and_grad`, SGD). Scanned models are rematerialized per block as big_vision's always are
(`nothing_saveable`, our 'full'); unscanned ones are not. Every configuration is compiled once per
round, round-robin, and the median is reported. One JSON line per model, implementation and layout:
model, impl, scan, batch, image_size, dtype, lower_s, compile_s, total_s, device_kind; and per model
and implementation a line with `scan_speedup` (unscanned total / scanned total).

`--kernels` compiles each configuration once more (untimed) with XLA's dump on and adds `kernels`
and `kernel_ir_kb` to its line: on CPU, the number of distinct LLVM kernels XLA compiled (fusions
with the same computation and shapes share one) and the size of their optimized IR. Unlike the
times, these counts do not depend on the machine's load, and they say where compile time goes:
every kernel costs LLVM time, so a block whose shapes differ from the others' (the class-token
head's last block) adds all of its kernels once.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import _common as common  # Puts this tree's root on sys.path.
import jax
import jax.numpy as jnp
import peers


def abstract_step(model, apply, batch: int, size: int):
  """(jitted step, abstract params, abstract images, abstract labels)."""
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)['params']
  )
  if hasattr(model, 'prepare'):  # Ours: the model's pure function, built before the step.
    model.prepare(size)
  train_step, _ = peers.make_steps(model, apply)
  return train_step, params, images, labels


def build(name: str, impl: str, scan: bool, bv, dtype: str, remat: str):
  if impl == 'ours':
    model = common.Ours(
      name,
      dtype=dtype,
      dropout_rate=0.0,
      scan_layers=scan,
      remat_policy=remat if scan else 'none',
    )
    return model, lambda m, v, x, t: m.apply(v, x, train=t)
  size, patch = name.removeprefix('ViT-').split('_')
  model = bv.Model(
    num_classes=1000,
    variant=f'{size}/{patch}',
    pool_type='tok',
    posemb='learn',
    scan=scan,
    dtype_mm=jnp.dtype(dtype).name,
  )
  return model, lambda m, v, x, t: m.apply(v, x, train=t)[0]


def timed_compile(step, *args) -> tuple[float, float]:
  start = time.perf_counter()
  lowered = step.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  return lower_s, time.perf_counter() - start


def kernel_count(step, *args) -> tuple[int | None, int | None]:
  """(distinct CPU kernels, their optimized LLVM IR in KB) of one compile of `step`, counted in
  XLA's dump; (None, None) where the backend dumps no LLVM IR (accelerators).
  """  # fmt: skip
  with tempfile.TemporaryDirectory() as dump:
    step.lower(*args).compile(compiler_options={'xla_dump_to': dump})
    files = glob.glob(os.path.join(dump, '*train_step*.ir-with-opt.ll'))
    if not files:
      return None, None
    return len(files), sum(os.path.getsize(f) for f in files) // 1000


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-B_16,ViT-L_16,ViT-H_14,ViT-g_14')
  parser.add_argument('--big_vision', default=None, help='a big_vision checkout, to compare')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--remat', default='full', help='our policy for scanned models')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--kernels', action='store_true', help='count the compiled CPU kernels')
  args = parser.parse_args()
  bv = peers.load_big_vision(args.big_vision) if args.big_vision else None
  impls = ['ours'] + (['big_vision'] if bv is not None else [])
  for name in args.model.split(','):
    keys = [(impl, scan) for impl in impls for scan in (True, False)]
    times = {key: [] for key in keys}
    for _ in range(args.rounds):
      for impl, scan in keys:
        # A fresh model and jitted step each round: JAX caches the trace and the executable of a
        # jitted function, so a second lowering of the same one would time the cache.
        model, apply = build(name, impl, scan, bv, args.dtype, args.remat)
        step_args = abstract_step(model, apply, args.batch, args.image_size)
        times[(impl, scan)].append(timed_compile(*step_args))
    totals = {}
    for (impl, scan), runs in times.items():
      lower_s = common.median([r[0] for r in runs])
      compile_s = common.median([r[1] for r in runs])
      totals[(impl, scan)] = common.median([sum(r) for r in runs])
      record = {
        'model': name,
        'impl': impl,
        'scan': scan,
        'remat': args.remat
        if scan and impl == 'ours'
        else ('nothing_saveable' if scan else 'none'),
        'batch': args.batch,
        'image_size': args.image_size,
        'dtype': args.dtype,
        'lower_s': common.rounded(lower_s, 3),
        'compile_s': common.rounded(compile_s, 3),
        'total_s': common.rounded(totals[(impl, scan)], 3),
        'device_kind': jax.devices()[0].device_kind,
        'rounds': args.rounds,
        'per_round_total_s': [round(sum(r), 2) for r in runs],
      }
      counted = ''
      if args.kernels:
        model, apply = build(name, impl, scan, bv, args.dtype, args.remat)
        record['kernels'], record['kernel_ir_kb'] = kernel_count(
          *abstract_step(model, apply, args.batch, args.image_size)
        )
        counted = f' ({record["kernels"]} kernels, {record["kernel_ir_kb"]} KB IR)'
      common.emit(
        record,
        f'{name} {impl:10s} {"scanned  " if scan else "unscanned"}: lower {lower_s:.2f}s + '
        f'compile {compile_s:.2f}s = {totals[(impl, scan)]:.2f}s{counted}',
      )
    for impl in impls:
      speedup = totals[(impl, False)] / totals[(impl, True)]
      record = {
        'model': name,
        'impl': impl,
        'scan_speedup': common.rounded(speedup, 3),
        'device_kind': jax.devices()[0].device_kind,
      }
      if impl == 'ours' and bv is not None:
        record['ours_vs_big_vision_scanned'] = common.rounded(
          totals[('big_vision', True)] / totals[('ours', True)], 3
        )
        record['ours_vs_big_vision_unscanned'] = common.rounded(
          totals[('big_vision', False)] / totals[('ours', False)], 3
        )
      common.emit(record, f'{name} {impl}: scanned compiles {speedup:.2f}x faster than unscanned')


if __name__ == '__main__':
  main()
