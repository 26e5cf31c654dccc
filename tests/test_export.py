"""`python -m vit_jax.export`: each format written, reloaded by its own runtime, logits compared."""

import io
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from optional import have
from PIL import Image

from vit_jax import export, models, npz, train, train_state
from vit_jax.configs import quickstart
from vit_jax.data import preprocess as data_preprocess
from vit_jax.export import __main__ as cli
from vit_jax.export import load, preprocess

needs_onnx = pytest.mark.skipif(
  not have('torch', 'transformers', 'onnx', 'onnxruntime', 'onnxscript'),
  reason='the export extra (torch, transformers, onnx, onnxruntime, onnxscript) is not installed',
)
needs_torch = pytest.mark.skipif(
  not have('torch', 'transformers'), reason='torch and transformers are not installed'
)


def _run_cli(capsys, *args):
  status = cli.main([str(a) for a in args])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def _diffs(out):
  """The measured max differences the CLI printed, as floats."""
  return [
    float(line.split('max |logit diff| ')[1].split()[0])
    for line in out.splitlines()
    if 'max' in line
  ]


@pytest.mark.parametrize(
  'fmt',
  [
    'npz',
    'saved_model',
    pytest.param('onnx', marks=[needs_onnx, pytest.mark.torch]),
  ],
)
def test_golden_checkpoint_exports_and_matches_the_original_logits(
  fmt, golden_dir, tmp_path, capsys
):
  """The golden npz (with a representation layer) through each format, checked by the CLI and
  against the original implementation's logits on the golden input."""
  status, out, err = _run_cli(
    capsys,
    '--checkpoint', golden_dir / 'testing_rep16_ref.npz', '--model', 'testing',
    '--format', fmt, '--out', tmp_path,
  )  # fmt: skip
  assert status == 0, err
  assert 'tolerance 0.0001' in out and len(_diffs(out)) >= 2
  assert all(d <= 1e-4 for d in _diffs(out))
  images = np.load(golden_dir / 'input_224.npy', allow_pickle=False)
  expected = np.load(golden_dir / 'logits_testing_rep16_224.npy', allow_pickle=False)
  module_loaded = load.load(str(golden_dir / 'testing_rep16_ref.npz'), model_name='testing')
  module = export._module(fmt, module_loaded)
  path = {'npz': tmp_path / 'model.npz', 'onnx': tmp_path / 'model.onnx'}.get(fmt, tmp_path)
  np.testing.assert_allclose(module.run(str(path), images), expected, atol=1e-4)
  if fmt == 'saved_model':
    assert 'image bytes, batch 4' in out
    _check_saved_model_signatures(tmp_path, module_loaded)


@needs_torch
@pytest.mark.torch
def test_hf_folder_loads_offline_with_labels_and_preprocessing(tmp_path, capsys):
  from transformers import AutoImageProcessor, ViTForImageClassification

  model = models.get_model(
    'testing', num_classes=3, representation_size=None, head_zero_init=False, image_size=32
  )
  npz.save(model, str(tmp_path / 'ckpt.npz'))
  (tmp_path / 'labels.txt').write_text('cat\ndog\nbird\n')
  status, out, err = _run_cli(
    capsys,
    '--checkpoint', tmp_path / 'ckpt.npz', '--model', 'testing',
    '--labels', tmp_path / 'labels.txt', '--format', 'hf', '--out', tmp_path / 'hf',
  )  # fmt: skip
  assert status == 0, err
  assert all(d <= 1e-4 for d in _diffs(out)) and len(_diffs(out)) == 2
  assert {'config.json', 'model.safetensors', 'preprocessor_config.json'} <= set(
    os.listdir(tmp_path / 'hf')
  )
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['hidden_act'] == 'gelu_pytorch_tanh' and config['image_size'] == 32
  reloaded = ViTForImageClassification.from_pretrained(str(tmp_path / 'hf'), local_files_only=True)
  assert reloaded.config.id2label == {0: 'cat', 1: 'dog', 2: 'bird'}
  # The processor's rescale + normalisation is our x / 127.5 - 1 (no resize at the model's size).
  pixels = np.random.RandomState(0).randint(0, 256, (32, 32, 3), np.uint8)
  processor = AutoImageProcessor.from_pretrained(str(tmp_path / 'hf'))
  theirs = processor(images=[pixels], return_tensors='np')['pixel_values'][0]
  np.testing.assert_allclose(theirs.transpose(1, 2, 0), pixels / 127.5 - 1, atol=1e-6)


