"""`python -m vit_jax.predict`: image files -> top-k labels from an .npz checkpoint."""

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import models, npz, predict


def test_predict_cli_prints_top_k_labels_matching_the_model(tmp_path, capsys):
  model = models.get_model('testing', num_classes=4, head_zero_init=False)
  params = models.init_params(model, jax.random.key(0), 32)
  npz.save(params, str(tmp_path / 'ckpt.npz'))
  (tmp_path / 'labels.txt').write_text('cat\ndog\nbird\nfish\n')
  rng = np.random.RandomState(0)
  paths = []
  for i, mode in enumerate(['RGB', 'L']):  # Grayscale is converted to RGB.
    path = tmp_path / f'img{i}.png'
    Image.fromarray(
      rng.randint(0, 255, (40, 50, 3) if mode == 'RGB' else (40, 50), np.uint8), mode
    ).save(path)
    paths.append(str(path))
  predict.main(
    [
      '--model',
      'testing',
      '--checkpoint',
      str(tmp_path / 'ckpt.npz'),
      '--labels',
      str(tmp_path / 'labels.txt'),
      '--image_size',
      '32',
      '--top_k',
      '2',
      *paths,
    ]
  )
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == paths[0] and len(lines) == 6
  images = predict.load_images(paths, 32)
  assert images.shape == (2, 32, 32, 3) and images.min() >= -1 and images.max() <= 1
  logits = np.asarray(model.apply({'params': params}, images, train=False))
  best = ['cat', 'dog', 'bird', 'fish'][int(np.argmax(logits[0]))]
  assert lines[1].endswith(best)


def test_predict_reports_unreadable_images_and_label_mismatch(tmp_path):
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
  with pytest.raises(ValueError, match='broken.jpg'):
    predict.load_images([str(tmp_path / 'broken.jpg')], 32)
  (tmp_path / 'labels.txt').write_text('a\nb\n')
  with pytest.raises(ValueError, match='has 2 labels but the checkpoint has 3'):
    predict.label_names(str(tmp_path / 'labels.txt'), 3)
