"""Executes notebooks end to end with nbclient and writes the executed copies (`make notebook`).

  python notebooks/execute.py notebooks/*.ipynb --out build/notebooks

Each notebook runs in a fresh kernel whose working directory is an empty temporary folder (so a
notebook that assumes this repository's paths fails here as it would in Colab), with
`VIT_JAX_NOTEBOOK_SMALL=1` unless set: the notebooks' tiny, offline settings. Exit status 1 when a
cell fails; the executed copy, with the error, is written all the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('notebooks', nargs='+')
  parser.add_argument('--out', default='build/notebooks', help='folder for the executed copies')
  parser.add_argument('--timeout', type=int, default=900, help='seconds per cell')
  args = parser.parse_args(argv)
  os.environ.setdefault('VIT_JAX_NOTEBOOK_SMALL', '1')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.makedirs(args.out, exist_ok=True)
  status = 0
  for path in args.notebooks:
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
      client = NotebookClient(
        notebook, timeout=args.timeout, kernel_name='python3', resources={'metadata': {'path': cwd}}
      )
      try:
        client.execute()
        verdict = 'ok'
      except CellExecutionError as e:
        verdict, status = f'FAILED\n{e}', 1
    out = os.path.join(args.out, os.path.basename(path))
    nbformat.write(notebook, out)
    print(f'{path}: {verdict} in {time.perf_counter() - start:.0f}s, executed copy: {out}')
  return status


if __name__ == '__main__':
  sys.exit(main())
