"""What `pip install .` puts in site-packages: every package of the tree and its data files.

`make check-install` installs for real (minutes); this is the fast guard that a new subpackage or
data file is declared in pyproject.toml (a missing `vit_jax.labels` broke predict and export for
every pip-installed user while the editable install used by the tests hid it).
"""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)['tool']['setuptools']


def test_every_package_of_the_tree_is_declared():
  found = {
    '.'.join(path.parent.relative_to(ROOT).parts)
    for path in (ROOT / 'vit_jax').rglob('__init__.py')
    if '__pycache__' not in path.parts
  }
  found.add('vit_jax.configs')  # configs/ at the root, installed under vit_jax.
  assert set(_setuptools()['packages']) == found


def test_every_data_file_a_package_reads_is_declared():
  data = _setuptools()['package-data']
  for package in _setuptools()['packages']:
    directory = ROOT / ('configs' if package == 'vit_jax.configs' else package.replace('.', '/'))
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix not in ('.py', '.pyc')]
    for path in files:
      patterns = data.get(package, [])
      assert any(path.match(p) for p in patterns), f'{path} is not in package-data of {package}'
