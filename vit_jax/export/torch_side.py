"""The PyTorch side of the hf and onnx exports: a child process that never imports TensorFlow.

Why a child process: TensorFlow's `libtensorflow_framework.so.2` exports the symbols of the LLVM it
was built with, and `triton` (installed with the index's default, CUDA, torch) loads another LLVM
whose static initializers then bind to TensorFlow's copy (`llvm::DebugCounter::instance()`) and
corrupt the heap: `import tensorflow; import triton` dies with SIGSEGV, and `torch.onnx`,
`transformers` and `torch._dynamo` import triton. The parent (which has TensorFlow loaded for the
data and preprocessing code) never imports torch; this module's `main` never imports TensorFlow.

Protocol: the parent writes `request.json` (format, output folder, model config, image size,
labels, batch sizes) and `arrays.npz` (released-layout params as 'a/b/c' keys, `images`) to a
temporary folder and runs `torch_side.main(FOLDER)` in a new interpreter. The child writes the
artifact, reloads it with its own runtime, and writes `result.json` (path, seconds) and
`logits.npz`; a user error (a model the format cannot represent, a missing runtime) goes to
`result.json` as `{"error": type, "message": ...}` with exit status 2.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import flax
import numpy as np
from flax import traverse_util

FORMATS = ('hf', 'onnx')
# `python -m` would import this module twice (as part of the package, then as __main__).
_CHILD = 'import sys; from vit_jax.export import torch_side; sys.exit(torch_side.main(sys.argv[1]))'


def run(loaded, fmt: str, out_dir: str, images: np.ndarray, batches) -> tuple[str, float, dict]:
  """Exports `loaded` as `fmt` into `out_dir` in a child process; returns (path, seconds, logits).

  `logits` maps each batch size to the reloaded artifact's logits on `images[:batch]`.

  Raises:
    ValueError, ImportError: the child's user error (a model the format cannot represent, a
      missing runtime), with its message.
    RuntimeError: the child died (its last lines of stderr in the message).
  """
  with tempfile.TemporaryDirectory(prefix='vit_jax_torch_') as tmp:
    request = {
      'format': fmt,
      'out_dir': os.path.abspath(out_dir),
      'model_config': loaded.model_config,
      'num_classes': loaded.num_classes,
      'image_size': loaded.image_size,
      'labels': loaded.labels,
      'batches': [int(b) for b in batches],
    }
    with open(os.path.join(tmp, 'request.json'), 'w') as f:
      json.dump(request, f, default=str)
    flat = traverse_util.flatten_dict(flax.core.unfreeze(loaded.params), sep='/')
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    np.savez(os.path.join(tmp, 'arrays.npz'), images=images, **flat)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
    proc = subprocess.run(
      [sys.executable, '-c', _CHILD, tmp], env=env, capture_output=True, text=True
    )
    result_path = os.path.join(tmp, 'result.json')
    result = None
    if os.path.exists(result_path):
      with open(result_path) as f:
        result = json.load(f)
    if result and 'error' in result:
      error = {'ImportError': ImportError}.get(result['error'], ValueError)
      raise error(result['message'])
    if proc.returncode != 0 or result is None:
      tail = '\n'.join(proc.stderr.strip().splitlines()[-20:])
      raise RuntimeError(
        f'the {fmt} export process failed (exit status {proc.returncode}):\n{tail}'
      )
    if proc.stderr.strip():  # Real warnings of the torch side (its known noise is silenced there).
      print(proc.stderr.rstrip(), file=sys.stderr)
    with np.load(os.path.join(tmp, 'logits.npz')) as archive:
      logits = {int(k): archive[k] for k in archive.files}
    return result['path'], result['seconds'], logits


def _quiet_torch() -> None:
  """Silences what torch.onnx and transformers print that is not ours to act on."""
  import logging
  import warnings

  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
  os.environ.setdefault('TQDM_DISABLE', '1')
  warnings.filterwarnings('ignore', category=FutureWarning)
  warnings.filterwarnings('ignore', category=DeprecationWarning)
  warnings.filterwarnings('ignore', module=r'torchvision(\.|$)')
  warnings.filterwarnings('ignore', message=r'.*torch\.onnx.*')
  try:  # torch configures its loggers when imported: set their levels after that.
    import torch  # noqa: F401
  except ImportError:
    return
  for name in ('torch.onnx', 'torch.export', 'torch._dynamo', 'onnxscript', 'transformers'):
    logging.getLogger(name).setLevel(logging.ERROR)


def main(folder: str) -> int:
  _quiet_torch()
  with open(os.path.join(folder, 'request.json')) as f:
    request = json.load(f)
  with np.load(os.path.join(folder, 'arrays.npz')) as archive:
    arrays = {k: archive[k] for k in archive.files}
  images = arrays.pop('images')
  loaded = types.SimpleNamespace(
    params=traverse_util.unflatten_dict(arrays, sep='/'),
    model_config=request['model_config'],
    num_classes=request['num_classes'],
    image_size=request['image_size'],
    labels=request['labels'],
  )
  result_path = os.path.join(folder, 'result.json')
  try:
    module = importlib.import_module(f'vit_jax.export.{request["format"]}')
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx prints its progress.
      path = module.save(loaded, request['out_dir'])
    seconds = time.perf_counter() - start
    logits = {
      str(b): np.asarray(module.run(path, images[:b], labels=loaded.labels))
      for b in request['batches']
    }
  except (ValueError, ImportError) as e:
    message = str(e)
    if isinstance(e, ImportError):
      message = (
        f'{request["format"]} export needs the export extra: pip install "vit_jax[export]" ({e})'
      )
    with open(result_path, 'w') as f:
      json.dump({'error': type(e).__name__, 'message': message}, f)
    return 2
  assert 'tensorflow' not in sys.modules, 'the torch side must not load TensorFlow (see above)'
  np.savez(os.path.join(folder, 'logits.npz'), **logits)
  with open(result_path, 'w') as f:
    json.dump({'path': path, 'seconds': seconds}, f)
  return 0
