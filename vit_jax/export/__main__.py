"""Export a checkpoint and verify it in the target runtime.

  python -m vit_jax.export --checkpoint ViT-B_16.npz --model ViT-B_16 --format onnx --out out/
  python -m vit_jax.export --checkpoint workdirs/quickstart --format hf --out out/hf

`--checkpoint` is an original-format `.npz` (local or gs://; `--model` names its variant) or a
training workdir (latest checkpoint, or `--step`; model, image size, preprocessing and labels come
from its config.json). Exit status 1 when the exported logits differ from ours by more than the
tolerance, 2 and one line on stderr for a user error (an unknown model, a missing or mismatched
checkpoint, a model the format cannot represent, a missing runtime, an output folder that cannot be
written; `--verbose` adds the traceback). Nothing is left in `--out` when it fails.
"""

from __future__ import annotations

import argparse
import sys

from vit_jax import cli, export
from vit_jax.export import load


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  cli.quiet()
  parser = argparse.ArgumentParser(
    prog='python -m vit_jax.export', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--checkpoint', required=True, help='.npz (local or gs://) or a workdir')
  parser.add_argument('--format', required=True, choices=export.FORMATS)
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--model', default=None, help='registered model name (for an .npz)')
  parser.add_argument('--step', type=int, default=None, help="workdir's step (default: latest)")
  parser.add_argument('--image_size', type=int, default=None, help='default: from the checkpoint')
  parser.add_argument('--labels', default=None, help='TFDS dataset name or labels text file')
  cli.add_weights(parser)
  parser.add_argument('--tolerance', type=float, default=export.TOLERANCE)
  parser.add_argument(
    '--batch_size', type=int, default=None, help='saved_model: a fixed batch size (for TFLite)'
  )
  cli.add_verbose(parser)
  args = parser.parse_args(argv)
  cli.check_model_name(args.model)
  export.check_output(args.out)  # Before the minutes of loading and converting.
  loaded = load.load_from_args(args)
  report = export.export(
    loaded, args.format, args.out, tolerance=args.tolerance, batch_size=args.batch_size
  )
  print('\n'.join(report.lines()))
  if not report.ok:
    print(f'error: {args.format} export differs from vit_jax beyond the tolerance', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
