"""Two processes on localhost (jax.distributed, gloo collectives) == one process, same devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from subprocess_env import cpu_env

from vit_jax import metrics, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, *extra):
  # SGD: Adam turns float noise in exactly-zero gradients (attention key bias) into full steps.
  # shuffle_buffer=1: synthetic example k goes to process k % 2, so both layouts see the same
  # examples in every global batch (in a different order within it).
  return [
    sys.executable,
    '-m',
    'vit_jax.main',
    '--config=configs/quickstart.py:runlocal,steps=6',
    f'--workdir={workdir}',
    '--config.shuffle_buffer=1',
    '--config.checkpoint_every=3',
    '--config.optimizer=sgd',
    '--config.lr=0.1',
    '--config.weight_decay=0',
    *extra,
  ]


def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
  single = str(tmp_path / 'single')
  multi = str(tmp_path / 'multi')
  port = _free_port()
  procs = [
    subprocess.Popen(
      _command(
        multi, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'
      ),
      cwd=REPO,
      env=cpu_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  ref = subprocess.run(
    _command(single), cwd=REPO, env=cpu_env(4), capture_output=True, text=True, timeout=300
  )
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert ref.returncode == 0, ref.stdout + ref.stderr
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert 'process 1/2, 2 local / 4 global devices' in outs[1]
  assert 'Training finished' in outs[0] and 'Training finished' not in outs[1]  # Process 0 prints.

  got = metrics.read_jsonl(f'{multi}/metrics.jsonl')
  want = metrics.read_jsonl(f'{single}/metrics.jsonl')
  assert [r['step'] for r in got] == [r['step'] for r in want] == list(range(1, 7))
  np.testing.assert_allclose(
    [r['train/loss'] for r in got], [r['train/loss'] for r in want], rtol=1e-5
  )
  for key in ('eval/test/accuracy', 'eval/test/loss'):
    assert got[-1][key] == np.float32(want[-1][key]) or abs(got[-1][key] - want[-1][key]) < 1e-5

  params = train_state.restore_params(f'{multi}/checkpoints')
  ref_params = train_state.restore_params(f'{single}/checkpoints')
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params
  )
