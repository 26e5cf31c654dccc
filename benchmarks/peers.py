r"""Our ViT beside big_vision's and the original project's, in one process, same step wrapper.

  python benchmarks/peers.py --big_vision /path/to/big_vision \
      --vision_transformer /path/to/vision_transformer --model ViT-Ti_16,ViT-B_16 --batch 8

Neither peer is on PyPI: their source checkouts are imported from the directories given (never
copied). big_vision's `big_vision/models/vit.py` is built with token pooling and learned position
embeddings; the original project's `vit_jax/models_vit.py` (its package is also named `vit_jax`,
so it is imported under that name while ours is set aside, then ours is put back). A peer whose
directory is absent or fails to import is skipped with a message.

All models get the same wrapper: softmax cross-entropy of the logits, `jax.value_and_grad`, a
plain SGD update, jitted with the parameters donated; 'forward' is the jitted `apply` with
train=False. Dropout is 0 everywhere. Each round times every model once, round-robin, with the f32
matmul ceiling; the median per model is reported. One JSON line per model and mode, with
`ours_vs_best_peer` = the fastest peer's step time / ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import _common as common  # Puts this tree's root on sys.path.
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import metrics  # noqa: E402
from vit_jax.models.registry import VIT_SIZES  # noqa: E402


def load_big_vision(path: str | None):
  if not path or not os.path.isdir(os.path.join(path, 'big_vision')):
    print(f'big_vision: no checkout at {path!r}; skipped', file=sys.stderr)
    return None
  sys.path.insert(0, path)
  try:
    return importlib.import_module('big_vision.models.vit')
  except ImportError as e:
    print(f'big_vision: import failed ({e}); skipped', file=sys.stderr)
    return None
  finally:
    sys.path.remove(path)


def load_original(path: str | None):
  """The original project's models_vit, imported as its own `vit_jax` beside ours."""
  if not path or not os.path.isfile(os.path.join(path, 'vit_jax', 'models_vit.py')):
    print(f'vision_transformer: no checkout at {path!r}; skipped', file=sys.stderr)
    return None
  try:
    return common.import_beside_ours(path, 'vit_jax.models_vit')
  except ImportError as e:
    print(f'vision_transformer: import failed ({e}); skipped', file=sys.stderr)
    return None


def build(name: str, bv, orig, dtype):
  """{impl: (init_fn, apply_fn(params, images, train) -> logits)} for one variant name."""
  size, patch = name.removeprefix('ViT-').split('_')
  width, mlp, heads, depth = VIT_SIZES[size]
  p = int(patch)
  out = {}
  ours = common.Ours(name, dtype=dtype, dropout_rate=0.0)
  out['ours'] = (ours, lambda m, v, x, t: m.apply(v, x, train=t))
  if bv is not None:
    model = bv.Model(
      num_classes=1000, variant=f'{size}/{patch}', pool_type='tok', posemb='learn',
      dtype_mm=jnp.dtype(dtype).name,
    )  # fmt: skip
    out['big_vision'] = (model, lambda m, v, x, t: m.apply(v, x, train=t)[0])
  if orig is not None:
    model = orig.VisionTransformer(
      num_classes=1000,
      patches=ml_collections.ConfigDict({'size': (p, p)}),
      transformer={
        'mlp_dim': mlp,
        'num_heads': heads,
        'num_layers': depth,
        'dropout_rate': 0.0,
        'attention_dropout_rate': 0.0,
      },
      hidden_size=width,
      classifier='token',
    )
    out['original'] = (model, lambda m, v, x, t: m.apply(v, x, train=t))
  return out


def make_steps(model, apply):
  def loss_fn(params, images, labels):
    logits = apply(model, {'params': params}, images, True).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  def train_step(params, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), loss

  forward = lambda params, images: apply(model, {'params': params}, images, False)
  return jax.jit(train_step, donate_argnums=0), jax.jit(forward)


