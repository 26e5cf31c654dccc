"""Offline TFDS builders: scikit-learn's 8x8 digits, a folder of images (a subfolder per class) and
ImageNet-21k from its manual download (winter21_whole).

All are real `tfds.core.GeneratorBasedBuilder`s: prepared once into `data_dir` as TFRecord shards
and then read by the same pipeline as any TFDS dataset (per-process shards, resumable shuffling).
"""

import collections
import hashlib
import io
import logging
import os
import re
import shutil
import tarfile

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')  # ImageNet-21k's members.
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

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and progress bars (terminal
  # escapes in a log file): nothing is downloaded here, so one log line each instead.
  def _log_download_bytes(self):
    logging.info(
      'preparing dataset %s into %s (once; later runs reuse it)', self.name, self.data_dir
    )

  def _log_download_done(self):
    logging.info('prepared dataset %s in %s', self.name, self.data_dir)

  def download_and_prepare(self, *args, **kwargs):
    """TFDS's preparation without progress bars; on failure nothing is left in `data_dir`."""
    from tensorflow_datasets.core.utils import tqdm_utils

    chain = [self._data_dir_root, os.path.join(self._data_dir_root, self.name)]
    if self.builder_config:
      chain.append(os.path.join(chain[-1], self.builder_config.name))
    # The outermost folder that preparation creates: removed again if it fails.
    made = next((p for p in [*chain, self.data_dir] if not os.path.exists(p)), None)
    shown = getattr(tqdm_utils, '_active', True)
    tqdm_utils.display_progress_bar(False)
    try:
      return super().download_and_prepare(*args, **kwargs)
    except BaseException:
      if made and '://' not in made:
        shutil.rmtree(made, ignore_errors=True)
      raise
    finally:
      tqdm_utils.display_progress_bar(shown)


class Digits(_OfflineBuilder):
  """scikit-learn's handwritten digits (UCI optdigits test set): 1,797 8x8 images, 10 classes.

  Stored at their native 8x8 as RGB uint8 PNGs (0..16 scaled to 0..255: round(v * 255 / 16));
  upscaling is left to the preprocessing string (e.g. `decode|resize(32)|value_range(-1,1)`).
  Splits: train 1,437 / test 360, stratified by class (`train_test_split(random_state=0)`).
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
    splits = train_test_split(
      np.arange(len(images)), test_size=DIGITS_NUM_TEST, stratify=digits.target, random_state=0
    )
    return {
      name: self._generate_examples(images, digits.target, np.sort(index))
      for name, index in zip(('train', 'test'), splits)
    }

  def _generate_examples(self, images, labels, index):
    for i in index:
      yield int(i), {'image': np.repeat(images[i][..., None], 3, -1), 'label': int(labels[i])}


def prepare_digits(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepares `digits` into `data_dir` (default ~/tensorflow_datasets) if needed; no network."""
  builder = Digits(data_dir=os.path.expanduser(data_dir or DEFAULT_DATA_DIR))
  builder.download_and_prepare()
  return builder


def readable_extensions() -> set[str]:
  """File extensions of every image format PIL can open (lower case, with the dot)."""
  from PIL import Image

  Image.init()
  return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _list_folder(folder: str) -> dict[str, list[str]]:
  """Returns {class name: sorted image paths}; raises on a missing, empty or unreadable folder.

  Images are files with an extension of a format PIL reads; other files are left out, and counted
  by extension in one warning line.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Image folder {folder!r} does not exist (dataset "folder:{folder}").')
  classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  classes = [c for c in classes if not c.startswith(('.', '_'))]
  if not classes:
    raise ValueError(
      f'Image folder {folder!r} has no class subfolders: expected {folder}/<class name>/<images>.'
    )
  files, skipped = {}, collections.Counter()
  extensions = readable_extensions()
  for name in classes:
    path = os.path.join(folder, name)
    try:
      entries = sorted(os.listdir(path))
    except OSError as e:
      raise ValueError(f'Class folder {path!r} is unreadable: {e}') from e
    files[name] = []
    for entry in entries:
      ext = os.path.splitext(entry)[1].lower()
      if ext in extensions:
        files[name].append(os.path.join(path, entry))
      elif not entry.startswith('.') and os.path.isfile(os.path.join(path, entry)):
        skipped[ext or '(no extension)'] += 1
    if not files[name]:
      raise ValueError(
        f'Class folder {path!r} contains no images (no file of a format PIL reads); '
        'add images or remove the folder.'
      )
  if skipped:
    counts = ', '.join(f'{n} {ext}' for ext, n in sorted(skipped.items()))
    message = 'folder %s: skipped %d files that are not images PIL reads: %s'
    logging.warning(message, folder, skipped.total(), counts)
  return files


def _checked_bytes(raw: bytes, convert_to: str = 'PNG') -> bytes:
  """Returns bytes TensorFlow can decode to RGB: RGB/grayscale JPEGs as-is; others (CMYK JPEGs,
  PNG/GIF/BMP, ...) as RGB `convert_to` ('PNG': lossless; 'JPEG': quality 100, as TFDS's
  imagenet2012 builder does for its odd files).

  Raises:
    OSError/ValueError (from PIL): a corrupt, truncated or unreadable file.
  """
  from PIL import Image, UnidentifiedImageError

  try:
    image = Image.open(io.BytesIO(raw))
  except UnidentifiedImageError:  # Its message names the BytesIO object, not the file.
    raise ValueError('not an image format PIL reads') from None
  with image:
    image.load()  # Full decode: catches truncated and corrupt files.
    if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
      return raw
    out = io.BytesIO()
    options = {'quality': 100} if convert_to == 'JPEG' else {}
    # GIF: first frame; RGBA: alpha dropped; CMYK: PIL's conversion.
    image.convert('RGB').save(out, format=convert_to, **options)
    return out.getvalue()


def _listing(lines: list[str]) -> str:
  """The first 50 of `lines` for an error message, one per indented line."""
  return '\n  '.join(lines[:50]) + ('\n  ...' if len(lines) > 50 else '')


def _load_checked(path: str) -> bytes:
  """`_checked_bytes` of a file (others as PNG)."""
  with open(path, 'rb') as f:
    return _checked_bytes(f.read())


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
    corrupt = []
    for path in (p for paths in self._files.values() for p in paths):
      try:
        _load_checked(path)
      except Exception as e:  # PIL raises many types for bad files.
        corrupt.append(f'{path} ({type(e).__name__}: {e})')
    splits = _split_folder(self._files, self._validation_fraction)
    if corrupt:
      raise ValueError(
        f'{len(corrupt)} corrupt or unreadable image file(s) in {self._folder}; delete or '
        f'replace them and prepare again:\n  {_listing(corrupt)}'
      )
    return {k: self._generate_examples(sorted(v)) for k, v in splits.items() if v}

  def _generate_examples(self, items):
    for path, label in items:
      rel = os.path.relpath(path, self._folder)
      yield rel, {'image': _load_checked(path), 'label': label, 'file_name': rel}


def _split_folder(files: dict[str, list[str]], validation_fraction: float) -> dict[str, list]:
  """{'train': [(path, label)], 'validation': [...]}: per class, `validation_fraction` of its
  files (at least one when it has two or more), chosen by a hash of the file name."""
  splits = {'train': [], 'validation': []}
  for label, paths in enumerate(files.values()):
    ranked = sorted(paths, key=lambda p: hashlib.md5(os.path.basename(p).encode()).hexdigest())
    n_val = round(len(ranked) * validation_fraction)
    if validation_fraction > 0 and len(ranked) >= 2:
      n_val = max(n_val, 1)
    splits['validation'] += [(p, label) for p in ranked[:n_val]]
    splits['train'] += [(p, label) for p in ranked[n_val:]]
  return splits


def folder_split_sizes(folder: str, validation_fraction: float = 0.1) -> dict[str, int]:
  """{split: examples} that `prepare_folder` makes of `folder`, from its listing alone (cheap).

  Raises:
    FileNotFoundError, ValueError: as `prepare_folder` (a missing folder, no class subfolders...).
  """
  files = _list_folder(os.path.abspath(os.path.expanduser(folder)))
  return {k: len(v) for k, v in _split_folder(files, validation_fraction).items() if v}


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


IMAGENET21K_DIR = 'winter21_whole'  # Inside the manual dir.
_SYNSET = re.compile(r'^n\d{8}$')
IMAGENET21K_PREPARE = (
  'python -c "from vit_jax import data; '
  "data.prepare_imagenet21k('{data_dir}', manual_dir='{manual_dir}')\""
)


def _default_manual_dir(data_dir: str) -> str:
  return os.path.join(data_dir, 'downloads', 'manual')


def _list_synsets(root: str) -> dict[str, str]:
  """Returns {synset id: its .tar file or folder} under `root`, sorted by synset id.

  Raises:
    FileNotFoundError: `root` is missing or holds no nXXXXXXXX.tar / nXXXXXXXX/ entries.
    ValueError: a synset present both as a .tar and as a folder.
  """
  entries = sorted(os.listdir(root)) if os.path.isdir(root) else []
  synsets = {}
  for entry in entries:
    path = os.path.join(root, entry)
    synset = entry[: -len('.tar')] if entry.endswith('.tar') else entry
    if not _SYNSET.match(synset) or not (os.path.isdir(path) or entry.endswith('.tar')):
      continue
    if synset in synsets:
      raise ValueError(
        f'Synset {synset} is in {root} both as {synset}.tar and as the folder {synset}/; '
        'keep one of them.'
      )
    synsets[synset] = path
  if not synsets:
    raise FileNotFoundError(f'No nXXXXXXXX.tar files or nXXXXXXXX/ folders in {root!r}.')
  return dict(sorted(synsets.items()))


def _synset_images(synset: str, path: str):
  """Yields (key, path for messages, bytes or exception) of one synset, streaming its .tar."""
  if os.path.isdir(path):
    for name in sorted(os.listdir(path)):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        file_path = os.path.join(path, name)
        try:
          with open(file_path, 'rb') as f:
            yield f'{synset}/{name}', file_path, f.read()
        except OSError as e:
          yield f'{synset}/{name}', file_path, e
    return
  try:
    with tarfile.open(path, mode='r|*') as tar:  # Streaming: members in order, nothing on disk.
      for member in tar:
        if member.isfile() and member.name.lower().endswith(IMAGE_EXTENSIONS):
          name = member.name[2:] if member.name.startswith('./') else member.name
          yield f'{synset}/{name}', f'{path}/{name}', tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:  # The .tar itself is damaged.
    yield None, path, e


class Imagenet21k(_OfflineBuilder):
  """ImageNet-21k (winter21 release, ~13M images, ~19k synsets), from a manual download.

  Labels are the sorted synset ids found in the manual folder. One split, `full`; the usual
  evaluation split is its first 102,400 examples (`full[:102400]`, training `full[102400:]`),
  which are a pseudo-random sample over all classes because TFDS orders examples by a hash of
  their key (`<synset>/<file name>`). Original JPEG bytes are stored as is; the few CMYK,
  PNG-in-.JPEG etc. files are converted to RGB JPEGs (quality 100). Every image is fully decoded at
  preparation; corrupt ones stop it (listed by path) unless `skip_corrupt`.
  """

  name = 'imagenet21k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: the winter21 release (winter21_whole.tar.gz).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Register at https://image-net.org and download the ImageNet-21k winter21 release,
`winter21_whole.tar.gz` (Download > ImageNet21K, "Winter 2021 release", about 1.1 TB). Extract it
in the manual folder, so that `<manual_dir>/{IMAGENET21K_DIR}/` holds one `nXXXXXXXX.tar` per
synset (the per-synset tars need not be extracted); already extracted per-synset folders
`<manual_dir>/{IMAGENET21K_DIR}/nXXXXXXXX/*.JPEG` work too. The manual folder defaults to
`<data_dir>/downloads/manual`.
"""

  def __init__(self, *, skip_corrupt: bool = False, **kwargs):
    self._skip_corrupt = skip_corrupt
    self.corrupt_files: list[str] = []  # Set by preparation: what was skipped or failed.
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          # Names (the synset ids) are set at preparation and read back from the prepared data.
          'label': tfds.features.ClassLabel(),
          'file_name': tfds.features.Text(),  # <synset>/<file name in its .tar or folder>
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://image-net.org/',
    )

  def _split_generators(self, dl_manager):
    root = os.path.join(dl_manager.manual_dir, IMAGENET21K_DIR)
    synsets = _list_synsets(root)
    self.info.features['label'].names = list(synsets)
    return {'full': self._generate_examples(root, synsets)}

  def _generate_examples(self, root, synsets):
    self.corrupt_files = []
    for label, (synset, path) in enumerate(synsets.items()):
      for key, where, raw in _synset_images(synset, path):
        try:
          if isinstance(raw, Exception):
            raise raw
          image = _checked_bytes(raw, convert_to='JPEG')
        except Exception as e:  # PIL raises many types for bad files.
          self.corrupt_files.append(f'{where} ({type(e).__name__}: {e})')
          continue
        yield key, {'image': image, 'label': label, 'file_name': key}
    bad = self.corrupt_files
    if bad and not self._skip_corrupt:
      raise ValueError(
        f'{len(bad)} corrupt or unreadable image(s) in {root}; nothing was written. Replace '
        f'or delete them, or prepare with skip_corrupt=True to leave them out:\n  {_listing(bad)}'
      )
    if bad:
      logging.warning(
        'imagenet21k: left out %d corrupt image(s):\n  %s', len(bad), '\n  '.join(bad)
      )


