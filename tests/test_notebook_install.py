"""The notebook's install cell in a Colab-like runtime: only missing packages are installed, and the
runtime's jax (with its CUDA plugin), tensorflow and torch are pinned, never replaced."""

import json
import pathlib
import subprocess
import types

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'vit_jax.ipynb'


def _cells():
  return [''.join(c['source']) for c in json.loads(NOTEBOOK.read_text())['cells']]


def test_repository_url_is_one_constant_in_the_first_code_cell():
  nb = json.loads(NOTEBOOK.read_text())
  code = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']
  assert "REPO_URL = 'https://github.com/" in code[0] and len(code[0].splitlines()) == 2
  assert sum('REPO_URL =' in c for c in code) == 1 and 'github.com' not in ''.join(code[1:])


def test_install_cell_keeps_the_runtimes_builds(monkeypatch, tmp_path):
  cell = next(c for c in _cells() if 'def install_vit_jax' in c)
  definitions = cell.split('\nif importlib.util.find_spec')[0]  # Functions only; nothing runs.
  namespace = {'REPO_URL': 'https://example.invalid/vit_jax'}
  exec(compile(definitions, 'install cell', 'exec'), namespace)
  colab = {  # A runtime with accelerator builds, some too old for our bounds, some missing.
    'jax': '0.7.2', 'jaxlib': '0.7.2', 'jax-cuda12-plugin': '0.7.2', 'tensorflow': '2.19.0',
    'torch': '2.8.0+cu126', 'triton': '3.4.0', 'numpy': '2.0.2', 'pillow': '11.3.0',
    'flax': '0.10.7',
  }  # fmt: skip
  requires = [
    'jax>=0.7.1', 'flax>=0.12.0', 'tensorflow>=2.20.0', 'numpy>=1.26', 'pillow>=10.0',
    'optax>=0.2.5', 'torch>=2.6; extra == "export"', 'onnx>=1.17; extra == "export"',
    'pytest>=8.0; extra == "test"',
  ]  # fmt: skip
  metadata = types.SimpleNamespace(
    version=lambda name: colab[name] if name in colab else (_ for _ in ()).throw(missing(name)),
    requires=lambda name: requires,
    PackageNotFoundError=namespace['importlib'].metadata.PackageNotFoundError,
  )
  missing = metadata.PackageNotFoundError
  monkeypatch.setattr(namespace['importlib'], 'metadata', metadata)
  calls = []
  monkeypatch.setattr(subprocess, 'run', lambda cmd, **kw: calls.append(cmd))
  namespace['install_vit_jax']()
  assert calls[0][-2:] == ['--no-deps', 'vit_jax @ git+https://example.invalid/vit_jax']
  command = calls[1]
  constraints = pathlib.Path(command[command.index('-c') + 1]).read_text().split()
  assert constraints == [
    'jax==0.7.2', 'jaxlib==0.7.2', 'jax-cuda12-plugin==0.7.2', 'tensorflow==2.19.0',
    'torch==2.8.0+cu126', 'triton==3.4.0',
  ]  # fmt: skip
  # Missing or too old, and not a runtime build: installed. Kept: jax, tensorflow, torch.
  assert command[command.index('-c') + 2 :] == ['flax>=0.12.0', 'optax>=0.2.5', 'onnx>=1.17']
