"""The model options (docs/models.md) against the implementations that define them.

Golden files (tests/golden/options_*, made by tools/make_option_goldens.py): big_vision's
`posemb_sincos_2d` and its ViT's logits (sincos2d, gap); timm's VisionTransformer logits
(registers, LayerScale, QK-norm, patch dropout in eval) and `param_groups_layer_decay` lr scales,
on the same weights. The `torch`-marked tests repeat the timm comparison live where timm imports.
"""

import json
import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax import config as config_lib
from vit_jax import models, npz, optim
from vit_jax.models import vit

# The small model and the timm cases are the golden generator's own: the files describe them.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'tools'))
from make_option_goldens import BASE, TIMM_CASES  # noqa: E402

sys.path.pop(0)

OFF = dict(posemb='learn', num_registers=0, layer_scale=None, qk_norm=False, patch_dropout=0.0)
ALL_ON = dict(posemb='sincos2d', num_registers=2, layer_scale=0.1, qk_norm=True, patch_dropout=0.5)


def _golden(golden_dir, name):
  with np.load(golden_dir / name, allow_pickle=False) as f:
    return dict(f)


def _case_params(golden: dict, case: str) -> dict:
  prefix = f'{case}/params/'
  flat = {tuple(k[len(prefix) :].split('/')): v for k, v in golden.items() if k.startswith(prefix)}
  return flax.traverse_util.unflatten_dict(flat)


def _model(params, **options):
  model = models.get_model(BASE, 10, image_size=16, **options)
  return npz.load_into(model, params)


# --- sincos2d vs big_vision ----------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(14, 14, 384), (12, 20, 128)])
def test_sincos2d_table_equals_big_vision(golden_dir, shape):
  expected = _golden(golden_dir, 'options_bigvision.npz')['sincos_{}x{}x{}'.format(*shape)]
  ours = vit.posemb_sincos_2d(*shape)
  assert ours.shape == expected.shape == (1, shape[0] * shape[1], shape[2])
  np.testing.assert_allclose(ours, expected, atol=2e-6)


def test_sincos2d_gap_logits_equal_big_vision(golden_dir):
  golden = _golden(golden_dir, 'options_bigvision.npz')
  params = _case_params(golden, 'sincos2d_gap')
  assert 'posembed_input' not in params['Transformer']  # No parameter stored.
  model = _model(params, posemb='sincos2d', classifier='gap')
  np.testing.assert_allclose(model(golden['images']), golden['sincos2d_gap/logits'], atol=1e-5)


def test_sincos2d_any_image_size_and_width_check():
  model = models.get_model(BASE, 10, image_size=(16, 24), posemb='sincos2d', classifier='gap')
  assert model(jnp.zeros((1, 16, 24, 3))).shape == (1, 10)
  with pytest.raises(ValueError, match='divisible by 4'):
    models.get_model('testing', 10, image_size=16, patches=(4, 4), posemb='sincos2d')
  with pytest.raises(ValueError, match='unknown posemb'):
    models.get_model(BASE, 10, image_size=16, posemb='rope')


# --- registers, LayerScale, QK-norm, patch dropout vs timm ---------------------------------------


@pytest.mark.parametrize('case', list(TIMM_CASES))
def test_options_equal_timm_logits(golden_dir, case):
  golden = _golden(golden_dir, 'options_timm.npz')
  model = _model(_case_params(golden, case), **TIMM_CASES[case])
  np.testing.assert_allclose(model(golden['images']), golden[f'{case}/logits'], atol=1e-5)


def test_layer_decay_multipliers_equal_timm_for_every_parameter(golden_dir):
  with open(golden_dir / 'options_timm_layer_decay.json') as f:
    golden = json.load(f)
  decay, expected = golden['layer_decay'], golden['lr_scale']
  for scan in (False, True):
    model = models.abstract_model(BASE, 10, image_size=16, scan_layers=scan, **TIMM_CASES['all'])
    params = models.params_of(model)
    mults = optim.layer_decay_multipliers(params, decay)
    if scan:
      mults = npz.unscan_params(
        jax.tree.map(lambda m, p: np.broadcast_to(m, p.shape)[..., None], mults, params)
      )
      mults = jax.tree.map(lambda m: m.reshape(-1)[0], mults)
    flat = {'/'.join(k): float(v) for k, v in flax.traverse_util.flatten_dict(mults).items()}
    assert set(flat) == set(expected)
    for name, scale in expected.items():
      assert flat[name] == pytest.approx(scale, rel=1e-6), (scan, name)


