r"""A/B of this tree's model against a git revision's, in one process: is a change faster?

  python benchmarks/ab_revision.py --rev HEAD --model ViT-B_16 --mode train --rounds 6

The revision's `vit_jax` package is extracted (`git archive`) into a temporary directory and
imported beside ours (the original project's trick in `peers.py`: the package is set aside in
`sys.modules` while the other one imports). Both models get `peers.py`'s wrapper (cross-entropy,
`value_and_grad`, SGD, parameters donated) and the same inputs. Each round times the two in
A B B A order (B A A B on odd rounds), so that a drift of the machine's speed within a round
cancels, and the round's ratio is the revision's time over ours (> 1: this tree is faster).
One JSON line with the median of the per-round ratios in process CPU time and in wall time, and
the per-round ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time

import _common as common  # Puts this tree's root on sys.path.
import jax
import peers
from flax import nnx

from vit_jax import models  # noqa: E402


def load_revision_vit(rev: str, workdir: str):
  """The `vit_jax.models.vit` module of git revision `rev`, imported from `workdir`."""
  archive = subprocess.run(
    ['git', '-C', common.ROOT, 'archive', '--format=tar', rev, 'vit_jax'],
    check=True,
    capture_output=True,
  ).stdout
  subprocess.run(['tar', '-x', '-C', workdir], input=archive, check=True)
  return common.import_beside_ours(workdir, 'vit_jax.models.vit')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rev', default='HEAD', help='the git revision to compare against')
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--mode', default='train', choices=['train', 'forward'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--rounds', type=int, default=10)
  args = parser.parse_args()

  ours = common.Ours(args.model, dropout_rate=0.0)
  with tempfile.TemporaryDirectory() as workdir:
    vit_rev = load_revision_vit(args.rev, workdir)
  _, fields = models.model_kwargs(args.model, 1000, dropout_rate=0.0)

  # An NNX revision's VisionTransformer with the same fields (Linen revisions predate the port).
  def build(size, rngs):
    model = vit_rev.VisionTransformer(**fields, image_size=size, rngs=rngs or nnx.Rngs(0))
    model.eval()
    return model

  theirs = common.Ours(args.model, build=build)
  s = args.image_size
  images = jax.random.uniform(jax.random.key(1), (args.batch, s, s, 3), minval=-1)
  labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000)
  calls = {}
  for key, model in (('rev', theirs), ('tree', ours)):
    apply = lambda m, v, x, t: m.apply(v, x, train=t)
    calls[key], _ = peers.compiled_call(model, apply, args.mode, images, labels)
    jax.block_until_ready(calls[key]())  # Warm-up.

  cpu_ratios, wall_ratios = [], []
  for r in range(args.rounds):
    cpu, wall = {'rev': 0.0, 'tree': 0.0}, {'rev': 0.0, 'tree': 0.0}
    for key in ('rev', 'tree', 'tree', 'rev') if r % 2 == 0 else ('tree', 'rev', 'rev', 'tree'):
      start_cpu, start = time.process_time(), time.perf_counter()
      jax.block_until_ready(calls[key]())
      cpu[key] += time.process_time() - start_cpu
      wall[key] += time.perf_counter() - start
    cpu_ratios.append(cpu['rev'] / cpu['tree'])
    wall_ratios.append(wall['rev'] / wall['tree'])
  record = {
    'model': args.model,
    'mode': args.mode,
    'batch': args.batch,
    'image_size': s,
    'rev': args.rev,
    'tree_vs_rev_cpu': common.rounded(common.median(cpu_ratios), 4),
    'tree_vs_rev_wall': common.rounded(common.median(wall_ratios), 4),
    'rounds': args.rounds,
    'per_round_cpu': [round(x, 3) for x in cpu_ratios],
    'per_round_wall': [round(x, 3) for x in wall_ratios],
    'device_kind': jax.devices()[0].device_kind,
  }
  common.emit(
    record,
    f'{args.model} {args.mode}: this tree vs {args.rev}: CPU time {record["tree_vs_rev_cpu"]:.3f}x,'
    f' wall {record["tree_vs_rev_wall"]:.3f}x (median of {args.rounds} A B B A rounds)',
  )


if __name__ == '__main__':
  main()
