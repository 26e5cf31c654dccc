"""Evaluators: classification (exact, also over 2 processes), ImageNet ReaL, few-shot probes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from data_fixtures import make_indexed_folder
from subprocess_env import cpu_env

from vit_jax import config as config_lib
from vit_jax import data, train
from vit_jax.configs import quickstart
from vit_jax.evaluators import classification, fewshot
from vit_jax.evaluators import common as ev_common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PP = 'decode|resize(16)|value_range(-1,1)'


def _config(**overrides):
  config = quickstart.get_config('runlocal')  # 'testing' ViT, 16 px, 4x4 patches.
  config.unlock()
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  make_indexed_folder(str(root), classes=3, per_class=13)  # 39 images: padded eval batches.
  return f'folder:{root}', str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trainer_and_params():
  trainer = train.Trainer(_config(), num_classes=3)
  return trainer, trainer.init_state(0)['params']


def _all_examples(dataset):
  """Every real example of a one-pass dataset, in one process: (images, labels)."""
  images, labels = [], []
  for b in dataset:
    images.append(b['image'][b['mask']])
    labels.append(b['label'][b['mask']])
  # The device part of the pp string (value_range), as the evaluators apply it.
  return np.asarray(data.device_preprocess(PP)(np.concatenate(images))), np.concatenate(labels)


def test_classification_is_exact(folder, trainer_and_params):
  trainer, params = trainer_and_params
  name, data_dir = folder
  ds = data.get_dataset(name, 'train', preprocess=PP, train=False, global_batch_size=16,
                        data_dir=data_dir)  # fmt: skip
  ev = classification.Classification(
    'f', trainer.eval_context(), ds, pp=PP, loss='softmax_xent', every=0
  )
  got = ev.run(params)
  totals = ev.totals(params)
  # Reference: the model on every example at once, in numpy.
  images, labels = _all_examples(ds)
  logits = np.asarray(trainer.apply(jax.device_get(params), images))
  top5 = np.argsort(-logits, -1)[:, :3]  # 3 classes: top-5 is top-3.
  loss = optax.softmax_cross_entropy(logits, np.eye(3)[labels])
  assert totals['count'] == len(labels) == ds.num_examples
  assert totals['correct'] == np.sum(logits.argmax(-1) == labels)
  assert got['eval/f/accuracy'] == np.mean(logits.argmax(-1) == labels)
  assert got['eval/f/top5'] == np.mean(np.any(top5 == labels[:, None], -1)) == 1.0
  np.testing.assert_allclose(got['eval/f/loss'], np.mean(loss), rtol=1e-5)


_TWO_PROCESS_SCRIPT = r"""
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from vit_jax.configs import quickstart
from vit_jax import data, train
from vit_jax.evaluators import classification
config = quickstart.get_config('runlocal')
trainer = train.Trainer(config, num_classes=3)
params = trainer.init_state(0)['params']
ds = data.get_dataset(sys.argv[3], 'train', preprocess=sys.argv[5], train=False,
                      global_batch_size=16, data_dir=sys.argv[4])
ev = classification.Classification('f', trainer.eval_context(), ds, pp=sys.argv[5],
                                   loss='softmax_xent', every=0)
out = dict(ev.run(params), **ev.totals(params))
if jax.process_index() == 0:
  print('RESULT', json.dumps(out))
