"""Preemption of a real process: SIGKILL + restart resumes exactly; SIGTERM checkpoints, exits 0."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
from subprocess_env import cpu_env, main_command

from vit_jax import metrics, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(workdir, steps, *extra):
  return subprocess.Popen(
    main_command(workdir, steps, *extra),
    cwd=REPO,
    env=cpu_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _run(workdir, steps, *extra):
  proc = subprocess.run(
    main_command(workdir, steps, *extra),
    cwd=REPO,
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _wait_for_step(proc, workdir, step, timeout=240):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, (
      'the run ended before it could be interrupted:\n' + proc.stdout.read()
    )
    if os.path.exists(path):
      with open(path) as f:
        lines = f.read().splitlines()
      if len(lines) >= step:
        return
    time.sleep(0.005)
  raise TimeoutError(f'step {step} not reached in {timeout}s')


def test_sigkill_then_restart_gives_identical_losses_and_params(tmp_path):
  steps = 80
  reference = str(tmp_path / 'reference')
  _run(reference, steps)
  ref = {r['step']: r['train/loss'] for r in metrics.read_jsonl(f'{reference}/metrics.jsonl')}

  workdir = str(tmp_path / 'killed')
  proc = _start(workdir, steps)
  _wait_for_step(proc, workdir, 20)
  proc.kill()  # SIGKILL: no handler runs, an async checkpoint may be half written.
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  before = len(metrics.read_jsonl(f'{workdir}/metrics.jsonl'))
  assert before < steps

  _run(workdir, steps)
  after = metrics.read_jsonl(f'{workdir}/metrics.jsonl')[before:]
  resumed_from = after[0]['step'] - 1
  assert resumed_from > 0 and resumed_from % 4 == 0  # A checkpoint (every 4 steps), not scratch.
  assert [r['step'] for r in after] == list(range(resumed_from + 1, steps + 1))
  for r in after:  # Bit-identical on CPU.
    assert r['train/loss'] == ref[r['step']], r['step']
  got = train_state.restore_params(f'{workdir}/checkpoints')
  want = train_state.restore_params(f'{reference}/checkpoints')
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_sigterm_checkpoints_the_current_step_and_exits_0(tmp_path):
  workdir = str(tmp_path / 'preempted')
  proc = _start(workdir, 400)
  _wait_for_step(proc, workdir, 20)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'Preempted: checkpointed step' in out
  last = metrics.read_jsonl(f'{workdir}/metrics.jsonl')[-1]['step']
  assert 20 <= last < 400
  ckpt = train_state.Checkpointer(f'{workdir}/checkpoints')
  assert ckpt.latest_step() == last  # The step it was at, not the last periodic checkpoint.
  ckpt.close()
