"""Helpers shared by the benchmarks: interleaved timing, the matmul ceiling, JSON output.

Every benchmark prints one JSON line per configuration on stdout and a readable line on stderr.
The machine's speed may drift (shared CPUs, frequency steps), so figures that are compared are
measured round-robin in one process and summarized by their median.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/x.py` from a fresh clone imports this tree's vit_jax.
  sys.path.insert(0, ROOT)


def timed(fn: Callable, *args, calls: int = 1) -> float:
  """Seconds per call of `calls` calls of `fn(*args)`, blocking on the result."""
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def matmul_ceiling_fn(n: int = 2048) -> tuple[Callable[[], float], float]:
  """(a function timing one n x n x n f32 matmul, its FLOPs): the CPU ceiling for MFU."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  return (lambda: timed(mm, a, b)), 2.0 * n**3


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """Calls each timing function once per round, round-robin; returns all times per name."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(fn())
  return times


def with_cpu_time(fn: Callable[[], float], cpu: list[float]) -> Callable[[], float]:
  """`fn` that also appends the process CPU time (all threads) of each call to `cpu`."""

  def call() -> float:
    start = time.process_time()
    seconds = fn()
    cpu.append(time.process_time() - start)
    return seconds

  return call


def median(xs: list[float]) -> float:
  return statistics.median(xs)


def peak_host_mem_mb() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mem_mb() -> float | None:
  """Peak memory in use on the first device (accelerators); None on CPU."""
  stats = jax.devices()[0].memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / 2**20


def attention_ran(compiled) -> str:
  """Which attention implementation a compiled program contains: 'cudnn' or 'xla'."""
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001 -- some backends cannot print the program.
    return 'unknown'
  return 'cudnn' if '__cudnn$fmha' in text else 'xla'


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}."""
  out = {}
  for part in filter(None, text.split(',')):
    key, _, value = part.partition('=')
    if key not in ('data', 'fsdp', 'tensor'):
      raise ValueError(f'unknown mesh axis {key!r} in --mesh={text!r}; use data, fsdp, tensor')
    out[key] = int(value)
  return out


def emit(record: dict, table: str) -> None:
  """One JSON line on stdout (the machine-readable result), one readable line on stderr."""
  print(json.dumps(record), flush=True)
  print(table, file=sys.stderr, flush=True)


def rounded(x: float | None, digits: int = 4) -> float | None:
  return None if x is None else float(f'{x:.{digits}g}')


def throughput_record(
  args, name: str, run_once, *, compiled, compile_s: float, flops: float, num_devices: int = 1
) -> dict:
  """Times `run_once()` (seconds per batch) interleaved with the matmul ceiling over `args.rounds`
  rounds and returns the record with the JSON keys every throughput benchmark prints.

  `flops` is the model's per-image count (`vit_jax.metrics.model_flops`); the peak is the table's
  per chip times `num_devices`, or on CPU the ceiling measured here.
  """  # fmt: skip
  from vit_jax import metrics  # After this tree's root is on sys.path.

  ceiling_fn, ceiling_flops = matmul_ceiling_fn(args.matmul_size)
  times = interleaved({'step': run_once, 'ceiling': ceiling_fn}, args.rounds)
  step_s = median(times['step'])
  ceiling = ceiling_flops / min(times['ceiling'])
  images_per_s = args.batch / step_s
  table_peak = metrics.device_peak_flops()
  on_cpu = table_peak is None
  peak = ceiling if on_cpu else table_peak * num_devices
  achieved = flops * images_per_s
  return {
    'model': name,
    'batch': args.batch,
    'image_size': args.image_size,
    'dtype': args.dtype,
    'images_per_s': rounded(images_per_s),
    'step_ms': rounded(step_s * 1e3),
    'compile_s': rounded(compile_s, 3),
    'model_flops_per_image': flops,
    'device_kind': jax.devices()[0].device_kind,
    'peak_flops': peak,
    'ceiling_gflops': rounded(ceiling / 1e9) if on_cpu else None,
    'mfu': rounded(achieved / peak),
    'mfu_vs_ceiling': rounded(achieved / ceiling) if on_cpu else None,
    'peak_host_mem_mb': rounded(peak_host_mem_mb()),
    'peak_device_mem_mb': rounded(peak_device_mem_mb()),
    'attention': attention_ran(compiled),
    'scan': args.scan,
    'rounds': args.rounds,
  }


def throughput_parser(doc: str, steps_help: str):
  """The flags every throughput benchmark takes; each adds its own."""
  import argparse

  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--model', default='ViT-Ti_16', help='one name, or several, comma-separated')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--scan', action='store_true')
  parser.add_argument('--attention_impl', default=None, choices=['xla', 'cudnn'])
  parser.add_argument('--rounds', type=int, default=5, help='timed rounds (>= 5), median')
  parser.add_argument('--steps', type=int, default=1, help=steps_help)
  parser.add_argument('--matmul_size', type=int, default=2048)
  return parser


def import_beside_ours(path: str, module: str):
  """Imports `module` from the tree at `path`, whose package is also named `vit_jax` (the original
  project, another revision of ours). Ours is set aside in `sys.modules` while it imports and put
  back after; the module returned keeps references to its own package's modules.
  """  # fmt: skip
  is_ours = lambda k: k == 'vit_jax' or k.startswith('vit_jax.')
  ours = {k: v for k, v in sys.modules.items() if is_ours(k)}
  for k in ours:
    del sys.modules[k]
  sys.path.insert(0, path)
  try:
    return importlib.import_module(module)
  finally:
    sys.path.remove(path)
    for k in [k for k in sys.modules if is_ours(k)]:
      del sys.modules[k]
    sys.modules.update(ours)


class Ours:
  """Our NNX model behind the `init(rng, images, train)` / `apply(variables, images, train)`
  protocol of the peers' Linen models, so one harness times all of them. `apply` is the model
  split once into graph and state (`models.functional`): the same pure function the Trainer jits.
  """

  def __init__(self, name: str, build: Callable | None = None, **overrides):
    """`build(image_size, rngs)`: the module (default: `models.get_model(name, 1000, ...)`)."""
    self.build = build
    self.name, self.overrides = name, overrides
    self._fn = {}

  def _model(self, image_size: int, rngs=None):
    from vit_jax import models

    if self.build is not None:
      return self.build(image_size, rngs)
    return models.get_model(self.name, 1000, image_size=image_size, rngs=rngs, **self.overrides)

  def abstract(self, image_size: int):
    """The model with shapes only (`nnx.eval_shape`), e.g. for `metrics.model_flops`."""
    from flax import nnx

    return nnx.eval_shape(lambda: self._model(image_size))

  def init(self, rng, images, train=False):
    from flax import nnx

    from vit_jax import models

    del train
    return {'params': models.params_of(self._model(images.shape[1], nnx.Rngs(rng)))}

  def prepare(self, image_size: int):
    """Builds the pure function for `image_size` now (the Trainer builds it once, before it jits
    its step), so that a timed lowering of the step traces only the step."""
    from vit_jax import models

    if image_size not in self._fn:
      self._fn[image_size] = models.functional(self.abstract(image_size))

  def apply(self, variables, images, train=False):
    size = images.shape[1]
    self.prepare(size)
    key = jax.random.key(0) if train else None
    return self._fn[size](variables['params'], images, train=train, rng=key)