# --- off by default; training-only patch dropout --------------------------------------------------


def test_options_off_are_the_released_model_bit_for_bit():
  images = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  ref = models.get_model('ViT-Quick', 10, image_size=16)
  off = models.get_model('ViT-Quick', 10, image_size=16, **OFF)
  assert jax.tree.map(np.shape, models.params_of(ref)) == jax.tree.map(
    np.shape, models.params_of(off)
  )
  np.testing.assert_array_equal(off(images), ref(images))
  ref.train(), off.train()
  key = jax.random.key(3)
  np.testing.assert_array_equal(off(images, rng=key), ref(images, rng=key))


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
def test_patch_dropout_is_identity_in_eval_and_drops_in_training(classifier):
  images = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  kw = dict(classifier=classifier, num_registers=2, head_zero_init=False)
  plain = models.get_model(BASE, 10, image_size=16, **kw)
  dropped = models.get_model(BASE, 10, image_size=16, patch_dropout=0.5, **kw)
  np.testing.assert_array_equal(dropped(images), plain(images))
  # In training the encoder sees 1 + 2 + 8 tokens (class token, registers, half of 16 patches).
  dropped.train()
  seen = []
  block = dropped.Transformer.encoderblock_0
  original = type(block).__call__

  def spy(self, x, *args, **kwargs):
    seen.append(x.shape[1])
    return original(self, x, *args, **kwargs)

  type(block).__call__ = spy
  try:
    out = dropped(images, rng=jax.random.key(0))
  finally:
    type(block).__call__ = original
  assert seen[0] == (classifier == 'token') + 2 + 8
  assert out.shape == (2, 10) and not np.allclose(out, plain(images))


def test_drop_patches_keeps_prefix_and_a_subset_in_order():
  x = jnp.arange(2 * 7 * 1, dtype=jnp.float32).reshape(2, 7, 1)
  y = np.asarray(vit.drop_patches(x, 2, 0.6, jax.random.key(0)))[..., 0]
  assert y.shape == (2, 4)  # 2 prefix + max(1, int(5 * 0.4)) = 2 patches.
  for row, out in zip(np.asarray(x)[..., 0], y):
    assert list(out[:2]) == list(row[:2])
    assert set(out[2:]) <= set(row[2:]) and list(out[2:]) == sorted(out[2:])


def test_patch_dropout_refuses_unpooled():
  with pytest.raises(ValueError, match='patch_dropout'):
    models.get_model('testing-unpooled', 10, image_size=16, patches=(4, 4), patch_dropout=0.5)


# --- scan, remat, bf16, npz ----------------------------------------------------------------------


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_all_options_scanned_remat_equal_unscanned(classifier):
  images = np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  kw = dict(ALL_ON, classifier=classifier, head_zero_init=False)
  flat = models.get_model(BASE, 10, image_size=16, **kw)
  params = models.params_of(flat)
  scanned = models.get_model(BASE, 10, image_size=16, scan_layers=True, remat_policy='full', **kw)
  npz.load_into(scanned, params)
  np.testing.assert_allclose(scanned(images), flat(images), atol=1e-5)

  def loss(model, rng):
    return jnp.mean(model(images, rng=rng) ** 2)

  flat.train(), scanned.train()
  key = jax.random.key(5)
  g_flat = nnx.grad(loss)(flat, key)
  g_scan = nnx.grad(loss)(scanned, key)
  g_scan = npz.unscan_params(nnx.state(g_scan, nnx.Param).to_pure_dict())
  # Float32 noise, relative to each gradient's scale (some entries are in the hundreds).
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max())),
    g_scan,
    nnx.state(g_flat, nnx.Param).to_pure_dict(),
  )