def compiled_call(model, apply, mode: str, images, labels):
  """(call, compiled): one `mode` ('train' or 'forward') step of `model` on fixed inputs, compiled
  ahead of time on freshly initialized parameters; training updates them between calls.
  """  # fmt: skip
  params = jax.jit(lambda r: model.init(r, images[:1], train=False)['params'])(jax.random.key(0))
  train_step, forward = make_steps(model, apply)
  if mode == 'train':
    compiled, box = train_step.lower(params, images, labels).compile(), [params]

    def call():
      box[0], loss = compiled(box[0], images, labels)
      return loss

    return call, compiled
  compiled = forward.lower(params, images).compile()
  return (lambda: compiled(params, images)), compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--big_vision', default=None, help='a big_vision checkout (its root)')
  parser.add_argument('--vision_transformer', default=None, help='the original project checkout')
  parser.add_argument('--model', default='ViT-Ti_16,ViT-B_16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--modes', default='train,forward')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--calls', type=int, default=1, help='calls per model per round')
  parser.add_argument('--matmul_size', type=int, default=2048)
  parser.add_argument('--dump_hlo', default=None, help='write each optimized program here')
  args = parser.parse_args()

  bv = load_big_vision(args.big_vision)
  orig = load_original(args.vision_transformer)
  if bv is None and orig is None:
    print('no peer could be imported: nothing to compare', file=sys.stderr)
    sys.exit(0)
  s = args.image_size
  images = jax.random.uniform(jax.random.key(1), (args.batch, s, s, 3), minval=-1)
  labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000)
  ceiling_fn, ceiling_flops = common.matmul_ceiling_fn(args.matmul_size)
  for name in args.model.split(','):
    impls = build(name, bv, orig, args.dtype)
    for mode in args.modes.split(','):
      timers = {'ceiling': ceiling_fn}
      for impl, (model, apply) in impls.items():
        call, compiled = compiled_call(model, apply, mode, images, labels)
        if args.dump_hlo:
          os.makedirs(args.dump_hlo, exist_ok=True)
          path = os.path.join(args.dump_hlo, f'{name}-{mode}-{impl}.hlo.txt')
          with open(path, 'w') as f:
            f.write(compiled.as_text())
        timer = lambda c=call: common.timed(c, calls=args.calls)
        timer()  # Warm-up.
        timers[impl] = timer
      cpu = {k: [] for k in timers}  # Process CPU time per call: less hit by other jobs.
      times = common.interleaved(
        {k: common.with_cpu_time(f, cpu[k]) for k, f in timers.items()}, args.rounds
      )
      med = {k: common.median(v) for k, v in times.items()}
      med_cpu = {k: common.median(v) for k, v in cpu.items()}
      peers = {k: v for k, v in med.items() if k not in ('ours', 'ceiling')}
      best = min(peers, key=peers.get)
      flops = metrics.model_flops(impls['ours'][0].abstract(s), s, train=mode == 'train')
      ceiling = ceiling_flops / min(times['ceiling'])
      record = {
        'model': name,
        'mode': mode,
        'batch': args.batch,
        'image_size': s,
        'dtype': args.dtype,
        **{f'{k}_ms': common.rounded(v * 1e3) for k, v in med.items() if k != 'ceiling'},
        'best_peer': best,
        'ours_vs_best_peer': common.rounded(peers[best] / med['ours']),
        **{f'{k}_cpu_ms': common.rounded(v * 1e3) for k, v in med_cpu.items() if k != 'ceiling'},
        'ours_vs_best_peer_cpu': common.rounded(
          min(v for k, v in med_cpu.items() if k in peers) / med_cpu['ours']
        ),
        'ours_mfu_vs_ceiling': common.rounded(flops * args.batch / med['ours'] / ceiling),
        'ceiling_gflops': common.rounded(ceiling / 1e9),
        'device_kind': jax.devices()[0].device_kind,
        'rounds': args.rounds,
        'per_round_ms': {
          k: [round(t * 1e3, 1) for t in v] for k, v in times.items() if k != 'ceiling'
        },
        'per_round_cpu_ms': {
          k: [round(t * 1e3, 1) for t in v] for k, v in cpu.items() if k != 'ceiling'
        },
      }
      common.emit(
        record,
        f'{name} {mode} b{args.batch}: ours {med["ours"] * 1e3:.1f} ms; '
        + '; '.join(f'{k} {v * 1e3:.1f} ms' for k, v in peers.items())
        + f'; ours/best peer ({best}) {record["ours_vs_best_peer"]:.3f}x'
        + f' (CPU time {record["ours_vs_best_peer_cpu"]:.3f}x)',
      )


if __name__ == '__main__':
  main()