def prepare_imagenet21k(
  data_dir: str | None = None, manual_dir: str | None = None, skip_corrupt: bool = False
) -> tfds.core.DatasetBuilder:
  """Prepares `imagenet21k` into `data_dir` from `<manual_dir>/winter21_whole/`, if not done yet.

  Single process (no Beam). `manual_dir` defaults to `<data_dir>/downloads/manual`.

  Raises:
    FileNotFoundError: no nXXXXXXXX.tar / nXXXXXXXX/ in `<manual_dir>/winter21_whole/`.
    ValueError: corrupt images (all listed by path, `<synset>.tar/<member>` for tar members) when
      not `skip_corrupt`; nothing is written then.
  """
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  manual_dir = os.path.expanduser(manual_dir or _default_manual_dir(data_dir))
  builder = Imagenet21k(data_dir=data_dir, skip_corrupt=skip_corrupt)
  if builder.is_prepared():
    return builder
  _count_manual_synsets(data_dir, manual_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _count_manual_synsets(data_dir: str, manual_dir: str) -> int:
  """The number of synsets in `<manual_dir>/winter21_whole/`; raises FileNotFoundError saying
  where to put them and how to prepare them when there are none."""
  try:
    return len(_list_synsets(os.path.join(manual_dir, IMAGENET21K_DIR)))
  except FileNotFoundError as e:
    why = str(e)
  raise FileNotFoundError(
    f'Dataset imagenet21k is not prepared in {data_dir!r} and its manual download is missing: '
    f'{why} Put the ImageNet-21k winter21 release there: download winter21_whole.tar.gz from '
    f'https://image-net.org and extract it in {manual_dir}/ so that '
    f'{os.path.join(manual_dir, IMAGENET21K_DIR)}/ holds nXXXXXXXX.tar (one per synset; or '
    f'extracted nXXXXXXXX/*.JPEG folders). Then prepare it once (single process, many hours for '
    f'the full 13M images; see docs/data.md): '
    + IMAGENET21K_PREPARE.format(data_dir=data_dir, manual_dir=manual_dir)
  ) from None


def load_imagenet21k(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the prepared `imagenet21k` builder; never prepares it (that takes many hours).

  Raises:
    FileNotFoundError: not prepared in `data_dir`; says where the manual files go (default
      `<data_dir>/downloads/manual/winter21_whole/`) and how to prepare them.
  """
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  builder = Imagenet21k(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = _default_manual_dir(data_dir)
  root = os.path.join(manual_dir, IMAGENET21K_DIR)
  n = _count_manual_synsets(data_dir, manual_dir)
  raise FileNotFoundError(
    f'Dataset imagenet21k is not prepared in {data_dir!r}. Its manual download is in {root}/ '
    f'({n} synsets); preparing takes long (single process), so it is not done on first use. '
    'Prepare it once, before training (not from every host): '
    + IMAGENET21K_PREPARE.format(data_dir=data_dir, manual_dir=manual_dir)
  )


# Which builder a dataset name resolves to, and its classes and split sizes.
LABEL_KEYS = {'imagenet2012_real': 'original_label'}
SYNTHETIC_DEFAULTS = {'image_size': 224, 'num_classes': 1000, 'num_examples': 10_000}


def synthetic(dataset: str) -> tuple[dict, list[str], dict[str, int]]:
  """(options, label names, split sizes) of 'synthetic[:key=value,...]'."""
  kwargs = dict(SYNTHETIC_DEFAULTS)
  for item in filter(None, dataset.partition(':')[2].split(',')):
    key, _, value = item.partition('=')
    if key not in kwargs and key != 'num_test':
      raise ValueError(f'Unknown synthetic option {key!r} in {dataset!r}; known: {list(kwargs)}')
    kwargs[key.strip()] = int(value)
  test = kwargs.get('num_test', max(kwargs['num_examples'] // 10, 1))
  sizes = {'train': kwargs['num_examples'], 'test': test, 'validation': test}
  return kwargs, [str(i) for i in range(kwargs['num_classes'])], sizes


def dataset_builder(dataset: str, data_dir: str | None):
  """Returns a prepared TFDS builder or raises an error saying how to prepare it."""
  if dataset == 'digits':
    return prepare_digits(data_dir)
  if dataset.startswith('folder:'):
    return prepare_folder(dataset[len('folder:') :], data_dir)
  if dataset == 'imagenet21k':  # Never prepared on first use: that takes many hours.
    return load_imagenet21k(data_dir)
  name = dataset.split(':')[0].split('/')[0]
  if name not in tfds.list_builders(with_community_datasets=False):
    raise ValueError(
      f'Unknown dataset {dataset!r}: use "digits", "imagenet21k", '
      '"synthetic[:image_size=..,num_classes=..,num_examples=..]", "folder:/path/to/images" '
      'or a TFDS name (tfds.list_builders()).'
    )
  if data_dir and '://' not in data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    raise FileNotFoundError(f'data_dir {data_dir!r} for dataset {dataset!r} does not exist.')
  builder = tfds.builder(dataset, data_dir=data_dir and os.path.expanduser(data_dir))
  if not builder.is_prepared():
    where = builder._data_dir_root  # noqa: SLF001 (the root the user passed or the default)
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      manual = os.path.join(where, 'downloads', 'manual')
      raise FileNotFoundError(
        f'Dataset {dataset!r} is not prepared in {where!r} and needs a manual download. '
        f'Put the files in {manual}/ '
        f'({builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}), then run once: '
        f'tfds build {name} --data_dir={where} --manual_dir={manual}'
      )
    raise FileNotFoundError(
      f'Dataset {dataset!r} is not prepared in {where!r}. Prepare it once (needs network): '
      f'tfds build {name} --data_dir={where}'
    )
  return builder


def get_dataset_info(dataset: str, data_dir: str | None = None):
  """Returns (num_classes, label_names, {split: num_examples}) of a dataset (may prepare it)."""
  if dataset.split(':')[0] == 'synthetic':
    _, names, sizes = synthetic(dataset)
    return len(names), names, sizes
  builder = dataset_builder(dataset, data_dir)
  label = builder.info.features[LABEL_KEYS.get(builder.name, 'label')]
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  return label.num_classes, list(label.names), sizes
