"""Export of the model options (docs/models.md): every format that can hold a combination writes it
and reproduces our logits; the others refuse it in one line before anything is written."""

import os

import jax
import numpy as np
import pytest
from optional import have

from vit_jax import export, models, npz
from vit_jax.export import hf, load
from vit_jax.export import onnx as onnx_export

ALL = dict(posemb='sincos2d', num_registers=2, layer_scale=0.1, qk_norm=True, patch_dropout=0.5)


def _npz(tmp_path, **options):
  """A ViT-Quick .npz with `options` (init plus noise: no zero head), and its path."""
  model = models.get_model('ViT-Quick', 3, image_size=16, head_zero_init=False, **options)
  rng = np.random.RandomState(0)
  params = jax.tree.map(
    lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(np.float32),
    models.params_of(model),
  )
  path = str(tmp_path / 'model.npz')
  npz.save(params, path)
  return path


@pytest.mark.parametrize(
  'options,expected',
  [
    (ALL, dict(posemb='sincos2d', num_registers=2, layer_scale=1.0, qk_norm=True)),
    (dict(num_registers=3), dict(num_registers=3)),
    ({}, {}),
  ],
)
def test_bare_npz_reads_its_options_from_the_parameter_names(tmp_path, options, expected):
  path = _npz(tmp_path, **options)
  assert load.npz_options(npz.load(path)) == expected
  loaded = load.load(path, model_name='ViT-Quick', image_size=16)
  assert loaded.model.num_registers == options.get('num_registers', 0)


@pytest.mark.slow
def test_all_options_export_to_npz_and_saved_model(tmp_path):
  loaded = load.load(_npz(tmp_path, **ALL), model_name='ViT-Quick', image_size=16)
  for fmt in ('npz', 'saved_model'):
    report = export.export(loaded, fmt, str(tmp_path / fmt))
    assert report.ok, (fmt, report.lines())


@pytest.mark.parametrize('check', [hf.check, onnx_export.check], ids=['hf', 'onnx'])
@pytest.mark.parametrize(
  'options,what',
  [
    (dict(num_registers=2), r'register tokens \(num_registers=2\)'),
    (dict(layer_scale=0.1), r'LayerScale \(layer_scale\)'),
    (dict(qk_norm=True), r'QK-norm \(qk_norm\)'),
  ],
)
def test_hf_and_onnx_refuse_what_hf_vit_cannot_hold(tmp_path, check, options, what):
  loaded = load.load(_npz(tmp_path, **options), model_name='ViT-Quick', image_size=16)
  with pytest.raises(ValueError, match=f'HF ViT has no {what}; export this model as npz or'):
    check(loaded)


@pytest.mark.torch
@pytest.mark.skipif(not have('torch', 'transformers'), reason='torch/transformers not installed')
def test_sincos2d_and_patch_dropout_export_to_hf(tmp_path):
  path = _npz(tmp_path, posemb='sincos2d', patch_dropout=0.5)
  loaded = load.load(path, model_name='ViT-Quick', image_size=16)
  report = export.export(loaded, 'hf', str(tmp_path / 'hf'))
  assert report.ok, report.lines()


@pytest.mark.torch
@pytest.mark.skipif(not have('torch', 'transformers'), reason='torch/transformers not installed')
def test_refused_export_writes_nothing(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  loaded = load.load(_npz(tmp_path, num_registers=1), model_name='ViT-Quick', image_size=16)
  with pytest.raises(ValueError, match='HF ViT has no register tokens'):
    export.export(loaded, 'hf', str(out))
  assert not os.listdir(out)
