"""ImageNet-21k builder on a fake winter21 layout: per-synset .tar files and an extracted folder."""

import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import data

KW = dict(process_index=0, process_count=1)
# synset -> 'tar' or 'folder'; written in this (unsorted) order, labels follow sorted ids.
SYNSETS = {'n03000003': 'tar', 'n01000001': 'tar', 'n02000002': 'folder', 'n04000004': 'tar'}
NUM_PER_SYNSET = 3


def _color(label, i):
  return (30 + 60 * label, 40 + 70 * i, 200 - 50 * label)


def _jpeg(color, mode='RGB'):
  image = Image.new('RGB', (16, 12), color)
  if mode == 'L':
    image = image.convert('L')
  elif mode == 'CMYK':
    image = image.convert('CMYK')
  out = io.BytesIO()
  image.save(out, format='JPEG', quality=95)
  return out.getvalue()


def _add(tar, name, raw):
  info = tarfile.TarInfo(name)
  info.size = len(raw)
  tar.addfile(info, io.BytesIO(raw))


def _fake_winter21(manual_dir, corrupt=False):
  """Writes the layout; returns {(label, expected RGB)} and the corrupt member's path."""
  root = manual_dir / 'winter21_whole'
  root.mkdir(parents=True)
  (root / 'README.txt').write_text('not a synset')
  expected, bad = [], None
  for synset, kind in SYNSETS.items():
    label = sorted(SYNSETS).index(synset)
    files = {}
    for i in range(NUM_PER_SYNSET):
      mode = {('n01000001', 1): 'L', ('n03000003', 2): 'CMYK'}.get((synset, i), 'RGB')
      color = _color(label, i)
      if mode == 'L':
        color = (round(0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]),) * 3
      files[f'{synset}_{i}.JPEG'] = _jpeg(color, mode)
      expected.append((label, color))
    if corrupt and synset == 'n04000004':
      good = files[f'{synset}_0.JPEG']
      files[f'{synset}_bad.JPEG'] = good[: len(good) // 2]
      bad = f'{root / (synset + ".tar")}/{synset}_bad.JPEG'
    if kind == 'folder':
      (root / synset).mkdir()
      for name, raw in files.items():
        (root / synset / name).write_bytes(raw)
    else:
      with tarfile.open(root / f'{synset}.tar', 'w') as tar:
        prefix = './' if synset == 'n03000003' else ''  # Some tars name members './x'.
        for name, raw in files.items():
          _add(tar, prefix + name, raw)
        _add(tar, 'notes.txt', b'ignored')
  return expected, bad


def _examples(split, data_dir):
  ds = data.get_dataset(
    'imagenet21k',
    split,
    preprocess='decode',
    train=False,
    global_batch_size=4,
    data_dir=data_dir,
    **KW,
  )
  out = []
  for batch in ds:
    for image, label, mask in zip(batch['image'], batch['label'], batch['mask']):
      if mask:
        assert image.shape == (12, 16, 3) and image.dtype == np.uint8
        out.append((int(label), tuple(image.reshape(-1, 3).mean(0))))
  return out


def test_prepare_and_read_every_example_once(tmp_path):
  expected, _ = _fake_winter21(tmp_path / 'manual')
  data_dir = str(tmp_path / 'tfds')
  builder = data.prepare_imagenet21k(data_dir, manual_dir=str(tmp_path / 'manual'))
  assert builder.info.features['label'].names == sorted(SYNSETS)
  num_classes, names, sizes = data.get_dataset_info('imagenet21k', data_dir)
  assert (num_classes, names) == (4, sorted(SYNSETS))
  assert sizes == {'full': 4 * NUM_PER_SYNSET}

  examples = _examples('full', data_dir)
  assert len(examples) == len(expected)
  remaining = list(expected)
  for label, mean in examples:  # Each example matches exactly one expected image, by colour.
    distances = [np.abs(np.subtract(mean, color)).max() for _, color in remaining]
    best = int(np.argmin(distances))
    assert distances[best] < 8, (label, mean, remaining)
    assert remaining.pop(best)[0] == label
  assert not remaining
  # Grayscale and CMYK JPEGs decode to RGB (checked above via their colours); sliced splits work.
  assert _examples('full[2:]', data_dir) == examples[2:]
  assert len(_examples('full[:5]', data_dir)) == 5
  # Original bytes are kept for RGB JPEGs; the CMYK one became an RGB JPEG.
  records = {
    r['file_name'].decode(): r['image']
    for r in builder.as_dataset(
      split='full', decoders={'image': tfds.decode.SkipDecoding()}
    ).as_numpy_iterator()
  }
  root = tmp_path / 'manual' / 'winter21_whole'
  assert (
    records['n02000002/n02000002_0.JPEG'] == (root / 'n02000002' / 'n02000002_0.JPEG').read_bytes()
  )
  assert records['n01000001/n01000001_0.JPEG'] == _jpeg(_color(0, 0))
  cmyk = records['n03000003/n03000003_2.JPEG']
  assert cmyk != _jpeg(_color(2, 2), 'CMYK') and Image.open(io.BytesIO(cmyk)).mode == 'RGB'


def test_corrupt_tar_member_is_named_at_prepare_time(tmp_path):
  _, bad = _fake_winter21(tmp_path / 'manual', corrupt=True)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(ValueError, match='1 corrupt') as error:
    data.prepare_imagenet21k(data_dir, manual_dir=str(tmp_path / 'manual'))
  assert bad in str(error.value)
  assert '_0.JPEG' not in str(error.value)
  with pytest.raises(FileNotFoundError, match='not prepared'):  # Nothing half-prepared.
    data.get_dataset_info('imagenet21k', data_dir)
  builder = data.prepare_imagenet21k(
    data_dir, manual_dir=str(tmp_path / 'manual'), skip_corrupt=True
  )
  assert builder.info.splits['full'].num_examples == 4 * NUM_PER_SYNSET
  assert len(builder.corrupt_files) == 1 and bad in builder.corrupt_files[0]


def test_missing_manual_files_error_names_the_path(tmp_path):
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  where = os.path.join(str(data_dir), 'downloads', 'manual', 'winter21_whole')
  with pytest.raises(FileNotFoundError) as error:
    data.get_dataset(
      'imagenet21k',
      'full[102400:]',
      preprocess='decode',
      train=True,
      global_batch_size=8,
      data_dir=str(data_dir),
      **KW,
    )
  message = str(error.value)
  assert where in message and 'winter21_whole.tar.gz' in message and 'nXXXXXXXX.tar' in message
  assert 'prepare_imagenet21k' in message
  with pytest.raises(FileNotFoundError, match='winter21_whole'):
    data.prepare_imagenet21k(str(data_dir), manual_dir=str(tmp_path / 'elsewhere'))
  # Files in place but not prepared: the error asks for the explicit preparation.
  _fake_winter21(data_dir / 'downloads' / 'manual')
  with pytest.raises(FileNotFoundError, match='4 synsets.*prepare_imagenet21k'):
    data.get_dataset_info('imagenet21k', str(data_dir))