def test_all_options_bfloat16_close_to_float32():
  images = np.random.RandomState(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  f32 = models.get_model(BASE, 10, image_size=16, head_zero_init=False, **ALL_ON)
  bf16 = models.get_model(BASE, 10, image_size=16, head_zero_init=False, dtype='bfloat16', **ALL_ON)
  npz.load_into(bf16, models.params_of(f32))
  out = bf16(images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, f32(images), atol=0.1)


@pytest.mark.parametrize('scan', [False, True])
def test_npz_round_trip_with_new_parameters(tmp_path, scan):
  kw = dict(ALL_ON, posemb='learn', head_zero_init=False)
  model = models.get_model(BASE, 10, image_size=16, scan_layers=scan, **kw)
  path = str(tmp_path / 'm.npz')
  npz.save(models.params_of(model), path)
  keys = set(npz.load_flat(path))
  assert {
    'registers',
    'Transformer/encoderblock_1/layerscale_attention',
    'Transformer/encoderblock_1/layerscale_mlp',
    'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query_norm/scale',
    'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key_norm/bias',
    'Transformer/posembed_input/pos_embedding',
  } <= keys
  again = models.get_model(BASE, 10, image_size=16, scan_layers=scan, rngs=nnx.Rngs(9), **kw)
  npz.load_into(again, path)
  jax.tree.map(np.testing.assert_array_equal, models.params_of(again), models.params_of(model))


def test_config_fields_reach_the_model():
  c = config_lib.base_config()
  c.model_name = 'ViT-Quick'
  c.model.update(posemb='sincos2d', num_registers=4, layer_scale=1e-4, qk_norm=True,
                 patch_dropout=0.25)  # fmt: skip
  kwargs = config_lib.model_kwargs(c)
  assert {k: kwargs[k] for k in ALL_ON} == dict(
    posemb='sincos2d', num_registers=4, layer_scale=1e-4, qk_norm=True, patch_dropout=0.25
  )
  model = models.abstract_model('ViT-Quick', 10, image_size=16, **kwargs)
  assert model.registers.shape == (1, 4, 64)
  assert 'patch_dropout' in config_lib.RESUME_MODEL_FREE
  # Off values are dropped for a Mixer, as the other encoder knobs.
  c.model_name = 'Mixer-B_16'
  c.model.update(posemb='learn', num_registers=0, layer_scale=None, qk_norm=False,
                 patch_dropout=0.0)  # fmt: skip
  assert not set(ALL_ON) & set(config_lib.model_kwargs(c))


# --- live timm (torch marker) ---------------------------------------------------------------------


def _timm():
  try:
    import timm  # noqa: F401
    import torch
  except Exception as e:  # timm needs a torchvision that matches torch; skip otherwise.
    pytest.skip(f'timm not importable here: {type(e).__name__}: {e}')
  return torch


@pytest.mark.torch
@pytest.mark.parametrize('case', list(TIMM_CASES))
def test_options_equal_live_timm(golden_dir, case):
  torch = _timm()
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / 'tools' / 'make_option_goldens.py'
  spec = importlib.util.spec_from_file_location('make_option_goldens', path)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  options = TIMM_CASES[case]
  params = tool.noisy_params(7, **options)
  theirs = tool.timm_model(options)
  state = {
    k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tool.to_timm(params, options).items()
  }
  theirs.load_state_dict(state, strict=True)
  images = np.random.RandomState(3).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(_model(params, **options)(images), expected, atol=1e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_fine_tuning_a_released_checkpoint_into_a_model_with_options(golden_dir, tmp_path, scan):
  """The released weights load; registers, LayerScale and QK-norm keep their fresh init, and a
  sincos2d target drops the learned position table."""
  path = str(golden_dir / 'testing_rep16_ref.npz')
  released = npz.load(path)
  kw = dict(num_registers=2, layer_scale=0.1, qk_norm=True)
  model = models.get_model('testing', 10, image_size=32, scan_layers=scan, **kw)
  fresh = models.params_of(model)
  params = npz.unscan_params(models.params_of(npz.load_pretrained(model, path)))
  block = params['Transformer']['encoderblock_0']
  np.testing.assert_array_equal(
    block['MlpBlock_3']['Dense_0']['kernel'],
    released['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'],
  )
  np.testing.assert_allclose(block['layerscale_attention'], 0.1)
  np.testing.assert_array_equal(params['registers'], fresh['registers'])
  np.testing.assert_array_equal(block['MultiHeadDotProductAttention_1']['query_norm']['scale'], 1)
  # A learned-posemb checkpoint into a sincos2d model: the table is dropped, the rest loads.
  learned = models.get_model(BASE, 10, image_size=16, scan_layers=scan, head_zero_init=False)
  npz.save(models.params_of(learned), str(tmp_path / 'learned.npz'))
  sincos = models.get_model(BASE, 10, image_size=16, scan_layers=scan, posemb='sincos2d')
  params = models.params_of(npz.load_pretrained(sincos, str(tmp_path / 'learned.npz')))
  assert 'posembed_input' not in params['Transformer']
  np.testing.assert_array_equal(
    params['embedding']['kernel'], models.params_of(learned)['embedding']['kernel']
  )
