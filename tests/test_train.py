"""The loop in-process: end to end, resume, accumulation, NaN stop, fine-tuning, scan/remat."""

import json
import math
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import config as config_lib
from vit_jax import data, metrics, models, npz, train, train_state
from vit_jax.configs import quickstart


def _runlocal(**overrides):
  config = quickstart.get_config('runlocal')
  for key, value in overrides.items():
    config[key] = value
  return config


def test_end_to_end_logs_checkpoints_resumes_and_evaluates(tmp_path):
  workdir = str(tmp_path / 'run')
  config = _runlocal(total_steps=8)
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 8 and not result['preempted']
  assert result['checkpoint_dir'] == os.path.join(workdir, 'checkpoints', '8')

  records = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == list(range(1, 9))  # log_every=1.
  for r in records:
    assert {'train/loss', 'train/lr', 'train/grad_norm'} <= set(r)
    assert math.isfinite(r['train/loss'])
  perf = {
    'perf/images_per_sec',
    'perf/images_per_sec_per_device',
    'perf/step_time',
    'perf/data_wait_frac',
    'perf/mfu',
  }
  assert perf <= set(records[-1])
  assert 0 < records[-1]['perf/mfu'] < 1
  evals = {r['step']: r['eval/test/accuracy'] for r in records if 'eval/test/accuracy' in r}
  assert sorted(evals) == [6, 8] and all(0 <= a <= 1 for a in evals.values())
  assert 'eval/test/loss' in records[-1]
  # Warmup over 2 steps from 0, then cosine to 0 at the last step.
  assert records[0]['train/lr'] == 0.0
  assert records[2]['train/lr'] == pytest.approx(config.lr, rel=1e-6)

  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model_name'] == 'testing'
  import tensorflow as tf

  events = tf.io.gfile.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0]) for v in e.summary.value}
  assert {'train/loss', 'eval/test/accuracy', 'perf/mfu'} <= tags

  ckpt = train_state.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.all_steps() == [4, 8]
  ckpt.close()
  params8 = train_state.restore_params(os.path.join(workdir, 'checkpoints'))

  # Same workdir, more steps: resumes at 8 (not from scratch) and logs steps 9..10 only.
  result = train.train_and_evaluate(_runlocal(total_steps=10), workdir)
  assert result['step'] == 10
  records = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records[8:]] == [9, 10]
  params10 = train_state.restore_params(os.path.join(workdir, 'checkpoints'))
  assert not np.allclose(params8['head']['kernel'], params10['head']['kernel'])


def _sgd_config(**fields):
  c = config_lib.base_config()
  c.model_name = 'testing'
  c.model = ml_collections.ConfigDict({'patches': (4, 4), 'dropout_rate': 0.0, **fields})
  c.image_size = 16
  c.optimizer = 'sgd'
  c.lr = 0.1
  c.warmup_steps = 0
  c.total_steps = 10
  return c


def _steps(trainer, batches, params=None):
  state = trainer.init_state(0)
  if params is not None:
    state = trainer.with_params(state, params)
  rng = jax.random.key_data(jax.random.key(1))
  losses = []
  for local in batches:
    state, out = trainer.train_step(state, trainer.global_batch(local, stacked=True), rng)
    losses.append(float(out['train/loss']))
  return losses, jax.tree.map(np.asarray, state['params'])


