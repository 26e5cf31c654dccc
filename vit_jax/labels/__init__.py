"""Readable ImageNet class names, shipped as data (no download, no prepared dataset).

`imagenet2012.txt` (1,000 names, the class order of TFDS `imagenet2012` and of the released
ImageNet-1k checkpoints: sorted WordNet ids) and `imagenet21k.txt` (21,843 names, the class order
of the released ImageNet-21k checkpoints, the "fall11" synsets sorted), each beside its
`*_synsets.txt` (the WordNet ids, same order).

Source: timm 1.0.31 (Apache-2.0), `timm/data/_info/imagenet_synsets.txt`,
`imagenet21k_goog_synsets.txt` and `imagenet_synset_to_lemma.txt` (the WordNet 3.0 lemmas of each
synset, as ImageNet lists them, e.g. n01440764 -> "tench, Tinca tinca"). The 1,000 ids are
checked against TFDS's own `imagenet2012/labels.txt` in tests/test_labels.py.
"""

from __future__ import annotations

import functools
import os
import re

_HERE = os.path.dirname(__file__)
_SYNSET = re.compile(r'^n\d{8}$')
FILES = {1000: 'imagenet2012', 21843: 'imagenet21k'}  # Class count -> released label list.


def _read(name: str) -> list[str]:
  with open(os.path.join(_HERE, name), encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f if line.strip()]


def path(num_classes: int) -> str | None:
  """The names file of a released checkpoint with this class count (ImageNet-1k/21k), or None."""
  name = FILES.get(num_classes)
  return os.path.join(_HERE, f'{name}.txt') if name else None


@functools.cache
def synset_names() -> dict[str, str]:
  """{WordNet id: readable name} of every shipped synset."""
  out = {}
  for name in FILES.values():
    out.update(zip(_read(f'{name}_synsets.txt'), _read(f'{name}.txt')))
  return out


def readable(names: list[str]) -> list[str]:
  """`names` with WordNet ids (`n01440764`) replaced by their readable names, when all are ids."""
  if not names or not all(_SYNSET.match(n) for n in names):
    return names
  known = synset_names()
  return [known.get(n, n) for n in names]
