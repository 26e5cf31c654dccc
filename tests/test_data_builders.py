"""Datasets: image folders (formats, corrupt files), TFDS errors, ImageNet via tfds mock_data."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import data

KW = dict(process_index=0, process_count=1)


def _image(seed, size=(12, 10)):
  return np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)


def test_folder_of_mixed_formats_becomes_rgb_dataset(tmp_path):
  root = tmp_path / 'pets'
  (root / 'cat').mkdir(parents=True)
  (root / 'dog').mkdir()
  Image.fromarray(_image(0)).save(root / 'cat' / 'a.jpg', quality=90)
  Image.fromarray(_image(1)).convert('L').save(root / 'cat' / 'b.JPEG')
  Image.fromarray(_image(2)).convert('RGBA').save(root / 'cat' / 'c.png')
  Image.fromarray(_image(3)).save(root / 'dog' / 'd.bmp')
  Image.fromarray(_image(4)).convert('P').save(root / 'dog' / 'e.gif')
  Image.fromarray(_image(5)).convert('LA').save(root / 'dog' / 'f.png')
  (root / 'dog' / 'notes.txt').write_text('not an image')
  data_dir = str(tmp_path / 'tfds')
  num_classes, names, sizes = data.get_dataset_info(f'folder:{root}', data_dir)
  assert (num_classes, names) == (2, ['cat', 'dog'])
  assert sizes['train'] + sizes['validation'] == 6 and sizes['validation'] == 2  # 1 per class
  images, labels = [], []
  for split in ('train', 'validation'):
    ds = data.get_dataset(
      f'folder:{root}',
      split,
      preprocess='decode',
      train=False,
      global_batch_size=1,
      data_dir=data_dir,
      **KW,
    )
    for batch in ds:
      images.append(batch['image'][0])
      labels.append(int(batch['label'][0]))
  assert sorted(labels) == [0, 0, 0, 1, 1, 1]
  assert all(image.shape == (12, 10, 3) and image.dtype == np.uint8 for image in images)
  # Lossless formats keep their pixels exactly (RGBA: alpha dropped; BMP: as is).
  exact = [_image(2), _image(3)]
  assert all(any(np.array_equal(e, image) for image in images) for e in exact)


def test_corrupt_files_are_named_at_prepare_time(tmp_path):
  root = tmp_path / 'images'
  (root / 'a').mkdir(parents=True)
  (root / 'b').mkdir()
  for i in range(3):
    Image.fromarray(_image(i, (64, 64))).save(root / 'a' / f'{i}.jpg', quality=90)
    Image.fromarray(_image(i)).save(root / 'b' / f'{i}.png')
  good = (root / 'a' / '0.jpg').read_bytes()
  (root / 'a' / 'truncated.jpg').write_bytes(good[: len(good) // 2])
  (root / 'b' / 'garbage.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 50)
  with pytest.raises(ValueError, match='2 corrupt') as error:
    data.prepare_folder(str(root), str(tmp_path / 'tfds'))
  message = str(error.value)
  assert str(root / 'a' / 'truncated.jpg') in message
  assert str(root / 'b' / 'garbage.png') in message
  assert '0.jpg' not in message.replace('truncated.jpg', '')
  assert 'BytesIO' not in message and ' at 0x' not in message  # Files named, no object reprs.
  assert not (tmp_path / 'tfds').exists()  # Nothing left behind by the failed preparation.
  with pytest.raises(ValueError, match='corrupt'):  # Nothing half-prepared is picked up.
    data.get_dataset(
      f'folder:{root}',
      'train',
      preprocess='decode',
      train=True,
      global_batch_size=1,
      data_dir=str(tmp_path / 'tfds'),
      **KW,
    )


def test_any_format_pil_reads_and_skipped_files_counted_in_one_line(tmp_path, caplog):
  root = tmp_path / 'photos'
  for name in ('a', 'b'):
    (root / name).mkdir(parents=True)
    Image.fromarray(_image(0)).save(root / name / 'x.webp', lossless=True)
    Image.fromarray(_image(1)).save(root / name / 'y.tif')
  (root / 'a' / 'notes.txt').write_text('not an image')
  (root / 'b' / 'more.txt').write_text('not an image')
  (root / 'b' / 'scan.xyz').write_text('not an image')
  with caplog.at_level('WARNING'):
    num_classes, _, sizes = data.get_dataset_info(f'folder:{root}', str(tmp_path / 'tfds'))
  assert num_classes == 2 and sizes['train'] + sizes['validation'] == 4  # .webp and .tif kept.
  (line,) = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
  assert line.endswith('skipped 3 files that are not images PIL reads: 2 .txt, 1 .xyz')


def test_folder_structure_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.prepare_folder(str(tmp_path / 'nope'), str(tmp_path))
  (tmp_path / 'flat').mkdir()
  Image.fromarray(_image(0)).save(tmp_path / 'flat' / 'x.png')
  with pytest.raises(ValueError, match='no class subfolders'):
    data.prepare_folder(str(tmp_path / 'flat'), str(tmp_path))
  (tmp_path / 'flat' / 'empty').mkdir()
  with pytest.raises(ValueError, match=r"Class folder .*flat/empty' contains no images"):
    data.prepare_folder(str(tmp_path / 'flat'), str(tmp_path))


def test_unprepared_tfds_datasets_say_what_to_do(tmp_path):
  kw = dict(preprocess='decode', train=False, global_batch_size=8, data_dir=str(tmp_path), **KW)
  with pytest.raises(FileNotFoundError) as error:
    data.get_dataset('imagenet2012', 'validation', **kw)
  message = str(error.value)
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
  assert 'tfds build imagenet2012' in message
  with pytest.raises(FileNotFoundError, match=r'not prepared .*tfds build cifar10 --data_dir='):
    data.get_dataset('cifar10', 'test', **kw)


def _write_split_metadata(name, data_dir, sizes):
  """Writes a TFDS dataset's real metadata (features, class names) plus split sizes where TFDS
  looks for it, so that tfds.testing.mock_data(policy=USE_FILES) knows the splits."""
  builder = tfds.builder(name, data_dir=data_dir)
  template = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
  splits = [
    tfds.core.SplitInfo(
      name=split,
      shard_lengths=[n],
      num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir,
        dataset_name=name,
        split=split,
        filetype_suffix='tfrecord',
        template=template,
      ),
    )
    for split, n in sizes.items()
  ]
  builder.info.set_splits(tfds.core.SplitDict(splits))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


@pytest.fixture
def mock_imagenet(tmp_path):
  """tfds.testing.mock_data for imagenet2012 (real features and 1000 class names), 24 validation
  and 48 train examples; mock_data yields 24 random examples for any split."""
  _write_split_metadata('imagenet2012', str(tmp_path), {'validation': 24, 'train': 48})
  _write_split_metadata('imagenet2012_real', str(tmp_path), {'validation': 24})
  with tfds.testing.mock_data(
    num_examples=24, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)
  ):
    yield str(tmp_path)


def test_imagenet_path_with_tfds_mock_data(mock_imagenet):
  num_classes, names, sizes = data.get_dataset_info('imagenet2012', mock_imagenet)
  assert num_classes == 1000 and names[:2] == ['n01440764', 'n01443537']
  assert sizes == {'validation': 24, 'train': 48}
  pre = {  # AugReg's strings at 32.
    'train_pp': 'decode_jpeg_and_inception_crop(32)|flip_lr|randaug(2,15)|onehot(1000)'
    '|value_range(-1,1)',
    'eval_pp': 'decode|resize_small(37)|central_crop(32)|value_range(-1,1)',
  }
  ds = data.get_dataset(
    'imagenet2012',
    'validation',
    preprocess=pre['eval_pp'],
    train=False,
    global_batch_size=10,
    data_dir=mock_imagenet,
    **KW,
  )
  batches = list(ds)
  assert ds.num_batches == len(batches) == 3 and ds.num_examples == 24
  assert sum(int(b['mask'].sum()) for b in batches) == 24
  assert batches[0]['image'].shape == (10, 32, 32, 3)
  assert all(b['image'].dtype == np.uint8 for b in batches)
  assert all(0 <= b['label'].min() and b['label'].max() < 1000 for b in batches)
  train = data.get_dataset(
    'imagenet2012',
    'train',
    preprocess=pre['train_pp'],
    train=True,
    global_batch_size=8,
    data_dir=mock_imagenet,
    **KW,
  )
  it = iter(train)
  first = [next(it) for _ in range(4)]
  assert first[0]['image'].shape == (8, 32, 32, 3) and first[0]['labels'].shape == (8, 1000)
  np.testing.assert_allclose(first[3]['labels'].sum(1), 1, atol=1e-5)
  resumed = next(
    iter(
      data.get_dataset(
        'imagenet2012',
        'train',
        preprocess=pre['train_pp'],
        train=True,
        global_batch_size=8,
        data_dir=mock_imagenet,
        start_batch=3,
        **KW,
      )
    )
  )
  np.testing.assert_array_equal(resumed['image'], first[3]['image'])


def test_imagenet_real_labels_with_tfds_mock_data(mock_imagenet):
  ds = data.get_dataset(
    'imagenet2012_real',
    'validation',
    preprocess='decode|resize(16)',
    train=False,
    global_batch_size=8,
    data_dir=mock_imagenet,
    **KW,
  )
  assert ds.num_classes == 1000 and ds.num_batches == 3
  batch = next(iter(ds))
  real = batch['real_labels']
  assert real.shape == (8, 1000) and set(np.unique(real)) <= {0.0, 1.0}
  assert 0 <= batch['label'].min() and batch['label'].max() < 1000  # original_label