"""


def test_classification_over_two_processes_equals_one(folder, trainer_and_params, tmp_path):
  trainer, params = trainer_and_params
  name, data_dir = folder
  ds = data.get_dataset(name, 'train', preprocess=PP, train=False, global_batch_size=16,
                        data_dir=data_dir)  # fmt: skip
  ev = classification.Classification(
    'f', trainer.eval_context(), ds, pp=PP, loss='softmax_xent', every=0
  )
  want = dict(ev.run(params), **ev.totals(params))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(cpu_env(2), PYTHONPATH=REPO)
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESS_SCRIPT, f'127.0.0.1:{port}', str(i), name, data_dir, PP],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  line = next(x for x in outs[0].splitlines() if x.startswith('RESULT '))
  got = json.loads(line.removeprefix('RESULT '))
  assert got['count'] == want['count'] == ds.num_examples  # Each example once, no padding.
  assert got['correct'] == want['correct'] and got['top5'] == want['top5']
  np.testing.assert_allclose(got['eval/f/loss'], want['eval/f/loss'], rtol=1e-5)


def test_real_counts_predictions_in_the_label_set_and_skips_unlabelled(trainer_and_params):
  trainer, params = trainer_and_params
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
  pred = np.asarray(trainer.apply(jax.device_get(params), images))
  pred = pred.argmax(-1)
  real = np.zeros((16, 3), np.float32)
  mask = np.ones(16, bool)
  # Rows 0-5: the prediction and another class (right); 6-10: only other classes (wrong);
  # 11-13: no ReaL labels (excluded); 14-15: padding (mask False) that would count as right.
  for i in range(16):
    if i < 6 or i >= 14:
      real[i, pred[i]] = real[i, (pred[i] + 1) % 3] = 1
    elif i < 11:
      real[i, (pred[i] + 1) % 3] = 1
  mask[14:] = False
  batches = [
    {'image': images[:8], 'real_labels': real[:8], 'mask': mask[:8]},
    {'image': images[8:], 'real_labels': real[8:], 'mask': mask[8:]},
  ]
  ev = classification.Real(
    'real', trainer.eval_context(), batches, pp='', loss='softmax_xent', every=0
  )
  assert ev.totals(params) == {'correct': 6.0, 'count': 11.0}
  assert ev.run(params) == {'eval/real/accuracy': 6 / 11}
  with pytest.raises(ValueError, match="lack \\['real_labels'\\]"):
    bad = [{'image': images[:8], 'label': pred[:8], 'mask': mask[:8]}]
    classification.Real('r', trainer.eval_context(), bad, pp='', loss='x', every=0).run(params)


@pytest.mark.parametrize('n', [40, 7])  # More and fewer examples than feature dimensions (17).
def test_ridge_probe_equals_a_direct_least_squares_solve(n):
  rng = np.random.default_rng(n)
  x, x_test = rng.normal(size=(n, 16)) * 3 + 1, rng.normal(size=(50, 16)) * 3 + 1
  y, y_test = rng.integers(0, 4, n), rng.integers(0, 4, 50)
  l2 = 2.0**3
  # Direct: standardise, append the bias feature 100, then min ||A w - T||^2 + l2 ||w||^2 as the
  # ordinary least-squares problem [A; sqrt(l2) I] w = [T; 0], targets T = 2 * one-hot - 1.
  mean, std = x.mean(0), x.std(0) + 1e-5
  feats = lambda v: np.hstack([(v - mean) / std, np.full((len(v), 1), 100.0)])
  a = np.vstack([feats(x), np.sqrt(l2) * np.eye(17)])
  t = np.vstack([2 * np.eye(4)[y] - 1, np.zeros((17, 4))])
  w = np.linalg.lstsq(a, t, rcond=None)[0]
  want = np.mean((feats(x_test) @ w).argmax(-1) == y_test)
  assert fewshot.ridge_accuracy(x, y, x_test, y_test, 4, l2) == want
  assert fewshot.ridge_accuracy(x, y, x, y, 4, 1e-6) >= (1.0 if n < 17 else 0.0)  # Interpolates.


def test_shots_are_per_class_and_seeded():
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0])
  idx = fewshot.sample_shots(labels, 3, 2, seed=0)
  assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2, 2]
  np.testing.assert_array_equal(idx, fewshot.sample_shots(labels, 3, 2, seed=0))
  assert len(fewshot.sample_shots(labels, 3, 4, seed=1)) == 4 + 3 + 2  # Class 2 has only 2.


def test_pre_logits_are_the_heads_input(trainer_and_params):
  trainer, params = trainer_and_params
  images = np.random.default_rng(1).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  params = jax.device_get(params)
  feats = fewshot.pre_logits(trainer.apply, params, images)
  logits = trainer.apply(params, images)
  head = params['head']
  np.testing.assert_allclose(feats @ head['kernel'] + head['bias'], logits, rtol=1e-5, atol=1e-5)


def test_fewshot_on_a_folder_dataset_matches_the_host_solve(folder, trainer_and_params):
  trainer, params = trainer_and_params
  name, data_dir = folder
  config = _config(data_dir=data_dir)
  ev = fewshot.FewShot('fs', trainer.eval_context(), config,
                       datasets={'f': (name, 'train', 'validation')}, shots=(1, 5), l2_reg=2.0**10,
                       num_seeds=2, pp=PP, batch_size=16, every=0)  # fmt: skip
  got = ev.run(params)
  assert sorted(got) == ['eval/fs/f_1shot', 'eval/fs/f_5shot']
  host = jax.device_get(params)
  split = {}
  for s in ('train', 'validation'):
    ds = data.get_dataset(name, s, preprocess=PP, train=False, global_batch_size=16,
                          data_dir=data_dir)  # fmt: skip
    images, labels = _all_examples(ds)
    split[s] = (np.asarray(fewshot.pre_logits(trainer.apply, host, images)), labels)
  (xtr, ytr), (xte, yte) = split['train'], split['validation']
  for shots in (1, 5):
    accs = []
    for seed in range(2):
      idx = fewshot.sample_shots(ytr, 3, shots, seed)
      accs.append(fewshot.ridge_accuracy(xtr[idx], ytr[idx], xte, yte, 3, 2.0**10))
    np.testing.assert_allclose(got[f'eval/fs/f_{shots}shot'], np.mean(accs), atol=1e-6)


def test_config_evals_run_in_training_and_reach_metrics(folder, tmp_path):
  name, data_dir = folder
  config = _config(total_steps=2, eval_every=0, checkpoint_every=0, data_dir=data_dir)
  config.num_classes = 10
  config.evals.imgs = config_lib.eval_entry(type='classification', dataset=name, split='validation',
                                        pp=PP)  # fmt: skip
  config.evals.fs = config_lib.fewshot_entry(every=0, datasets={'f': (name, 'train', 'validation')},
                                         pp=PP)  # fmt: skip
  config.evals.fs.shots, config.evals.fs.num_seeds = (2,), 1
  config.evals.never = config_lib.eval_entry(type='classification', split='nosuchsplit', every=-1)
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  last = [json.loads(x) for x in open(tmp_path / 'run' / 'metrics.jsonl')][-1]
  assert last['step'] == 2
  for key in ('eval/test/accuracy', 'eval/imgs/accuracy', 'eval/imgs/top5', 'eval/fs/f_2shot'):
    assert 0.0 <= last[key] <= 1.0 and key in result
  assert not any('never' in k for k in last)


def test_unknown_eval_type_is_an_error(trainer_and_params):
  config = _config()
  config.evals.x = config_lib.eval_entry(type='retrieval', split='test')
  with pytest.raises(ValueError, match="evals.x.type='retrieval'"):
    ev_common.build(config, trainer_and_params[0].eval_context())
