"""Weight EMA through whole runs: evaluators, resume, kill -9, predict and export (vit_jax.ema).

In their own file so that the parallel test workers (`--dist loadfile`) share tests/test_ema.py's
load; the unit and update checks are there.
"""

import argparse
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from vit_jax import metrics, train, train_state
from vit_jax.configs import quickstart
from vit_jax.export import load


def _runlocal(**fields):
  c = quickstart.get_config('runlocal')
  c.update({'ema_decay': 0.8, 'ema_warmup': True, 'total_steps': 8, 'eval_every': 8, **fields})
  return c


@pytest.fixture(scope='module')
def ema_workdir(tmp_path_factory):
  """An 8-step runlocal run with the EMA (checkpoints at 4 and 8), and its result."""
  path = str(tmp_path_factory.mktemp('ema'))
  return path, train.train_and_evaluate(_runlocal(), path)


def test_evaluators_report_the_ema_beside_the_params(ema_workdir):
  workdir, result = ema_workdir
  for key in ('accuracy', 'top5', 'loss'):
    assert f'eval/test/{key}' in result and f'eval/test/ema_{key}' in result
  last = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))[-1]
  assert 0 <= last['eval/test/ema_accuracy'] <= 1
  assert last['eval/test/ema_loss'] != last['eval/test/loss']


def test_resume_gives_the_uninterrupted_runs_ema(ema_workdir, tmp_path):
  """The finished run's copy without its last checkpoint resumes at step 4 and ends where the
  uninterrupted run did: the same EMA and params, bit for bit."""
  reference, _ = ema_workdir
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(reference, workdir)
  shutil.rmtree(f'{workdir}/checkpoints/8')
  train.train_and_evaluate(_runlocal(), workdir)  # Resumes at 4.
  for weights in ('ema', 'raw'):
    got = train_state.restore_params(f'{workdir}/checkpoints', 8, weights=weights)
    want = train_state.restore_params(f'{reference}/checkpoints', 8, weights=weights)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(train_state.ResumeError, match='turns the weight EMA off'):
    train.train_and_evaluate(_runlocal(total_steps=12, ema_decay=0.0, ema_warmup=False), workdir)


def test_predict_and_export_pick_the_ema(ema_workdir, tmp_path, capsys):
  workdir, _ = ema_workdir
  ckpt = f'{workdir}/checkpoints'
  ema_params = train_state.restore_params(ckpt, weights='ema')
  raw_params = train_state.restore_params(ckpt)
  assert not np.array_equal(ema_params['head']['kernel'], raw_params['head']['kernel'])
  loaded = load.load(workdir)  # Default: the EMA, as the run kept one.
  assert loaded.weights == 'ema'
  np.testing.assert_array_equal(loaded.params['head']['kernel'], ema_params['head']['kernel'])
  args = argparse.Namespace(
    checkpoint=workdir, model=None, step=None, image_size=None, labels=None, weights='raw'
  )
  raw = load.load_from_args(args)
  assert raw.weights == 'raw'
  np.testing.assert_array_equal(raw.params['head']['kernel'], raw_params['head']['kernel'])

  from vit_jax.export import __main__ as export_main

  for weights, want in (('ema', ema_params), ('raw', raw_params)):
    out = tmp_path / weights
    status = export_main.main(
      ['--checkpoint', workdir, '--format', 'npz', '--out', str(out), '--weights', weights]
    )
    assert status == 0, capsys.readouterr().err
    (path,) = [p for p in out.iterdir() if p.suffix == '.npz']
    with np.load(path) as f:
      np.testing.assert_array_equal(f['head/kernel'], want['head']['kernel'])

  from vit_jax import predict

  parser = predict._parser()
  assert parser.parse_args(['--checkpoint', workdir, 'x.png']).weights is None
  assert parser.parse_args(['--checkpoint', workdir, '--weights', 'raw', 'x.png']).weights == 'raw'


def test_a_run_without_ema_has_none_to_pick(tmp_path):
  workdir = str(tmp_path / 'plain')
  train.train_and_evaluate(quickstart.get_config('runlocal,steps=1'), workdir)
  assert load.load(workdir).weights == 'raw'
  with pytest.raises(ValueError, match='holds no EMA weights.*--weights=raw'):
    load.load(workdir, weights='ema')


def test_sigkill_then_restart_keeps_the_ema_exact(tmp_path):
  """As tests/test_train_resume.py, with the EMA on: SIGKILL mid-run, rerun, same EMA bits."""
  from test_train_resume import _run as run_main
  from test_train_resume import _start, _wait_for_step

  steps, flag = 40, ('--config.ema_decay=0.9', '--config.ema_warmup=True')
  reference = str(tmp_path / 'reference')
  run_main(reference, steps, *flag)
  workdir = str(tmp_path / 'killed')
  proc = _start(workdir, steps, *flag)
  _wait_for_step(proc, workdir, 10)
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert len(metrics.read_jsonl(f'{workdir}/metrics.jsonl')) < steps
  run_main(workdir, steps, *flag)
  for weights in ('ema', 'raw'):
    got = train_state.restore_params(f'{workdir}/checkpoints', weights=weights)
    want = train_state.restore_params(f'{reference}/checkpoints', weights=weights)
    jax.tree.map(np.testing.assert_array_equal, got, want)
