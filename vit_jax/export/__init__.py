"""Export a checkpoint (`.npz` or training workdir) to npz, Hugging Face, TF SavedModel or ONNX.

  python -m vit_jax.export --checkpoint PATH --format npz|hf|saved_model|onnx --out DIR

Each export is verified right after writing: the artifact is loaded by its own runtime and its
logits are compared with ours on a fixed batch, at batch sizes 1 and 4 (`verify`). The format
modules import their dependencies (the `export` extra) only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from vit_jax import models, npz
from vit_jax.export import torch_side

FORMATS = ('npz', 'hf', 'saved_model', 'onnx')
TOLERANCE = 1e-4  # Max |logit difference| in float32.
BATCH_SIZES = (1, 4)
_HINT = 'pip install "vit_jax[export]"'


class VerificationError(RuntimeError):
  """An exported artifact's outputs differ from ours by more than the tolerance."""


@dataclasses.dataclass
class Report:
  format: str
  path: str
  runtime: str
  seconds: float  # Writing the artifact, verification excluded.
  max_diff: dict[str, float]  # 'batch 1', 'batch 4' (, 'image bytes, batch 4') -> max |diff|.
  tolerance: float

  @property
  def ok(self) -> bool:
    return max(self.max_diff.values()) <= self.tolerance

  def lines(self) -> list[str]:
    out = [f'{self.format}: wrote {self.path} in {self.seconds:.1f}s']
    for case, diff in self.max_diff.items():
      verdict = 'ok' if diff <= self.tolerance else 'OVER TOLERANCE'
      out.append(
        f'{self.format}: {self.runtime} vs vit_jax, {case}: max |logit diff| {diff:.3g} '
        f'(tolerance {self.tolerance:g}) {verdict}'
      )
    return out


class _Npz:
  """Our own `.npz` layout, read back by `npz.load`."""

  RUNTIME = 'vit_jax npz.load'

  def __init__(self, loaded):
    self.model = loaded.model

  def save(self, loaded, out_dir: str) -> str:
    path = os.path.join(out_dir, 'model.npz')
    npz.save(loaded.params, path)
    return path

  def run(self, path: str, images: np.ndarray, labels=None) -> np.ndarray:
    del labels
    return np.asarray(models.functional(self.model)(npz.load(path), images))


def _module(fmt: str, loaded):
  if fmt == 'npz':
    return _Npz(loaded)
  try:
    return importlib.import_module(f'vit_jax.export.{fmt}')
  except ImportError as e:
    raise ImportError(f'{fmt} export needs the export extra: {_HINT} ({e})') from e


def verification_images(image_size: int, batch: int = max(BATCH_SIZES)) -> np.ndarray:
  """The fixed batch exports are checked on: uniform in [-1, 1], seed 0."""
  rng = np.random.RandomState(0)
  return rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)