def test_verification_fails_the_command_when_outputs_differ(
  golden_dir, tmp_path, capsys, monkeypatch
):
  def off_by_a_bit(self, path, images, labels=None):
    return models.functional(self.model)(npz.load(path), images) + 1e-3

  monkeypatch.setattr(export._Npz, 'run', off_by_a_bit)
  status, out, err = _run_cli(
    capsys,
    '--checkpoint', golden_dir / 'testing_rep16_ref.npz', '--model', 'testing',
    '--format', 'npz', '--out', tmp_path,
  )  # fmt: skip
  assert status == 1 and 'OVER TOLERANCE' in out and 'beyond the tolerance' in err
  assert all(abs(d - 1e-3) < 1e-5 for d in _diffs(out))


_TINY = {
  'hybrid': {
    'model_name': 'tiny-hybrid',
    'patches': {'size': (1, 1)},
    'hidden_size': 8,
    'transformer': {'mlp_dim': 8, 'num_heads': 2, 'num_layers': 1},
    'classifier': 'token',
    'representation_size': None,
    'resnet': {'num_layers': (1,), 'width_factor': 1},
  },
  'mixer': {
    'model_name': 'Mixer-tiny',
    'patches': {'size': (4, 4)},
    'hidden_dim': 8,
    'num_blocks': 1,
    'tokens_mlp_dim': 8,
    'channels_mlp_dim': 8,
  },
}


def _tiny(family='hybrid', with_params=False):
  model = load._build(_TINY[family], 3, {}, 16)
  params = {}  # The refusing formats read no parameter.
  if with_params:  # Init plus noise, so that no head is zero.
    rng = np.random.RandomState(0)
    noisy = lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    params = jax.tree.map(
      noisy, models.params_of(models.get_model(_TINY[family], 3, image_size=16))
    )
  return load.Loaded(
    model, params, load.model_config_of(model), 3, 16, load.DEFAULT_PP.format(size=16), None, 'x'
  )


def test_mixer_exports_to_saved_model(tmp_path):
  # A tiny hybrid exports the same way (measured by hand, docs/export.md); left out for test time.
  report = export.export(_tiny('mixer', with_params=True), 'saved_model', str(tmp_path))
  assert report.ok and set(report.max_diff) == {'batch 1', 'batch 4', 'image bytes, batch 4'}


@needs_torch
@pytest.mark.parametrize('fmt', ['hf', 'onnx'])
def test_hybrid_is_refused_with_a_clear_error(tmp_path, fmt):
  with pytest.raises(ValueError, match=r'plain ViT models only \(not hybrids or Mixer\)'):
    export.export(_tiny(), fmt, str(tmp_path))
  assert not os.listdir(tmp_path)


def _check_saved_model_signatures(directory, loaded):
  reloaded = tf.saved_model.load(str(directory))
  serving = reloaded.signatures['serving_default']
  (spec,) = serving.structured_input_signature[1].values()
  assert spec.name == 'images' and spec.shape.as_list() == [None, 224, 224, 3]
  images = export.verification_images(224, 3)
  outputs = serving(images=tf.constant(images))
  assert set(outputs) == {'logits', 'probabilities'} and outputs['logits'].shape == (3, 10)
  np.testing.assert_allclose(outputs['probabilities'].numpy().sum(-1), 1, atol=1e-5)
  buffer = io.BytesIO()
  Image.fromarray(((images[0] + 1) * 127.5).round().astype(np.uint8)).save(buffer, format='JPEG')
  by_bytes = reloaded.signatures['serving_bytes'](image_bytes=tf.constant([buffer.getvalue()]))
  ours = loaded.apply(preprocess.eval_preprocess(loaded.pp_eval)(buffer.getvalue())[None].numpy())
  np.testing.assert_allclose(by_bytes['logits'], ours, atol=1e-4)


@pytest.mark.parametrize(
  'pp',
  [
    'decode|resize(18)|central_crop(16)|value_range(-1,1)',
    'decode|resize_small(20)|central_crop(16)|value_range(0,1)',
    'decode|resize(16)|value_range(-1,1)',
  ],
)
def test_serving_preprocessing_equals_the_pipeline_ops(pp):
  rng = np.random.RandomState(0)
  for shape in [(37, 45, 3), (64, 30, 3)]:
    buffer = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, shape, np.uint8)).save(buffer, format='PNG')
    ours = preprocess.eval_preprocess(pp)(buffer.getvalue()).numpy()
    pipeline = data_preprocess.get_preprocess_fn(pp)({'image': tf.constant(buffer.getvalue())})
    np.testing.assert_allclose(ours, pipeline['image'].numpy(), atol=1e-4)
  with pytest.raises(ValueError, match="'flip_lr'.*supported"):
    preprocess.eval_preprocess('decode|flip_lr|value_range(-1,1)')


# --- training workdirs ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny quickstart run (overridden 'testing' model with 4x4 patches, 16 px) of 2 steps."""
  config = quickstart.get_config('runlocal')
  config.model.update(patches=(4, 4), representation_size=None, dtype='float32')
  config.total_steps = 2
  config.eval_splits = ''
  path = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(config, path)
  return path


