"""`python -m vit_jax.predict`: image files/folders -> top-k labels, JSON, attention rollout."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import models, npz, predict


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A 'testing' model (2 layers, random head) saved as .npz, and 3 test-made images."""
  tmp = tmp_path_factory.mktemp('predict')
  model = models.get_model(
    'testing', num_classes=4, head_zero_init=False, num_layers=2, image_size=32
  )
  params = models.params_of(model)
  npz.save(model, str(tmp / 'ckpt.npz'))
  (tmp / 'labels.txt').write_text('cat\ndog\nbird\nfish\n')
  rng = np.random.RandomState(0)
  (tmp / 'imgs' / 'sub').mkdir(parents=True)
  shapes = {'imgs/a.png': (40, 50, 3), 'imgs/sub/b.jpg': (61, 33), 'imgs/c.bmp': (32, 32, 3)}
  for name, shape in shapes.items():  # Grayscale is converted to RGB; BMP is read by PIL.
    Image.fromarray(rng.randint(0, 255, shape, np.uint8)).save(tmp / name)
  (tmp / 'imgs' / 'notes.txt').write_text('not an image')
  return tmp, model, params, shapes


def _testing_2_layers(monkeypatch):
  """`--model testing` with the 2-layer override the fixture used."""
  original = models.get_model

  def get_model(name, **kw):
    return original(name, **{**kw, 'num_layers': 2} if name == 'testing' else kw)

  monkeypatch.setattr(models, 'get_model', get_model)


def test_predict_cli_top1_matches_model_apply(checkpoint, capsys, monkeypatch):
  tmp, model, params, shapes = checkpoint
  _testing_2_layers(monkeypatch)
  args = ['--model', 'testing', '--checkpoint', str(tmp / 'ckpt.npz'), '--top_k', '2']
  predict.main([*args, '--labels', str(tmp / 'labels.txt'), '--batch_size', '2', str(tmp / 'imgs')])
  lines = capsys.readouterr().out.splitlines()
  paths = sorted(str(tmp / name) for name in shapes)  # The folder, searched recursively, sorted.
  assert [line for line in lines if not line.startswith(' ')] == paths and len(lines) == 9
  # Independent of predict's preprocessing: PIL decode + tf.image.resize, written out here.
  import tensorflow as tf

  for i, path in enumerate(paths):
    with Image.open(path) as img:
      pixels = np.asarray(img.convert('RGB'), np.float32)
    image = tf.image.resize(pixels, (32, 32), 'bilinear').numpy() / 127.5 - 1
    logits = np.asarray(model(image[None]))[0]
    best = ['cat', 'dog', 'bird', 'fish'][int(np.argmax(logits))]
    assert lines[3 * i + 1].endswith(best)


def test_predict_json_and_attention_maps(checkpoint, capsys, monkeypatch, tmp_path):
  tmp, model, params, shapes = checkpoint
  _testing_2_layers(monkeypatch)
  predict.main(
    [
      '--model', 'testing', '--checkpoint', str(tmp / 'ckpt.npz'), '--top_k', '3', '--json',
      '--attention', str(tmp_path / 'maps'), str(tmp / 'imgs' / 'a.png'), str(tmp / 'imgs' / 'sub'),
    ]
  )  # fmt: skip
  results = json.loads(capsys.readouterr().out)
  assert [r['path'] for r in results] == [str(tmp / 'imgs/a.png'), str(tmp / 'imgs/sub/b.jpg')]
  for r, name in zip(results, ['imgs/a.png', 'imgs/sub/b.jpg']):
    probs = [e['probability'] for e in r['top_k']]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    with Image.open(r['attention']) as heat:
      assert heat.size[::-1] == shapes[name][:2]  # PIL gives (width, height).


def test_rollout_grid_sums_to_one_and_heatmap_has_the_image_size(checkpoint, monkeypatch):
  tmp, model, params, _ = checkpoint
  _testing_2_layers(monkeypatch)
  from vit_jax.export import load

  loaded = load.load(str(tmp / 'ckpt.npz'), model_name='testing', image_size=32)
  images = np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  probs, classes, grids = predict.predict(loaded, images, top_k=4, attention=True)
  assert grids.shape == (2, 2, 2)  # 32 px / 16 px patches.
  np.testing.assert_allclose(np.sum(grids, axis=(1, 2)), 1, atol=1e-6)
  heat = predict.heatmap(grids[0], (45, 70))
  assert heat.shape == (45, 70) and heat.min() >= 0 and heat.max() == pytest.approx(1)
  # Same logits with and without capturing attention (the fused path is not disturbed).
  np.testing.assert_allclose(predict.predict(loaded, images, top_k=4)[0], probs, atol=1e-6)


def test_rollout_of_hand_made_attention():
  """Two layers, one head, three tokens: the product written out by hand."""
  a1 = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  a2 = np.array([[0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
  # 0.5 A + 0.5 I keeps rows summing to 1; rollout = A2' @ A1'.
  r = (0.5 * a2 + 0.5 * np.eye(3)) @ (0.5 * a1 + 0.5 * np.eye(3))
  patches = r[0, 1:] / r[0, 1:].sum()
  # Three tokens are cls + 2 patches: not a square grid; pad to cls + 4 patches with zeros.
  pad = lambda a: np.pad(a, ((0, 2), (0, 2))) + np.diag([0, 0, 0, 1, 1])
  weights = [jnp.asarray(pad(a)[None, None], jnp.float32) for a in (a1, a2)]
  grid = np.asarray(predict.attention_rollout(weights))[0]
  np.testing.assert_allclose(grid.reshape(-1)[:2], patches, atol=1e-6)
  np.testing.assert_allclose(grid.reshape(-1)[2:], 0, atol=1e-7)


def test_predict_reports_unreadable_images_label_mismatch_and_empty_folders(tmp_path):
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
  with pytest.raises(ValueError, match='broken.jpg'):
    predict.load_images([str(tmp_path / 'broken.jpg')], 32)
  (tmp_path / 'labels.txt').write_text('a\nb\n')
  from vit_jax.export import load

  with pytest.raises(ValueError, match='has 2 labels but the checkpoint has 3'):
    load.label_names(str(tmp_path / 'labels.txt'), 3)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='holds no image files'):
    predict.find_images([str(tmp_path / 'empty')])