def encoded_test_images(n: int) -> list[bytes]:
  """`n` PNG-encoded random RGB images of odd sizes (so preprocessing resizes them)."""
  import io

  from PIL import Image

  rng = np.random.RandomState(1)
  out = []
  for i in range(n):
    buffer = io.BytesIO()
    pixels = rng.randint(0, 256, (37 + 5 * i, 45, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format='PNG')
    out.append(buffer.getvalue())
  return out


_RUNTIMES = {
  'hf': ('torch', 'transformers', 'safetensors'),
  'onnx': ('torch', 'transformers', 'onnx', 'onnxscript', 'onnxruntime'),
}


def _check_runtime(fmt: str) -> None:
  """Raises ImportError (with the install hint) when a format's packages are not installed."""
  missing = [name for name in _RUNTIMES.get(fmt, ()) if importlib.util.find_spec(name) is None]
  if missing:
    raise ImportError(f'{fmt} export needs the export extra ({", ".join(missing)}): {_HINT}')


def check_output(out_dir: str) -> None:
  """Raises OSError unless files can be created beside and in `out_dir`; leaves nothing behind."""
  with _staging(out_dir, publish=False):
    pass


@contextlib.contextmanager
def _staging(out_dir: str, publish: bool = True):
  """A fresh folder beside `out_dir` whose files move into `out_dir` only when the body succeeds.

  Nothing is left behind on failure (or without `publish`): no half-written artifact, no empty
  `out_dir`, no parent folder made for it.

  Raises:
    OSError: `out_dir` (or its parent) cannot be written.
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  made = parent  # The outermost folder this call creates, removed again on failure.
  while not os.path.exists(os.path.dirname(made)):
    made = os.path.dirname(made)
  made = None if os.path.exists(made) else made
  if os.path.isdir(out_dir) and not os.access(out_dir, os.W_OK):
    raise PermissionError(f'cannot write {out_dir!r}: Permission denied')
  published = False
  try:
    try:
      os.makedirs(parent, exist_ok=True)
      staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.partial-', dir=parent)
    except OSError as e:  # Named by the folder asked for, not the staging folder's name.
      raise OSError(f'cannot write {out_dir!r}: {e.strerror or e}') from None
    try:
      yield staging
      if publish:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(staging):
          target = os.path.join(out_dir, name)
          if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
          os.replace(os.path.join(staging, name), target)
        published = True
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  finally:
    if made and not published:
      shutil.rmtree(made, ignore_errors=True)


def export(
  loaded, fmt: str, out_dir: str, *, tolerance: float = TOLERANCE, batch_size: int | None = None
) -> Report:
  """Writes `loaded` (a `vit_jax.export.load.Loaded`) as `fmt` under `out_dir`, then verifies it.

  `batch_size` (saved_model only) fixes the batch dimension, as TFLite conversion needs; it is
  then verified at that batch size only. hf and onnx are written and reloaded by a child process
  that never imports TensorFlow (`vit_jax.export.torch_side` says why). Files appear in `out_dir`
  only once written and reloaded; on an error nothing is left there.

  Returns:
    A Report; `report.ok` is False when a difference exceeds `tolerance` (not raised here, so
    callers can print the figures first).

  Raises:
    ValueError: a model the format cannot represent (the message says why).
    ImportError: the format's runtime is not installed.
    OSError: `out_dir` cannot be written.
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown export format {fmt!r}; expected one of {FORMATS}')
  if batch_size is not None and fmt != 'saved_model':
    raise ValueError(f'a fixed batch size is for saved_model only; {fmt} has a dynamic batch')
  module = _module(fmt, loaded)
  if fmt in torch_side.FORMATS:
    module.check(loaded)  # Imports no torch.
  _check_runtime(fmt)
  batches = (batch_size,) if batch_size else BATCH_SIZES
  images = verification_images(loaded.image_size, batch_size or max(BATCH_SIZES))
  ours = np.asarray(jax.jit(loaded.apply)(images))
  diffs = {}
  with _staging(out_dir) as staging:
    if fmt in torch_side.FORMATS:
      path, seconds, logits = torch_side.run(loaded, fmt, staging, images, batches)
    else:
      start = time.perf_counter()
      extra = {} if batch_size is None else {'batch_size': batch_size}
      path = module.save(loaded, staging, **extra)
      seconds = time.perf_counter() - start
      logits = {b: np.asarray(module.run(path, images[:b], labels=loaded.labels)) for b in batches}
    for batch in batches:
      theirs = logits[batch]
      if theirs.shape != ours[:batch].shape:
        raise VerificationError(f'{fmt}: logits {theirs.shape}, expected {ours[:batch].shape}')
      diffs[f'batch {batch}'] = float(np.max(np.abs(theirs - ours[:batch])))
    if fmt == 'saved_model':  # The SavedModel's encoded-image signature.
      encoded = encoded_test_images(batch_size or 4)
      theirs = module.run_bytes(path, encoded)['logits']
      from vit_jax.export import preprocess  # TensorFlow: imported only for this signature.

      pp = preprocess.eval_preprocess(loaded.pp_eval)
      ours_bytes = np.asarray(loaded.apply(np.stack([pp(x).numpy() for x in encoded])))
      diffs[f'image bytes, batch {len(encoded)}'] = float(np.max(np.abs(theirs - ours_bytes)))
    if loaded.labels:
      with open(os.path.join(staging, 'labels.txt'), 'w') as f:
        f.write('\n'.join(loaded.labels) + '\n')
  final = os.path.join(os.path.abspath(out_dir), os.path.relpath(path, staging))
  return Report(fmt, os.path.normpath(final), module.RUNTIME, seconds, diffs, tolerance)
