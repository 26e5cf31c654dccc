"""Classify images with a checkpoint (`.npz` or training workdir): top-k labels, attention maps.

  python -m vit_jax.predict --checkpoint ViT-B_16.npz --model ViT-B_16 cat.jpg photos/
  python -m vit_jax.predict --checkpoint workdirs/quickstart --json --attention maps/ digits/

Images are files or folders (searched recursively) in any format PIL reads; they are
preprocessed as the checkpoint was evaluated: a workdir's `pp_eval`, or for an `.npz` a bilinear
resize to the model's size and [-1, 1] (the published ViT evaluation). Label names come from the
workdir's dataset, `--labels` (TFDS name or text file), or ImageNet's for 1000-class checkpoints.

`--attention DIR` writes one PNG per image: the attention rollout (Abnar & Zuidema 2020) of the
class token over the patches, as a heat map over the image at the image's own size.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import cli
from vit_jax.export import load as checkpoint_load


def find_images(paths: list[str]) -> list[str]:
  """Files as given; folders searched recursively for files whose extension PIL reads, sorted.

  Files in folders that PIL does not read by their extension are left out and counted, by
  extension, in one line on stderr.

  Raises:
    ValueError: a path that does not exist, or a folder without image files.
  """
  from PIL import Image

  extensions = {ext.lower() for ext in Image.registered_extensions()}
  out, skipped = [], collections.Counter()
  for path in paths:
    if os.path.isdir(path):
      found = []
      for root, _, names in os.walk(path):
        for name in names:
          ext = os.path.splitext(name)[1].lower()
          if ext in extensions:
            found.append(os.path.join(root, name))
          elif not name.startswith('.'):
            skipped[ext or '(no extension)'] += 1
      if not found:
        raise ValueError(f'folder {path!r} holds no image files')
      out += sorted(found)
    elif os.path.exists(path):
      out.append(path)
    else:
      raise ValueError(f'image {path!r} does not exist')
  if skipped:
    counts = ', '.join(f'{n} {ext}' for ext, n in sorted(skipped.items()))
    n = sum(skipped.values())
    what = 'file that is not an image' if n == 1 else 'files that are not images'
    print(f'skipped {n} {what}: {counts}', file=sys.stderr)
  return out


def read_image(path: str) -> np.ndarray:
  """Decodes any image PIL reads into uint8 RGB [h, w, 3]."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as img:
      return np.asarray(img.convert('RGB'))
  except UnidentifiedImageError:
    raise ValueError(f'cannot read image {path!r}: not an image format PIL knows') from None
  except OSError as e:  # Truncated or corrupt data, unreadable file.
    raise ValueError(f'cannot read image {path!r}: {e.strerror or e}') from None


def load_images(paths: list[str], pp: str | int) -> np.ndarray:
  """Decodes and preprocesses image files: float32 [n, h, w, 3].

  Args:
    paths: image files.
    pp: an eval preprocessing string (`vit_jax.export.preprocess`) or an image size, meaning
      bilinear resize to it and [-1, 1].
  """
  from vit_jax.export import preprocess  # TensorFlow: imported only once needed.

  if isinstance(pp, int):
    pp = checkpoint_load.DEFAULT_PP.format(size=pp)
  fn = preprocess.eval_preprocess(pp)
  return np.stack([fn(read_image(path)).numpy() for path in paths])


def attention_rollout(
  weights: list[jax.Array], *, token: bool = True, registers: int = 0
) -> jax.Array:
  """Attention rollout over the patch grid: [batch, gh, gw], each map summing to 1.

  Per layer, heads are averaged and the residual connection is added as identity
  (0.5 * A + 0.5 * I, rows renormalised); the layers' matrices are multiplied from the first
  up. The map is the class token's row (the mean over the patches' rows without a class token)
  restricted to the patches and renormalised to sum to 1. `registers`: register tokens after
  the class token; the flow through them counts, but they are neither rows nor columns of the map.
  """
  rollout = None
  for w in weights:
    a = jnp.mean(w.astype(jnp.float32), axis=1)
    a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1])
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  first = int(token) + registers  # The first patch token.
  row = rollout[:, 0, first:] if token else jnp.mean(rollout[:, first:, first:], axis=1)
  row = row / jnp.sum(row, axis=-1, keepdims=True)
  grid = int(round(np.sqrt(row.shape[-1])))
  if grid * grid != row.shape[-1]:
    raise ValueError(f'{row.shape[-1]} patches do not form a square grid')
  return row.reshape(row.shape[0], grid, grid)


