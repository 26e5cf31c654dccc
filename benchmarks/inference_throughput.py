r"""Forward-pass (inference) throughput and MFU, one JSON line per model.

  python benchmarks/inference_throughput.py --model ViT-Ti_16,ViT-B_16 --batch 8 --image_size 224
  python benchmarks/inference_throughput.py --model ViT-B_16 --batch 512 --dtype bfloat16  # GPU

The keys of `train_throughput.py`, for `model.apply(..., train=False)` jitted on one device:
step_ms is one forward of the batch (median of --rounds rounds after a warm-up), and
model_flops_per_image the forward's (`vit_jax.metrics.model_flops(..., train=False)`).
"""

from __future__ import annotations

import time

import _common as common  # Puts this tree's root on sys.path.
import jax

from vit_jax import metrics, models  # noqa: E402


def run(args, name: str) -> dict:
  fields = {'dtype': args.dtype}
  if args.attention_impl:
    fields['attention_impl'] = args.attention_impl
  if models.model_family(name) != 'mixer':
    fields.update(scan_layers=args.scan)
  size = args.image_size
  model = models.get_model(name, 1000, image_size=size, **fields)
  params = models.params_of(model)
  images = jax.random.uniform(jax.random.key(1), (args.batch, size, size, 3), minval=-1)
  forward = jax.jit(models.functional(model))
  start = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, images))  # Warm-up.
  return common.throughput_record(
    args,
    name,
    lambda: common.timed(compiled, params, images, calls=args.steps),
    compiled=compiled,
    compile_s=compile_s,
    flops=metrics.model_flops(model, size, train=False),
  )


def main():
  parser = common.throughput_parser(__doc__, 'forward passes per round')
  args = parser.parse_args()
  for name in args.model.split(','):
    r = run(args, name)
    common.emit(
      r,
      f'{name} forward b{r["batch"]} {r["image_size"]}px {r["dtype"]}: {r["step_ms"]:.1f} ms, '
      f'{r["images_per_s"]:.1f} img/s, {r["model_flops_per_image"] / 1e9:.2f} GFLOP/img, '
      f'MFU {r["mfu"]:.1%} of {r["peak_flops"] / 1e9:.0f} GFLOP/s ({r["device_kind"]}), '
      f'attention {r["attention"]}',
    )


if __name__ == '__main__':
  main()
