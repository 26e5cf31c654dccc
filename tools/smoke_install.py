"""A user's first minutes with an installed vit_jax: run by `make check-install` in each fresh venv.

  VENV/bin/python tools/smoke_install.py [--no-export-extra]

Runs from an empty temporary folder (so the installed package is used, not this checkout): writes a
tiny random 1000-class ViT as an original-format `.npz`, classifies two images with
`python -m vit_jax.predict` (readable ImageNet names expected), then exports it with
`python -m vit_jax.export` to every format, each verified by its own runtime. Every command's
stderr is checked against the library noise we silence (NOISE). Without the export extra, hf and
onnx must fail in one line (exit 2) and leave no output folder. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# What predict and export must not print: library chatter a user cannot act on.
NOISE = [
  r'oneDNN custom operations',
  r'cpu_feature_guard|This TensorFlow binary is optimized',
  r'absl::InitializeLog',
  r'Unable to initialize backend',
  r'failed call to cuInit',  # The tensorflow wheel's CUDA probe on a machine without a GPU.
  r'Compiled cluster using XLA',
  r'FutureWarning',
  r'DeprecationWarning',
  r'torchvision',
  r'\d+%\|',  # tqdm bars.
  r'Downloading and preparing dataset',
  r'Traceback \(most recent call last\)',
  r'RuntimeWarning: .* found in sys.modules',
]


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
  start = time.perf_counter()
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  proc = subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
  )
  print(
    f'  $ python {" ".join(args) if args[0] != "-c" else "-c ..."}  -> exit {proc.returncode} in '
    f'{time.perf_counter() - start:.0f}s'
  )
  return proc


def _noise(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if any(re.search(p, line) for p in NOISE)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--no-export-extra', action='store_true', help='hf and onnx must be refused')
  args = parser.parse_args()
  failures = []

  def check(ok: bool, what: str, proc=None):
    if not ok:
      detail = (
        f'\n    stdout: {proc.stdout[-2000:]}\n    stderr: {proc.stderr[-4000:]}' if proc else ''
      )
      failures.append(what)
      print(f'  FAIL: {what}{detail}')

  with tempfile.TemporaryDirectory(prefix='vit_jax_smoke_') as tmp:
    setup = (
      'import jax, numpy as np\n'
      'from PIL import Image\n'
      'from vit_jax import models, npz\n'
      "m = models.get_model('testing', num_classes=1000, image_size=32, "
      'representation_size=None, head_zero_init=False)\n'
      "npz.save(m, 'tiny.npz')\n"
      "os = __import__('os'); os.makedirs('photos', exist_ok=True)\n"
      'rng = np.random.RandomState(0)\n'
      "Image.fromarray(rng.randint(0, 255, (40, 50, 3), np.uint8)).save('photos/a.png')\n"
      "Image.fromarray(rng.randint(0, 255, (30, 30, 3), np.uint8)).save('photos/b.webp')\n"
      'import tensorflow as tf, flax, optax, orbax.checkpoint as ocp, vit_jax\n'
      "print('versions: jax', jax.__version__, 'flax', flax.__version__, 'tensorflow', "
      'tf.__version__, "vit_jax", vit_jax.__file__)\n'
    )
    proc = _run(['-c', setup], tmp)
    check(proc.returncode == 0, 'writing the tiny checkpoint', proc)
    print('  ' + proc.stdout.strip())
    check('site-packages' in proc.stdout, 'vit_jax imported from site-packages', proc)

    proc = _run(['-m', 'vit_jax.predict', '--checkpoint', 'tiny.npz', '--model', 'testing',
                 '--top_k', '2', 'photos'], tmp)  # fmt: skip
    check(proc.returncode == 0, 'predict', proc)
    names = [line.split('%', 1)[1].strip() for line in proc.stdout.splitlines() if '%' in line]
    check(len(names) == 4 and not any(re.fullmatch(r'n\d{8}', n) for n in names),
          f'predict prints readable ImageNet names (got {names})', proc)  # fmt: skip
    check(not _noise(proc.stderr), f'predict stderr is quiet: {_noise(proc.stderr)}', proc)

    for fmt in ('npz', 'saved_model', 'hf', 'onnx'):
      out = os.path.join(tmp, 'out', fmt)
      proc = _run(['-m', 'vit_jax.export', '--checkpoint', 'tiny.npz', '--model', 'testing',
                   '--format', fmt, '--out', out], tmp)  # fmt: skip
      for line in proc.stdout.splitlines():
        print(f'    {line}')
      if args.no_export_extra and fmt in ('hf', 'onnx'):
        lines = proc.stderr.strip().splitlines()
        check(proc.returncode == 2 and len(lines) == 1 and 'vit_jax[export]' in lines[0],
              f'{fmt} without the extra: one line naming the extra, exit 2', proc)  # fmt: skip
        check(not os.path.exists(out), f'{fmt} without the extra leaves no output folder')
        continue
      check(proc.returncode == 0 and proc.stdout.count(' ok') >= 2, f'export {fmt}', proc)
      check(not _noise(proc.stderr), f'export {fmt} stderr is quiet: {_noise(proc.stderr)}', proc)
      if proc.stderr.strip():
        print(f'    stderr: {proc.stderr.strip()}')
  print('smoke: ' + ('FAILED: ' + '; '.join(failures) if failures else 'ok'))
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
