"""Helpers for the data tests: small image folders whose pixels name the example."""

import os

import numpy as np
from PIL import Image


def make_indexed_folder(root, classes=3, per_class=23) -> dict[int, int]:
  """Writes 8x8 PNGs to root/class_<c>/; pixel values encode a unique id. Returns {id: class}."""
  ids = {}
  for c in range(classes):
    os.makedirs(os.path.join(root, f'class_{c}'), exist_ok=True)
    for i in range(per_class):
      uid = c * per_class + i
      image = np.zeros((8, 8, 3), np.uint8)
      image[..., 0], image[..., 1], image[..., 2] = uid % 256, uid // 256, c
      Image.fromarray(image).save(os.path.join(root, f'class_{c}', f'{i:03d}.png'))
      ids[uid] = c
  return ids


def batch_ids(batch) -> list[int]:
  """Ids of the real (mask=True) examples of a batch made with preprocess='decode'."""
  image = np.asarray(batch['image']).astype(int)
  uids = image[:, 0, 0, 0] + 256 * image[:, 0, 0, 1]
  return [int(u) for u, m in zip(uids, batch['mask']) if m]
