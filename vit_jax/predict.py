"""Classify image files with a released `.npz` checkpoint: top-k labels per image.

  python -m vit_jax.predict --model ViT-B_16 --checkpoint ViT-B_16.npz --labels imagenet2012 \
      --image_size 224 cat.jpg dog.png

Images are resized to `image_size` x `image_size` (bilinear, as the published ViT evaluation) and
scaled to [-1, 1]. `--labels` is a TFDS dataset name whose label names TFDS ships (imagenet2012,
cifar10, ...), or a text file with one name per line; without it class indices are printed.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from vit_jax import models, npz


def load_images(paths: list[str], image_size: int) -> np.ndarray:
  """Decodes and resizes image files to float32 [n, image_size, image_size, 3] in [-1, 1]."""
  from PIL import Image, UnidentifiedImageError

  images = []
  for path in paths:
    try:
      with Image.open(path) as img:
        img = img.convert('RGB').resize((image_size, image_size), Image.BILINEAR)
        images.append(np.asarray(img, np.float32) / 127.5 - 1.0)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
      raise ValueError(f'cannot read image {path!r}: {e}') from e
  return np.stack(images)


def label_names(labels: str | None, num_classes: int) -> list[str]:
  if not labels:
    return [str(i) for i in range(num_classes)]
  if os.path.isfile(labels):
    with open(labels) as f:
      names = [line.strip() for line in f if line.strip()]
  else:
    import tensorflow_datasets as tfds

    names = list(tfds.builder(labels).info.features['label'].names)
  if len(names) != num_classes:
    raise ValueError(f'{labels!r} has {len(names)} labels but the checkpoint has {num_classes}')
  return names


def predict(model, params, images: np.ndarray, *, top_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (probabilities, class indices), each [n, top_k], best first."""
  logits = jax.jit(model.apply, static_argnames='train')({'params': params}, images, train=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  order = np.argsort(-probs, axis=-1)[:, :top_k]
  return np.take_along_axis(probs, order, axis=-1), order


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True, help='registered model name, e.g. ViT-B_16')
  parser.add_argument('--checkpoint', required=True, help='.npz checkpoint (local or gs://)')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--labels', default=None, help='TFDS dataset name or labels text file')
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('images', nargs='+')
  args = parser.parse_args(argv)

  params = npz.load(args.checkpoint)
  num_classes = params['head']['bias'].shape[0]
  model = models.get_model(args.model, num_classes=num_classes)
  init = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), args.image_size))
  npz.check_tree(params, init, path=args.checkpoint, model_name=args.model)
  names = label_names(args.labels, num_classes)
  probs, classes = predict(
    model, params, load_images(args.images, args.image_size), top_k=args.top_k
  )
  for path, p_row, c_row in zip(args.images, probs, classes):
    print(path)
    for p, c in zip(p_row, c_row):
      print(f'  {p:6.1%}  {names[c]}')


if __name__ == '__main__':
  main()
