"""Original-format checkpoints: golden logits, exact round trips, fine-tuning init, resizing."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models, npz


def _golden_model(**overrides):
  return models.get_model('testing', num_classes=10, representation_size=16, **overrides)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_golden_checkpoint_reproduces_original_logits(golden_dir, scan_layers):
  path = str(golden_dir / 'testing_rep16_ref.npz')
  model = npz.load_into(_golden_model(scan_layers=scan_layers), path)
  images = np.load(golden_dir / 'input_224.npy', allow_pickle=False)
  expected = np.load(golden_dir / 'logits_testing_rep16_224.npy', allow_pickle=False)
  np.testing.assert_allclose(np.asarray(model(images)), expected, atol=1e-5, rtol=0)
  logits = jax.jit(models.functional(model))(models.params_of(model), images)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def _assert_same_npz(path_a, path_b):
  with np.load(path_a, allow_pickle=False) as a, np.load(path_b, allow_pickle=False) as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      assert a[key].dtype == b[key].dtype, key
      assert a[key].shape == b[key].shape, key
      assert a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize('scan_layers', [False, True])
def test_vit_round_trip_is_bit_exact(golden_dir, tmp_path, scan_layers):
  src = str(golden_dir / 'testing_rep16_ref.npz')
  npz.save(npz.load(src), str(tmp_path / 'tree.npz'))
  _assert_same_npz(src, tmp_path / 'tree.npz')
  model = npz.load_into(_golden_model(scan_layers=scan_layers), src)
  npz.save(model, str(tmp_path / 'model.npz'))
  _assert_same_npz(src, tmp_path / 'model.npz')


def _released_style_file(model, path, image_size=64, seed=0):
  """Writes random params of `model` under the released layout rules, by hand (not via save)."""
  params = models.params_of(model)
  rng = np.random.RandomState(seed)
  flat = {}
  for keys, value in flax.traverse_util.flatten_dict(params).items():
    value = rng.normal(size=value.shape).astype(np.float32)
    if len(keys) > 1 and keys[-2].startswith('gn'):
      value = value.reshape(1, 1, 1, -1)  # How the released hybrid files store GroupNorm.
    flat['/'.join(keys)] = value
  np.savez(path, **flat)
  return flat


@pytest.mark.parametrize('family', ['hybrid', 'mixer'])
def test_hybrid_and_mixer_round_trip_is_bit_exact(family, tmp_path):
  if family == 'hybrid':
    model = models.get_model(
      'R50+ViT-B_16',
      num_classes=4,
      image_size=64,
      hidden_size=32,
      transformer=dict(mlp_dim=32, num_heads=2, num_layers=2),
    )
  else:
    model = models.get_model(
      'Mixer-B_16',
      num_classes=4,
      image_size=64,
      hidden_dim=16,
      num_blocks=2,
      tokens_mlp_dim=8,
      channels_mlp_dim=8,
    )
  src = tmp_path / 'src.npz'
  flat = _released_style_file(model, src)
  params = npz.load(str(src))
  if family == 'hybrid':
    assert params['gn_root']['scale'].shape == (64,)  # Squeezed for our modules.
    assert flat['gn_root/scale'].shape == (1, 1, 1, 64)
  logits = npz.load_into(model, str(src))(jnp.zeros((1, 64, 64, 3)))
  assert np.all(np.isfinite(logits))
  npz.save(params, str(tmp_path / 'out.npz'))
  _assert_same_npz(src, tmp_path / 'out.npz')
  npz.save(model, str(tmp_path / 'model.npz'))
  _assert_same_npz(src, tmp_path / 'model.npz')


def test_remote_filesystem_paths_go_through_gfile(golden_dir):
  tf = pytest.importorskip('tensorflow')
  src = str(golden_dir / 'testing_rep16_ref.npz')
  remote = 'ram://vit_jax_test/ckpt.npz'  # TF's in-memory filesystem stands in for gs://.
  npz.save(npz.load(src), remote)
  assert tf.io.gfile.exists(remote)
  restored = npz.load(remote)
  jax.tree.map(np.testing.assert_array_equal, restored, npz.load(src))


def test_save_is_atomic_and_leaves_no_partial_file(tmp_path, monkeypatch):
  path = tmp_path / 'ckpt.npz'
  params = {'head': {'kernel': np.ones((2, 3), np.float32)}}
  npz.save(params, str(path))

  def crash(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(np, 'savez', crash)
  with pytest.raises(OSError, match='disk full'):
    npz.save({'head': {'kernel': np.zeros((2, 3), np.float32)}}, str(path))
  assert os.listdir(tmp_path) == ['ckpt.npz']
  np.testing.assert_array_equal(npz.load(str(path))['head']['kernel'], 1)


def test_bad_files_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    npz.load(str(tmp_path / 'missing.npz'))
  (tmp_path / 'corrupt.npz').write_bytes(b'PK\x03\x04 truncated')
  with pytest.raises(ValueError, match='corrupt.npz.*not a readable .npz'):
    npz.load(str(tmp_path / 'corrupt.npz'))
  np.savez(tmp_path / 'pickled.npz', obj=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match='pickled'):
    npz.load(str(tmp_path / 'pickled.npz'))


def test_mismatch_error_lists_every_problem(golden_dir):
  path = str(golden_dir / 'testing_rep16_ref.npz')
  model = models.get_model(
    'testing',
    num_classes=10,
    hidden_size=12,
    transformer=dict(mlp_dim=10, num_heads=2, num_layers=2),
  )
  with pytest.raises(npz.CheckpointMismatchError) as info:
    npz.pretrained_params(path, models.params_of(model), model_name='my-model')
  message = str(info.value)
  assert path in message and "'my-model'" in message
  # The first line alone says what is wrong and which registered variant the file is.
  first = message.splitlines()[0]
  assert 'shape mismatch: Transformer/encoder_norm/bias: checkpoint (10,) vs model (12,)' in first
  assert 'the checkpoint fits testing' in first
  with pytest.raises(npz.CheckpointMismatchError, match="'testing'"):
    npz.load_pretrained(model, path)
  with pytest.raises(npz.CheckpointMismatchError, match='embedding/kernel'):
    npz.load_into(model, path)
  assert 'missing in checkpoint: Transformer/encoderblock_1/LayerNorm_0/scale' in message
  assert (
    'shape mismatch: embedding/kernel: checkpoint (16, 16, 3, 10) vs model (16, 16, 3, 12)'
    in (message)
  )


def test_load_pretrained_new_head_drops_pre_logits_and_resizes_to_384(golden_dir):
  path = str(golden_dir / 'testing_rep16_ref.npz')
  ref = npz.load(path)
  model = models.get_model('testing', num_classes=37, image_size=384, head_zero_init=False)
  init = models.params_of(model)
  npz.load_pretrained(model, path)
  params = models.params_of(model)
  assert 'pre_logits' not in params
  np.testing.assert_array_equal(params['head']['kernel'], init['head']['kernel'])
  np.testing.assert_array_equal(params['embedding']['kernel'], ref['embedding']['kernel'])
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 24 * 24, 10)
  old = ref['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(posemb[:, 0], old[:, 0])  # Class token kept.
  # Corner-aligned: the four corner embeddings are the old corners.
  new_grid, old_grid = posemb[0, 1:].reshape(24, 24, 10), old[0, 1:].reshape(14, 14, 10)
  for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
    np.testing.assert_allclose(new_grid[i, j], old_grid[i, j], rtol=1e-6)
  assert model(jnp.zeros((1, 384, 384, 3))).shape == (1, 37)


def test_load_pretrained_keeps_pre_logits_when_target_has_one(golden_dir):
  path = str(golden_dir / 'testing_rep16_ref.npz')
  params = npz.pretrained_params(path, models.params_of(_golden_model()))
  np.testing.assert_array_equal(
    params['pre_logits']['kernel'], npz.load(path)['pre_logits']['kernel']
  )


def test_load_pretrained_into_scanned_model(golden_dir):
  path = str(golden_dir / 'testing_rep16_ref.npz')
  model = npz.load_pretrained(_golden_model(scan_layers=True), path)
  model.head.kernel[...] = npz.load(path)['head']['kernel']
  model.head.bias[...] = npz.load(path)['head']['bias']
  images = np.load(golden_dir / 'input_224.npy', allow_pickle=False)
  expected = np.load(golden_dir / 'logits_testing_rep16_224.npy', allow_pickle=False)
  np.testing.assert_allclose(np.asarray(model(images)), expected, atol=1e-5)


def test_posemb_resize_is_corner_aligned_bilinear():
  # A position embedding linear in (row, col) stays exactly linear under corner-aligned bilinear
  # resizing: new[i, j] = old at (i * (g-1)/(n-1), j * (g-1)/(n-1)).
  g, n, d = 7, 12, 3
  rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing='ij')
  grid = np.stack([rows, cols, rows + 2 * cols], -1).astype(np.float32)
  posemb = np.concatenate([np.full((1, 1, d), 5.0, np.float32), grid.reshape(1, g * g, d)], 1)
  out = npz.resize_posemb(posemb, (1, 1 + n * n, d))
  new_rows, new_cols = np.meshgrid(np.arange(n), np.arange(n), indexing='ij')
  s = (g - 1) / (n - 1)
  expected = np.stack([new_rows * s, new_cols * s, (new_rows + 2 * new_cols) * s], -1)
  np.testing.assert_allclose(out[0, 1:].reshape(n, n, d), expected, atol=1e-5)
  np.testing.assert_array_equal(out[0, 0], 5.0)
  no_token = npz.resize_posemb(grid.reshape(1, g * g, d), (1, 4 * 6, d), grid_size=(4, 6))
  assert no_token.shape == (1, 24, d)


def test_patch_embedding_resize_preserves_tokens():
  # FlexiViT: embedding a patch at 16 with the old kernel equals embedding its bilinear upsampling
  # to 24 with the resized kernel (exact for upsampling, where the resize is injective).
  rng = np.random.RandomState(0)
  kernel = rng.normal(size=(16, 16, 3, 8)).astype(np.float32)
  new = npz.resize_patch_embedding(kernel, (24, 24))
  patch = rng.normal(size=(16, 16, 3)).astype(np.float32)
  up = np.asarray(jax.image.resize(patch, (24, 24, 3), method='bilinear', antialias=False))
  np.testing.assert_allclose(
    np.einsum('hwc,hwcd->d', up, new),
    np.einsum('hwc,hwcd->d', patch, kernel),
    rtol=1e-3,
    atol=1e-3,
  )


def test_load_pretrained_adapts_patch_size(golden_dir):
  path = str(golden_dir / 'testing_rep16_ref.npz')
  model = models.get_model('testing', num_classes=10, patches={'size': (8, 8)}, image_size=112)
  params = models.params_of(npz.load_pretrained(model, path))
  assert params['embedding']['kernel'].shape == (8, 8, 3, 10)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 197, 10)