def test_load_workdir_builds_its_overridden_model_and_labels(workdir):
  loaded = load.load(workdir)
  assert tuple(loaded.model.patches) == (4, 4) and loaded.image_size == 16
  assert loaded.labels == [str(i) for i in range(10)] and loaded.num_classes == 10
  params = train_state.restore_params(os.path.join(workdir, 'checkpoints'))
  np.testing.assert_array_equal(loaded.params['head']['kernel'], params['head']['kernel'])
  assert load.load(workdir, step=2).num_classes == 10
  with pytest.raises(FileNotFoundError, match=r'has no checkpoint at step 7; it has \[2\]'):
    load.load(workdir, step=7)


@pytest.mark.parametrize(
  'fmt', ['npz', pytest.param('onnx', marks=[needs_onnx, pytest.mark.torch])]
)
def test_export_from_workdir(workdir, tmp_path, capsys, fmt):
  status, out, err = _run_cli(capsys, '--checkpoint', workdir, '--format', fmt, '--out', tmp_path)
  assert status == 0, err
  assert len(_diffs(out)) == 2 and all(d <= 1e-4 for d in _diffs(out))
  assert (tmp_path / 'labels.txt').read_text().split() == [str(i) for i in range(10)]


def test_pretrained_path_takes_a_workdir(workdir, tmp_path):
  """Fine-tuning from our own run: a 3-class run at lr 0 keeps the workdir's body."""
  config = quickstart.get_config('runlocal')
  config.model.update(patches=(4, 4), representation_size=None, dtype='float32')
  config.dataset = 'synthetic:image_size=16,num_classes=3,num_examples=64'
  config.pretrained_path = workdir
  config.total_steps = 1
  config.warmup_steps = 0
  config.lr = 0.0
  config.weight_decay = 0.0  # Decoupled decay (big_vision's) moves kernels even at lr 0.
  config.eval_splits = ''
  train.train_and_evaluate(config, str(tmp_path / 'ft'))
  before = train_state.restore_params(os.path.join(workdir, 'checkpoints'))
  after = train_state.restore_params(str(tmp_path / 'ft' / 'checkpoints'))
  assert after['head']['kernel'].shape == (10, 3)
  np.testing.assert_array_equal(after['embedding']['kernel'], before['embedding']['kernel'])
  np.testing.assert_array_equal(
    after['Transformer']['encoder_norm']['scale'], before['Transformer']['encoder_norm']['scale']
  )


def test_clear_errors(tmp_path, capsys, golden_dir):
  status, _, err = _run_cli(
    capsys,
    '--checkpoint',
    golden_dir / 'testing_rep16_ref.npz',
    '--format',
    'npz',
    '--out',
    tmp_path,
  )
  assert status == 2 and '--model is needed' in err
  status, _, err = _run_cli(
    capsys,
    '--checkpoint', golden_dir / 'testing_rep16_ref.npz', '--model', 'ViT-B_16',
    '--format', 'npz', '--out', tmp_path,
  )  # fmt: skip
  assert status == 2 and 'does not match model' in err


def test_saved_model_with_a_fixed_batch_converts_to_tflite(golden_dir, tmp_path):
  loaded = load.load(str(golden_dir / 'testing_rep16_ref.npz'), model_name='testing')
  report = export.export(loaded, 'saved_model', str(tmp_path / 'sm'), batch_size=1)
  assert report.ok and set(report.max_diff) == {'batch 1', 'image bytes, batch 1'}
  converter = tf.lite.TFLiteConverter.from_saved_model(
    str(tmp_path / 'sm'), signature_keys=['serving_default']
  )
  interpreter = tf.lite.Interpreter(model_content=converter.convert())
  images = export.verification_images(224, 1)
  logits = interpreter.get_signature_runner('serving_default')(images=images)['logits']
  np.testing.assert_allclose(logits, np.asarray(loaded.apply(images)), atol=1e-4)


def test_predict_from_workdir_uses_its_model_preprocessing_and_labels(workdir, tmp_path, capsys):
  from vit_jax import predict

  path = tmp_path / 'digit.png'
  Image.fromarray(np.random.RandomState(2).randint(0, 256, (16, 16, 3), np.uint8)).save(path)
  predict.main(['--checkpoint', workdir, '--json', '--top_k', '1', str(path)])
  (result,) = json.loads(capsys.readouterr().out)
  loaded = load.load(workdir)
  image = preprocess.eval_preprocess('value_range(-1,1)')(np.asarray(Image.open(path)))
  best = int(np.argmax(loaded.apply(image.numpy()[None])[0]))  # runlocal's pp_eval: no resize.
  assert result['top_k'][0]['label'] == str(best) and loaded.pp_eval == 'value_range(-1,1)'