def test_gradient_accumulation_equals_one_big_batch():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 32, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 10, (3, 32)).astype(np.int32)
  results = []
  for accum in (1, 4):
    config = _sgd_config()
    config.batch_size, config.accum_steps = 32, accum
    trainer = train.Trainer(config, num_classes=10)
    batches = [
      {'image': x.reshape(accum, 32 // accum, 16, 16, 3), 'label': y.reshape(accum, 32 // accum)}
      for x, y in zip(images, labels)
    ]
    results.append(_steps(trainer, batches))
  (big_losses, big_params), (acc_losses, acc_params) = results
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc_params, big_params
  )


def test_scan_remat_and_bfloat16_match_the_plain_model():
  rng = np.random.default_rng(1)
  batches = [
    {
      'image': rng.uniform(-1, 1, (1, 16, 16, 16, 3)).astype(np.float32),
      'label': rng.integers(0, 10, (1, 16)).astype(np.int32),
    }
    for _ in range(2)
  ]
  config = _sgd_config(num_layers=2)
  config.batch_size = 16
  plain = train.Trainer(config, num_classes=10)
  params = plain.host_params(plain.init_state(0))
  ref_losses, ref_params = _steps(plain, batches)

  scanned = train.Trainer(
    _sgd_config(num_layers=2, scan_layers=True, remat_policy='full'), num_classes=10
  )
  losses, params_scanned = _steps(scanned, batches, npz.scan_params(params))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    npz.unscan_params(params_scanned),
    ref_params,
  )

  bf16 = train.Trainer(_sgd_config(num_layers=2, dtype='bfloat16'), num_classes=10)
  losses, params_bf16 = _steps(bf16, batches, params)
  assert params_bf16['head']['kernel'].dtype == np.float32  # f32 master weights.
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real_batches = train._batches

  def poisoned(dataset, accum_steps):
    normalise = data.device_preprocess(config.pp_train)  # float32 images: the step keeps them.
    for i, batch in enumerate(real_batches(dataset, accum_steps)):
      image = np.asarray(normalise(batch['image']))
      yield dict(batch, image=np.full_like(image, np.nan) if i >= 5 else image)  # Step 6: NaN.

  monkeypatch.setattr(train, '_batches', poisoned)
  workdir = str(tmp_path / 'nan')
  config = _runlocal(total_steps=10, checkpoint_every=2, log_every=3, eval_every=0)
  with pytest.raises(
    train.TrainingDivergedError,
    match=r'train/loss=nan.* at step 6; last good checkpoint: step 4 in ',
  ):
    train.train_and_evaluate(config, workdir)
  ckpt = train_state.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
  params = train_state.restore_params(os.path.join(workdir, 'checkpoints'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  steps = [r['step'] for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [3]  # Step 6 would have been logged: the NaN stopped the run first.


def test_finetune_from_golden_checkpoint_matches_direct_computation(tmp_path, golden_dir):
  """First two steps of fine-tuning `testing` (rep 16) from the golden npz vs a hand-made SGD."""
  from vit_jax.configs import finetune

  config = finetune.get_config('runlocal')
  config.model.update(representation_size=16, dropout_rate=0.0)
  config.pretrained_path = str(golden_dir / 'testing_rep16_ref.npz')
  config.dataset = 'synthetic:image_size=224,num_classes=10,num_examples=64'
  config.image_size = 224
  config.batch_size = 8
  config.total_steps = 2
  config.warmup_steps = 0
  config.lr = 0.1
  config.eval_splits = ''
  train.train_and_evaluate(config, str(tmp_path / 'ft'))
  logged = metrics.read_jsonl(str(tmp_path / 'ft' / 'metrics.jsonl'))

  # Direct computation: load_pretrained, the same two batches, SGD with clipping written out.
  model = npz.load_pretrained(
    models.get_model('testing', num_classes=10, representation_size=16), config.pretrained_path
  )
  apply, params = models.functional(model), models.params_of(model)
  ds = data.get_dataset(
    config.dataset,
    'train',
    preprocess=config.pp_train,
    train=True,
    global_batch_size=8,
    shuffle_buffer=config.shuffle_buffer,
  )
  it = iter(ds)
  normalise = data.device_preprocess(config.pp_train)  # The train step's device part.
  b1, b2 = (dict(b, image=normalise(b['image'])) for b in (next(it), next(it)))

  def loss_fn(p, b):
    logits = apply(p, b['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b['label']).mean()

  loss1, grads = jax.value_and_grad(loss_fn)(params, b1)
  norm = optax.global_norm(grads)
  scale = min(1.0, 1.0 / float(norm))
  params2 = jax.tree.map(lambda p, g: p - 0.1 * g * scale, params, grads)
  loss2 = loss_fn(params2, b2)
  assert logged[0]['train/loss'] == pytest.approx(float(loss1), rel=1e-5)
  assert logged[0]['train/grad_norm'] == pytest.approx(float(norm), rel=1e-4)
  assert logged[1]['train/loss'] == pytest.approx(float(loss2), rel=1e-5)
  # The head starts at zero, so the first loss is log(10); the gradient norm and the second loss
  # depend on the pretrained body, so a wrong or missing load would not match.
  assert float(loss1) == pytest.approx(math.log(10), rel=1e-6)
