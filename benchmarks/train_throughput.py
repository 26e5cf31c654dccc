r"""Training-step throughput and MFU of the Trainer's own step, one JSON line per model.

  python benchmarks/train_throughput.py --model ViT-B_16 --batch 8 --image_size 224
  python benchmarks/train_throughput.py --model ViT-B_16,ViT-L_16 --batch 256 --dtype bfloat16
  python benchmarks/train_throughput.py --model ViT-B_16 --batch 4 --patch_dropout 0.0,0.5

Keys: model, batch, image_size, dtype, images_per_s, step_ms (median of --rounds rounds after a
warm-up step), compile_s, model_flops_per_image (`vit_jax.metrics.model_flops`: dense layers,
convolutions and attention, forward + backward), device_kind, peak_flops (the devices' table peak;
on CPU the f32 matmul ceiling, timed round-robin with the steps in this process), ceiling_gflops
(CPU), mfu, mfu_vs_ceiling (CPU), peak_host_mem_mb, peak_device_mem_mb (accelerators), attention
(the implementation in the compiled program), plain_step_ms and trainer_vs_plain_jit (the same pure
step jitted directly, timed interleaved with the Trainer's), plus the options that were set.
`--patch_dropout R1,R2,...` builds each rate's Trainer in this process (`patch_dropout`; the FLOPs
and MFU count the patch tokens kept), then times their steps again round-robin:
`step_ms_interleaved` and `step_ratio_vs_first` (over the first rate's).
"""

from __future__ import annotations

import time

import _common as common  # Puts this tree's root on sys.path.
import jax
import numpy as np

from vit_jax import config as config_lib  # noqa: E402
from vit_jax import metrics, train  # noqa: E402


def run(args, name: str, patch_dropout: float = 0.0) -> dict:
  config = config_lib.base_config()
  config.model_name = name
  fields = dict(dtype=args.dtype, scan_layers=args.scan, remat_policy=args.remat)
  if patch_dropout:
    fields['patch_dropout'] = patch_dropout
  if args.attention_impl:
    fields['attention_impl'] = args.attention_impl
  config.model.update(fields)
  config.image_size = args.image_size
  config.batch_size = config.eval_batch_size = args.batch
  config.optimizer = args.optimizer
  config.mesh.update(common.parse_mesh(args.mesh))
  trainer = train.Trainer(config, num_classes=1000)
  state = trainer.init_state(0)
  rng = np.random.default_rng(0)
  size = args.image_size
  local = {
    'image': rng.uniform(-1, 1, (1, args.batch, size, size, 3)).astype(np.float32),
    'label': rng.integers(0, 1000, (1, args.batch)).astype(np.int32),
  }
  batch = trainer.global_batch(local, stacked=True)
  key = jax.random.key_data(jax.random.key(0))
  start = time.perf_counter()
  compiled, _ = trainer.compile(state, batch, key)
  compile_s = time.perf_counter() - start
  state, out = trainer.train_step(state, batch, key)  # Warm-up.
  jax.block_until_ready(out)

  def step():
    nonlocal state
    start = time.perf_counter()
    for _ in range(args.steps):
      state, out = trainer.train_step(state, batch, key)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / args.steps

  record = common.throughput_record(
    args,
    name,
    step,
    compiled=compiled,
    compile_s=compile_s,
    flops=metrics.model_flops(trainer.model, size),
    num_devices=trainer.mesh.size,
  )
  # The same pure step jitted directly, without the Trainer: what the Trainer (the model split
  # once into graph and state, shardings, donation) costs per step, interleaved with its step.
  plain = jax.jit(trainer.step_fn, donate_argnums=0)
  with trainer._context():
    plain = plain.lower(state, batch, key).compile()

  def plain_step():
    nonlocal state
    start = time.perf_counter()
    for _ in range(args.steps):
      state, out = plain(state, batch, key)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / args.steps

  times = common.interleaved({'trainer': step, 'plain': plain_step}, args.rounds)
  ratio = common.median(times['trainer']) / common.median(times['plain'])
  record.update(
    plain_step_ms=common.rounded(common.median(times['plain']) * 1e3),
    trainer_vs_plain_jit=common.rounded(ratio),
  )
  record = dict(
    record, devices=trainer.mesh.size, remat=args.remat, mesh=args.mesh, patch_dropout=patch_dropout
  )
  return record, step


def main():
  parser = common.throughput_parser(__doc__, 'steps per round')
  parser.add_argument('--remat', default='none', help="'none', 'full' or a checkpoint policy")
  parser.add_argument('--mesh', default='data=1', help="e.g. 'data=2,fsdp=4,tensor=1'")
  parser.add_argument('--optimizer', default='sgd', choices=['sgd', 'adamw'])
  parser.add_argument(
    '--patch_dropout', default='0.0', help='rate(s), comma-separated: e.g. 0.0,0.5 (training only)'
  )
  args = parser.parse_args()
  rates = [float(r) for r in args.patch_dropout.split(',')]
  for name in args.model.split(','):
    runs = {rate: run(args, name, rate) for rate in rates}
    if len(rates) > 1:  # The rates' steps again, interleaved round-robin: a shared machine's load
      # then weighs on every rate alike.
      times = common.interleaved({rate: step for rate, (_, step) in runs.items()}, args.rounds)
      first = common.median(times[rates[0]])
      for rate, (r, _) in runs.items():
        r['step_ms_interleaved'] = common.rounded(common.median(times[rate]) * 1e3)
        r['step_ratio_vs_first'] = common.rounded(common.median(times[rate]) / first)
    for rate, (r, _) in runs.items():
      ratio = r.get('step_ratio_vs_first', 1.0)
      _emit(name, rate, rates[0], ratio, r)


def _emit(name, rate, first_rate, ratio, r):
  common.emit(
    r,
    f'{name} train b{r["batch"]} {r["image_size"]}px {r["dtype"]} patch_dropout {rate}: '
    f'{r["step_ms"]:.1f} ms ({ratio:.3f}x of patch_dropout {first_rate}, interleaved), '
    f'{r["images_per_s"]:.1f} img/s, compile {r["compile_s"]:.1f}s, '
    f'{r["model_flops_per_image"] / 1e9:.2f} GFLOP/img, MFU {r["mfu"]:.1%} of '
    f'{r["peak_flops"] / 1e9:.0f} GFLOP/s ({r["device_kind"]}), attention {r["attention"]}; '
    f'Trainer step / plain jax.jit of it {r["trainer_vs_plain_jit"]:.3f}',
  )


if __name__ == '__main__':
  main()
