"""Offline TFDS builders: scikit-learn's 8x8 digits, and a folder of images (a subfolder per class).

Both are real `tfds.core.GeneratorBasedBuilder`s: prepared once into `data_dir` as TFRecord shards
and then read by the same pipeline as any TFDS dataset (per-process shards, resumable shuffling).
"""

import hashlib
import io
import os

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
DIGITS_NUM_TEST = 360  # 20% of 1,797, stratified by class with a fixed seed.


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of builders that download nothing."""

  # TFDS locates a builder's source file to find its URL checksums; for builders outside the
  # tensorflow_datasets package that needs `importlib_resources`, which TFDS 4.9 does not declare.
  # These builders have no URLs, so there is nothing to locate.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None


class Digits(_OfflineBuilder):
  """scikit-learn's handwritten digits (UCI optdigits test set): 1,797 8x8 images, 10 classes.

  Stored honestly at their native 8x8 resolution as RGB uint8 PNGs: the 0..16 intensities are
  scaled to 0..255 (round(v * 255 / 16)) and copied to 3 channels; upscaling is left to the
  preprocessing string (e.g. `decode|resize(32)|value_range(-1,1)`). Splits: train 1,437 /
  test 360, stratified by class (sklearn `train_test_split(random_state=0)`), fixed forever.
  """

  name = 'digits'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    return self.dataset_info_from_configs(
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(8, 8, 3), encoding_format='png'),
          'label': tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    index = np.arange(len(images))
    train, test = train_test_split(
      index, test_size=DIGITS_NUM_TEST, stratify=digits.target, random_state=0
    )
    return {
      'train': self._generate_examples(images, digits.target, np.sort(train)),
      'test': self._generate_examples(images, digits.target, np.sort(test)),
    }

  def _generate_examples(self, images, labels, index):
    for i in index:
      yield int(i), {'image': np.repeat(images[i][..., None], 3, -1), 'label': int(labels[i])}


def prepare_digits(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepares `digits` into `data_dir` (default ~/tensorflow_datasets) if needed; no network."""
  builder = Digits(data_dir=os.path.expanduser(data_dir or DEFAULT_DATA_DIR))
  builder.download_and_prepare()
  return builder


def _list_folder(folder: str) -> dict[str, list[str]]:
  """Returns {class name: sorted image paths}; raises on a missing, empty or unreadable folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Image folder {folder!r} does not exist (dataset "folder:{folder}").')
  classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  classes = [c for c in classes if not c.startswith(('.', '_'))]
  if not classes:
    raise ValueError(
      f'Image folder {folder!r} has no class subfolders: expected {folder}/<class name>/<images>.'
    )
  files = {}
  for name in classes:
    path = os.path.join(folder, name)
    try:
      entries = sorted(os.listdir(path))
    except OSError as e:
      raise ValueError(f'Class folder {path!r} is unreadable: {e}') from e
    files[name] = [os.path.join(path, f) for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files[name]:
      raise ValueError(
        f'Class folder {path!r} contains no images ({"/".join(IMAGE_EXTENSIONS)}); '
        'add images or remove the folder.'
      )
  return files


def _load_checked(path: str) -> bytes:
  """Returns bytes TensorFlow can decode to RGB: JPEGs (RGB/grayscale) as-is, others as PNG.

  Raises:
    OSError/ValueError (from PIL): a corrupt, truncated or unreadable file.
  """
  from PIL import Image

  with open(path, 'rb') as f:
    raw = f.read()
  with Image.open(io.BytesIO(raw)) as image:
    image.load()  # Full decode: catches truncated and corrupt files.
    if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
      return raw
    out = io.BytesIO()
    image.convert('RGB').save(out, format='PNG')  # GIF: first frame; RGBA: alpha dropped.
    return out.getvalue()


class ImageFolder(_OfflineBuilder):
  """A folder of images, one subfolder per class, as a TFDS dataset with train/validation splits.

  Every file is fully decoded at preparation; corrupt files stop preparation with their paths.
  The validation split holds `validation_fraction` of each class (at least one image when the
  class has two or more), chosen by a hash of the file name, so it is stable across machines.
  """

  name = 'vit_jax_image_folder'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, folder: str, validation_fraction: float = 0.1, **kwargs):
    self._folder = os.path.abspath(os.path.expanduser(folder))
    self._files = _list_folder(self._folder)
    self._validation_fraction = validation_fraction
    # The config name fingerprints the folder and its listing: new files mean a new dataset.
    listing = [(p, os.path.getsize(p)) for ps in self._files.values() for p in ps]
    digest = hashlib.sha256(repr((self._folder, validation_fraction, listing)).encode())
    base = ''.join(c if c.isalnum() else '_' for c in os.path.basename(self._folder)) or 'root'
    config = tfds.core.BuilderConfig(name=f'{base}_{digest.hexdigest()[:12]}')
    super().__init__(config=config, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'Images from {self._folder}',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=list(self._files)),
          'file_name': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    corrupt, splits = [], {'train': [], 'validation': []}
    for label, paths in enumerate(self._files.values()):
      for path in paths:
        try:
          _load_checked(path)
        except Exception as e:  # PIL raises many types for bad files.
          corrupt.append(f'{path} ({type(e).__name__}: {e})')
      ranked = sorted(paths, key=lambda p: hashlib.md5(os.path.basename(p).encode()).hexdigest())
      n_val = round(len(ranked) * self._validation_fraction)
      if self._validation_fraction > 0 and len(ranked) >= 2:
        n_val = max(n_val, 1)
      splits['validation'] += [(p, label) for p in ranked[:n_val]]
      splits['train'] += [(p, label) for p in ranked[n_val:]]
    if corrupt:
      listing = '\n  '.join(corrupt[:50]) + ('\n  ...' if len(corrupt) > 50 else '')
      raise ValueError(
        f'{len(corrupt)} corrupt or unreadable image file(s) in {self._folder}; delete or '
        f'replace them and prepare again:\n  {listing}'
      )
    return {k: self._generate_examples(sorted(v)) for k, v in splits.items() if v}

  def _generate_examples(self, items):
    for path, label in items:
      rel = os.path.relpath(path, self._folder)
      yield rel, {'image': _load_checked(path), 'label': label, 'file_name': rel}


def prepare_folder(
  folder: str, data_dir: str | None = None, validation_fraction: float = 0.1
) -> tfds.core.DatasetBuilder:
  """Prepares a folder of class subfolders as a TFDS dataset in `data_dir`, if not done yet.

  Raises:
    FileNotFoundError: `folder` does not exist.
    ValueError: no class subfolders, an empty class folder, or corrupt files (all listed by path).
  """
  builder = ImageFolder(
    folder=folder,
    validation_fraction=validation_fraction,
    data_dir=os.path.expanduser(data_dir or DEFAULT_DATA_DIR),
  )
  builder.download_and_prepare()
  return builder
