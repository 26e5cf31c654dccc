"""The shipped ImageNet class names, checked against TFDS's own label file (an independent copy)."""

import os

import tensorflow_datasets as tfds

from vit_jax import labels
from vit_jax.export import load


def _read(path):
  with open(path) as f:
    return [line.rstrip('\n') for line in f]


def test_imagenet1k_ids_are_tfds_imagenet2012_order_and_names_are_readable():
  tfds_file = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'labels.txt')
  synsets = _read(os.path.join(os.path.dirname(labels.__file__), 'imagenet2012_synsets.txt'))
  assert synsets == _read(tfds_file)
  names = _read(labels.path(1000))
  assert (
    len(names) == 1000
    and names[0] == 'tench, Tinca tinca'
    and names[1] == 'goldfish, Carassius auratus'
  )
  assert labels.readable(synsets) == names


def test_imagenet21k_names_and_readable_synsets():
  names = _read(labels.path(21843))
  assert len(names) == 21843 and names[0] == 'organism, being'
  assert labels.readable(['n01440764', 'n00004475']) == ['tench, Tinca tinca', 'organism, being']
  assert labels.readable(['cat', 'n01440764']) == ['cat', 'n01440764']  # Not all ids: as they are.
  assert load.label_names(load.default_labels(21843), 21843)[0] == 'organism, being'
  assert labels.path(10) is None