def heatmap(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A rollout grid upsampled (bilinear) to `size` (h, w), scaled to [0, 1] (max 1)."""
  up = np.asarray(jax.image.resize(jnp.asarray(grid, jnp.float32), size, 'bilinear'))
  up = np.maximum(up, 0)
  return up / max(float(up.max()), 1e-12)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
  """The image (uint8 [h, w, 3]) blended with the heat map in a blue (0) to red (1) scale."""
  color = np.stack([heat, 4 * heat * (1 - heat), 1 - heat], axis=-1) * 255
  return np.clip(0.5 * image + 0.5 * color, 0, 255).astype(np.uint8)


def predict(loaded, images: np.ndarray, *, top_k: int, attention: bool = False):
  """Returns (probabilities [n, k], class indices [n, k], best first; rollout grids or None)."""
  if attention and not hasattr(loaded.model, 'transformer'):
    raise ValueError('attention maps need a ViT; MLP-Mixer has no attention')

  def run(x):
    if not attention:
      return loaded.apply(x), None
    logits, weights = loaded.apply(x, attention=True)
    token = loaded.model.classifier in ('token', 'token_unpooled')
    registers = getattr(loaded.model, 'num_registers', 0)
    return logits, attention_rollout(weights, token=token, registers=registers)

  compiled = loaded.__dict__.setdefault(f'_predict_jit_{attention}', jax.jit(run))  # Per batch.
  logits, grids = compiled(images)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  order = np.argsort(-probs, axis=-1)[:, :top_k]
  return np.take_along_axis(probs, order, axis=-1), order, grids


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status (2 and one line on stderr for a user error)."""
  return cli.run(_main, argv)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m vit_jax.predict', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--checkpoint', required=True, help='.npz (local or gs://) or a workdir')
  parser.add_argument('--model', default=None, help='registered model name (for an .npz)')
  parser.add_argument('--step', type=int, default=None, help="workdir's step (default: latest)")
  parser.add_argument('--image_size', type=int, default=None, help="default: the checkpoint's")
  parser.add_argument('--labels', default=None, help='TFDS dataset name or labels text file')
  cli.add_weights(parser)
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--json', action='store_true', help='print one JSON document')
  parser.add_argument('--attention', default=None, metavar='OUT_DIR', help='rollout heat maps')
  cli.add_verbose(parser)
  parser.add_argument('images', nargs='+', help='image files or folders')
  return parser


def _writable_dir(path: str) -> bool:
  """Creates `path` if needed; returns whether it did. Raises cli.UserError if not writable."""
  created = not os.path.isdir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise cli.UserError(f'cannot write {path!r}: {e.strerror or e}') from None
  if not os.access(path, os.W_OK):
    raise cli.UserError(f'cannot write {path!r}: Permission denied')
  return created


def _main(argv: list[str]) -> None:
  cli.quiet()
  args = _parser().parse_args(argv)
  cli.check_model_name(args.model)
  paths = find_images(args.images)  # Fails before the model loads.
  created = args.attention and _writable_dir(args.attention)
  written = []
  try:
    results = _classify(args, paths, written)
  except BaseException:
    for path in written:  # Nothing half-written: this run's maps go, and a folder it made.
      os.remove(path)
    if created:
      shutil.rmtree(args.attention, ignore_errors=True)
    raise
  if args.json:
    print(json.dumps(results, indent=2))
    return
  for result in results:
    print(result['path'])
    for entry in result['top_k']:
      print(f'  {entry["probability"]:6.1%}  {entry["label"]}')


def _classify(args, paths: list[str], written: list[str]) -> list[dict]:
  loaded = checkpoint_load.load_from_args(args)
  names = loaded.labels or [str(i) for i in range(loaded.num_classes)]
  results = []
  for start in range(0, len(paths), args.batch_size):
    batch = paths[start : start + args.batch_size]
    images = load_images(batch, loaded.pp_eval)
    probs, classes, grids = predict(
      loaded, images, top_k=args.top_k, attention=bool(args.attention)
    )
    for i, path in enumerate(batch):
      result = {
        'path': path,
        'top_k': [
          {'label': names[c], 'index': int(c), 'probability': float(p)}
          for p, c in zip(probs[i], classes[i])
        ],
      }
      if grids is not None:
        from PIL import Image

        image = read_image(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(args.attention, f'{start + i:05d}_{stem}.png')
        Image.fromarray(overlay(image, heatmap(grids[i], image.shape[:2]))).save(out)
        written.append(out)
        result['attention'] = out
      results.append(result)
  return results


if __name__ == '__main__':
  sys.exit(main())
