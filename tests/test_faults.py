"""Fault injection on real processes (`make faults`): each case checks that nothing is lost.

Every case runs the quickstart recipe's `runlocal` setting (tiny model, synthetic data, a checkpoint
every 4 steps) in subprocesses on CPU, injects the fault, restarts, and compares the per-step losses
and final params with an uninterrupted run of the same command: on CPU they are bit-identical.
"""

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from subprocess_env import cpu_env, main_command

from vit_jax import metrics, train, train_state

pytestmark = pytest.mark.faults
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16


def _command(workdir, steps=STEPS, *extra):
  return main_command(workdir, steps, *extra)


class Proc:
  """A training subprocess whose output lines are collected as they come."""

  def __init__(self, argv, devices=2):
    self.lines: list[str] = []
    self.proc = subprocess.Popen(
      argv,
      cwd=REPO,
      env=cpu_env(devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  def wait_for(self, predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if predicate():
        return
      assert self.proc.poll() is None, 'the run ended first:\n' + self.output()
      time.sleep(0.005)
    raise TimeoutError(f'not reached in {timeout}s:\n{self.output()}')

  def wait_for_line(self, text, timeout=240):
    self.wait_for(lambda: any(text in line for line in self.lines), timeout)

  def finish(self, timeout=300) -> int:
    try:
      self.proc.wait(timeout=timeout)
    finally:
      self.kill()
    self._reader.join(timeout=10)
    return self.proc.returncode

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  def output(self) -> str:
    return ''.join(self.lines)

  def errors(self) -> list[str]:
    return [line for line in self.lines if line.startswith('ERROR: ')]


@pytest.fixture
def procs():
  """Every process a test starts is killed at its end, whatever happens."""
  started = []
  yield lambda *a, **k: started.append(Proc(*a, **k)) or started[-1]
  for p in started:
    p.kill()


def _run(argv, devices=2, expect=0):
  p = Proc(argv, devices)
  rc = p.finish()
  assert rc == expect, p.output()
  return p


def _steps_seen(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return len(metrics.read_jsonl(path)) if os.path.exists(path) else 0


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in metrics.read_jsonl(f'{workdir}/metrics.jsonl')}


def _strict_records(workdir):
  with open(f'{workdir}/metrics.jsonl') as f:
    return [json.loads(line) for line in f]  # Every line must parse.


def _tensorboard_losses(workdir):
  """[(step, loss)] as TensorBoard's own reader loads them from the workdir's event files."""
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(
    f'{workdir}/tensorboard',
    size_guidance={event_accumulator.TENSORS: 0},  # 0: keep all.
  )
  accumulator.Reload()
  return [
    (e.step, float(np.frombuffer(e.tensor_proto.tensor_content, np.float32)[0])
     if e.tensor_proto.tensor_content else e.tensor_proto.float_val[0])
    for e in accumulator.Tensors('train/loss')
  ]  # fmt: skip


def _assert_same_run(workdir, reference):
  """The same per-step losses (each step once, in metrics.jsonl and TensorBoard), same params."""
  records = _strict_records(workdir)
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))
  assert {r['step']: r['train/loss'] for r in records} == _losses(reference)
  board = _tensorboard_losses(workdir)
  assert [s for s, _ in board] == list(range(1, STEPS + 1))  # No step twice after a restart.
  assert board == [(s, float(np.float32(_losses(reference)[s]))) for s, _ in board]
  got = train_state.restore_params(f'{workdir}/checkpoints')
  want = train_state.restore_params(f'{reference}/checkpoints', STEPS)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run (checkpoints 4, 8, 12, 16); tests damage copies of it, never it."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  _run(_command(workdir))
  return workdir


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _damage(step_dir, how):
  if how == 'truncated':
    path = _largest_file(f'{step_dir}/state')
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'removed':
    os.remove(_largest_file(f'{step_dir}/state'))
  elif how == 'bit-flipped':
    path = _largest_file(f'{step_dir}/state')
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0x10]))
  elif how == 'meta-truncated':
    os.truncate(f'{step_dir}/meta/metadata', 10)
  elif how == 'metadata-removed':
    os.remove(f'{step_dir}/state/_METADATA')
  elif how == 'manifest-bit-flipped':  # The OCDBT tree's root: TensorStore's checksum fails.
    path = f'{step_dir}/state/manifest.ocdbt'
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0x10]))


# What the one warning line names as the cause (the library's error class and message, the file).
DAMAGE_CAUSES = {
  'manifest-bit-flipped': ['ValueError: DATA_LOSS: ', 'state/manifest.ocdbt',
                           'CRC-32C checksum verification failed'],
  'meta-truncated': ['meta unreadable: JSONDecodeError'],
  'metadata-removed': [f'/{STEPS}/state unreadable: '],
}  # fmt: skip


@pytest.mark.parametrize(
  'how',
  ['truncated', 'removed', 'bit-flipped', 'meta-truncated', 'metadata-removed',
   'manifest-bit-flipped'],
)  # fmt: skip
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumed(
  how, reference, tmp_path
):
  workdir = str(tmp_path / 'w')
  shutil.copytree(reference, workdir)
  _damage(f'{workdir}/checkpoints/{STEPS}', how)
  p = _run(_command(workdir))
  warnings = [line for line in p.lines if 'is damaged' in line]
  assert len(warnings) == 1, p.output()
  assert f'checkpoint step {STEPS} in {workdir}/checkpoints is damaged (' in warnings[0]
  assert f'moved to {workdir}/checkpoints.corrupt/{STEPS}-' in warnings[0]
  for cause in DAMAGE_CAUSES.get(how, []):
    assert cause in warnings[0], warnings[0]
  assert "'NoneType' object has no attribute" not in warnings[0]  # Orbax's swallowed cause.
  # Nothing but our own lines: orbax's and TensorStore's tracebacks go to a file.
  for noise in ('Traceback', 'Event loop is closed', 'Metadata file does not exist'):
    assert noise not in p.output(), p.output()[-4000:]
  assert f'restored step {STEPS} ' not in p.output()  # Only a verified restore is announced.
  assert f'resuming from step {STEPS - 4}' in p.output()  # The previous checkpoint.
  assert os.listdir(f'{workdir}/checkpoints.corrupt')[0].startswith(f'{STEPS}-')
  _assert_same_run(workdir, reference)


@pytest.mark.parametrize('when', ['mid-run', 'async-save-started', 'final-step'])
def test_sigkill_then_restart_loses_nothing(when, reference, tmp_path, procs):
  workdir = str(tmp_path / 'w')
  p = procs(_command(workdir))
  if when == 'mid-run':
    p.wait_for(lambda: _steps_seen(workdir) >= 6)
  elif when == 'async-save-started':  # Killed while the background thread writes step 8.
    p.wait_for_line('checkpoint: saving step 8 ')
  else:  # The last step's metrics are out: the final eval/save and shutdown are under way.
    p.wait_for(lambda: _steps_seen(workdir) >= STEPS)
  p.kill()
  assert p.proc.returncode == -signal.SIGKILL
  _run(_command(workdir))
  _assert_same_run(workdir, reference)


def test_sigterm_checkpoints_within_30s_exits_0_and_resumes(reference, tmp_path, procs):
  workdir = str(tmp_path / 'w')
  long_run = [*_command(workdir, 5000), '--config.log_every=1']
  p = procs(long_run)
  p.wait_for(lambda: _steps_seen(workdir) >= 10)
  start = time.time()
  p.proc.send_signal(signal.SIGTERM)
  assert p.finish(timeout=60) == 0, p.output()
  assert time.time() - start < 30
  last = metrics.read_jsonl(f'{workdir}/metrics.jsonl')[-1]['step']
  ckpt = train_state.Checkpointer(f'{workdir}/checkpoints')
  assert ckpt.latest_step() == last  # The step it was at, not the last periodic checkpoint.
  ckpt.close()
  assert not os.path.exists(f'{workdir}/lock.json')
  summary = p.output().split('Preempted: ')[1]
  assert 'total_steps' not in summary, summary  # Never a hint that ends the run early.
  assert (
    f'resume (the same command): {sys.executable} -m vit_jax.main {_command(workdir, 5000)[3]}'
    in (summary)
  )
  again = _run([*_command(workdir, last + 3), '--config.log_every=1'])
  assert f'resuming from step {last}' in again.output()
  assert [r['step'] for r in _strict_records(workdir)] == list(range(1, last + 4))


def test_second_run_on_a_workdir_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, procs):
  workdir = str(tmp_path / 'w')
  first = procs(_command(workdir, 5000))
  first.wait_for(lambda: _steps_seen(workdir) >= 2)
  start = time.time()
  second = _run(_command(workdir, 5000), expect=1)
  assert time.time() - start < 60
  (error,) = second.errors()
  assert f'workdir {workdir} is in use by pid {first.proc.pid} on host {socket.gethostname()}' in (
    error
  )
  assert 'taken over as soon as that process is gone' in error  # Same host: no lease to wait for.
  assert first.proc.poll() is None  # The first run goes on, untouched.
  first.kill()  # SIGKILL: its lock stays behind, with a dead pid.
  third = _run(_command(workdir, 8))
  assert 'taking over a stale lock' in third.output()
  assert not os.path.exists(f'{workdir}/lock.json')


@contextlib.contextmanager
def _tmpfs(path, size_kb):
  os.makedirs(path)
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_kb}k', 'tmpfs', path],
                        capture_output=True, text=True)  # fmt: skip
  if proc.returncode:
    pytest.skip(f'cannot mount a tmpfs here (needs root): {proc.stderr.strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', path], check=False)


def _fill(directory, leave_bytes):
  path = os.path.join(directory, 'filler')
  fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    with contextlib.suppress(OSError):  # Until the disk is full.
      while True:
        os.write(fd, b'\0' * 65536)
  finally:
    os.close(fd)
  os.truncate(path, max(os.path.getsize(path) - leave_bytes, 0))


def _stopped_in_one_line(p, workdir, cause):
  """A failed save or write: exit 1, one line naming the step, the path and `cause`; nothing torn.

  Returns the last good checkpoint's step (checked to restore).
  """
  assert p.finish() == 1, p.output()
  errors = p.errors()
  assert len(errors) == 1, p.output()[-6000:]  # Seen once in make faults: exit 1, no line.
  (error,) = errors
  assert cause in error, error
  # Nothing after it, no traceback at all: orbax's go to the file that the line names.
  assert p.lines[-1].startswith('ERROR: '), p.output()[-6000:]
  for noise in ('Traceback', 'Task exception was never retrieved', 'Event loop is closed'):
    assert noise not in p.output(), p.output()[-6000:]
  command = error.split('rerun the same command to resume')[1]  # Last, after any notes.
  assert (
    f': {sys.executable} -m vit_jax.main --config=configs/quickstart.py:runlocal,' in command
  ), error
  if ' library tracebacks in ' in error:
    assert os.path.exists(error.split(' library tracebacks in ')[1].split(')')[0]), error
  if 'saving checkpoint step' in error:
    failed = int(error.split('saving checkpoint step ')[1].split()[0])
    assert f'to {workdir}/checkpoints/{failed} failed (noticed at step ' in error
    noticed = int(error.split('noticed at step ')[1].split(')')[0])
    assert noticed <= failed + 4  # Before the next save, not an interval later.
    assert ' is the last good checkpoint' in error, error
  elif 'TensorBoard' in error:
    assert 'writing the TensorBoard events of step ' in error and f'{workdir}/tensorboard' in error
  else:
    assert 'writing the metrics of step ' in error and f'{workdir}/metrics.jsonl' in error
    assert ' is the last good checkpoint' in error, error
  if os.path.exists(f'{workdir}/metrics.jsonl'):
    _strict_records(workdir)  # Still parses.
  good = train_state.Checkpointer(f'{workdir}/checkpoints')
  last_good = good.latest_step()
  good.close()
  assert last_good is not None, p.output()
  if 'saving checkpoint step' in error:
    assert last_good < failed
  train_state.restore_params(f'{workdir}/checkpoints', last_good)  # Intact.
  return last_good


def _assert_resumed(workdir, reference, last_good, log_every):
  again = _run([*_command(workdir), f'--config.log_every={log_every}'])
  assert f'resuming from step {last_good}' in again.output()
  if log_every == 1:  # As the reference: each step once, same losses, same params.
    _assert_same_run(workdir, reference)
  else:
    got = train_state.restore_params(f'{workdir}/checkpoints', STEPS)
    want = train_state.restore_params(f'{reference}/checkpoints', STEPS)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def _without_root():
  """A command prefix under which file permissions apply (root ignores them).

  Root keeps its uid but loses the capabilities that override permissions (`setpriv`, util-linux):
  a plain `setuid` to an unprivileged user cannot work where the interpreter lies under /root.
  """
  if os.geteuid() != 0:
    return []
  if not shutil.which('setpriv'):
    pytest.skip('running as root without setpriv: chmod would deny root nothing')
  return ['setpriv', '--inh-caps=-all', '--bounding-set=-dac_override,-dac_read_search', '--']


def test_permission_denied_mid_run_stops_in_one_line_and_resumes_once_fixed(
  reference, tmp_path, procs
):
  workdir = str(tmp_path / 'w')
  checkpoints = f'{workdir}/checkpoints'
  p = procs([*_without_root(), *_command(workdir)])
  p.wait_for_line('checkpoint: saving step 8 ')  # Step 4 is committed.
  os.kill(p.proc.pid, signal.SIGSTOP)
  os.chmod(checkpoints, 0o555)  # No new step directories, no renames, no deletions.
  try:
    os.kill(p.proc.pid, signal.SIGCONT)
    last_good = _stopped_in_one_line(p, workdir, 'Permission denied')
  finally:
    os.chmod(checkpoints, 0o755)  # Fixed: the same command resumes.
  _assert_resumed(workdir, reference, last_good, log_every=1)


@pytest.mark.parametrize('log_every', [0, 1])
def test_file_size_limit_mid_run_stops_in_one_line_and_resumes(
  log_every, reference, tmp_path, procs
):
  """Disk full without root: RLIMIT_FSIZE set on the running process makes writes fail (EFBIG)."""
  workdir = str(tmp_path / 'w')
  p = procs([*_command(workdir), f'--config.log_every={log_every}'])
  p.wait_for_line('checkpoint: saving step 8 ')  # Step 4 is committed.
  os.kill(p.proc.pid, signal.SIGSTOP)
  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing it.
  resource.prlimit(p.proc.pid, resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
  os.kill(p.proc.pid, signal.SIGCONT)
  last_good = _stopped_in_one_line(p, workdir, 'File too large')
  _assert_resumed(workdir, reference, last_good, log_every)


@pytest.mark.parametrize('log_every', [0, 1])
def test_disk_full_stops_the_run_in_one_line_and_it_resumes_once_space_is_back(
  log_every, tmp_path, procs
):
  steps = 400
  argv = lambda w: [*_command(w, steps), f'--config.log_every={log_every}']  # noqa: E731
  reference = str(tmp_path / 'reference')
  _run(argv(reference))
  with _tmpfs(str(tmp_path / 'disk'), 64 * 1024) as disk:
    workdir = f'{disk}/w'
    p = procs(argv(workdir))
    p.wait_for_line('checkpoint: saving step 12 ')
    os.kill(p.proc.pid, signal.SIGSTOP)  # Frozen while the disk fills up.
    _fill(disk, leave_bytes=2048)
    os.kill(p.proc.pid, signal.SIGCONT)
    last_good = _stopped_in_one_line(p, workdir, 'No space left on device')
    (error,) = p.errors()
    assert f'MiB free on the filesystem of {workdir}' in error, error  # What to free.
    assert f'step {last_good} is the last good checkpoint' in error, error
    assert last_good >= 8
    os.remove(f'{disk}/filler')  # Space is back.
    again = _run(argv(workdir))
    assert f'resuming from step {last_good}' in again.output()
    records = _strict_records(workdir)
    want = metrics.read_jsonl(f'{reference}/metrics.jsonl')
    assert [r['step'] for r in records] == [r['step'] for r in want]
    assert [r['train/loss'] for r in records] == [r['train/loss'] for r in want]


def test_resume_refuses_an_incompatible_config_and_states_a_compatible_change(reference, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(reference, workdir)
  with open(f'{workdir}/config.json') as f:
    before = f.read()
  p = _run([*_command(workdir), '--config.optimizer=sgd', '--config.model.param_dtype=bfloat16'],
           expect=1)  # fmt: skip
  (error,) = p.errors()
  assert f'checkpoint {workdir}/checkpoints/{STEPS} was made with another config: ' in error
  assert "model.param_dtype 'float32' -> 'bfloat16'; optimizer 'adamw' -> 'sgd'" in error
  assert 'Traceback' not in p.output() and len(p.lines) < 40
  assert p.output().count('was made with another config') == 1  # Printed once, not logged too.
  with open(f'{workdir}/config.json') as f:
    assert f.read() == before  # A refused resume leaves the old config.
  p = _run([*_command(workdir, STEPS + 2), '--config.lr=0.001'], devices=1)
  assert (
    f'resuming step {STEPS} with config changes: lr 0.002 -> 0.001; total_steps {STEPS} -> '
    in (p.output())
  )
  assert 'on mesh data=2 x fsdp=1 x tensor=1 in 1 processes, resuming on mesh data=1' in p.output()
  assert 'state resharded; the data order from here on differs' in p.output()


def test_a_finite_loss_spike_stops_the_run_before_it_is_checkpointed(tmp_path, monkeypatch):
  from vit_jax.configs import quickstart

  real = train.Trainer.train_step

  def spiking(self, state, batch, rng):
    state, out = real(self, state, batch, rng)
    if int(jax.device_get(state['step'])) == 14:  # After the guard's 10 steps of history.
      out = dict(out, **{'train/loss': out['train/loss'] * 2e11})  # ~4.8e11: finite.
    return state, out

  monkeypatch.setattr(train.Trainer, 'train_step', spiking)
  config = quickstart.get_config(f'runlocal,steps={STEPS}')
  with config.unlocked():
    config.eval_every = 0
    config.log_every = 5
  workdir = str(tmp_path / 'w')
  with pytest.raises(
    train.TrainingDivergedError, match=r'train/loss=4\.\d+e\+11 spiked over 1000x'
  ):
    train.train_and_evaluate(config, workdir)
  ckpt = train_state.Checkpointer(f'{workdir}/checkpoints')
  assert ckpt.all_steps() == [4, 8, 12]  # Step 16 would have followed the spike.
  ckpt.close()


def _essentials(p):
  """The lines that say why a process ended (not faulthandler's list of extension modules)."""
  keep = ('ERROR', 'Error', 'F12', 'E12', 'W12', 'Fatal', 'Check failed', 'resuming', 'Abort')
  return ''.join(line for line in p.lines if line.startswith(keep) or 'error' in line.lower())[
    -6000:
  ]


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pair(procs, workdir, steps, *extra):
  """Two processes (jax.distributed on localhost, gloo, 2 CPU devices each) on one workdir."""
  port = _free_port()
  return [
    procs(
      [
        *_command(workdir, steps),
        '--config.optimizer=sgd',
        '--config.distributed_heartbeat_seconds=15',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
        *extra,
      ],
      devices=2,  # One device per process fails orbax's save (also on main; not ours).
    )
    for i in range(2)
  ]


def _kill_host(p):
  """SIGKILLs a supervised process and its training child at once, as a host going down would."""
  pid = p.proc.pid
  with open(f'/proc/{pid}/task/{pid}/children') as f:
    children = [int(c) for c in f.read().split()]
  assert children, 'the supervisor has no training child'
  for child in children:
    os.kill(child, signal.SIGKILL)
  p.kill()


def _latest_checkpoint(workdir):
  ckpt = train_state.Checkpointer(f'{workdir}/checkpoints')
  step = ckpt.latest_step()
  ckpt.close()
  return step


def _assert_one_clean_line(p, start):
  """The run's only `ERROR:` line starts with `start`; no C++ dump, no traceback in its output."""
  (error,) = p.errors()
  assert error.startswith(start), error
  assert 'restart every process with the same command' in error.lower(), error
  for dump in ('Check failure', 'Fatal Python error', 'Traceback', 'client.h:'):
    assert dump not in p.output(), _essentials(p)
  return error


def _kill_one_of_a_pair(first, workdir, victim, start):
  """Kills process `victim`'s whole tree mid-run; the survivor exits 1 within 30 s in one line."""
  survivor = first[1 - victim]
  survivor.wait_for(lambda: _steps_seen(workdir) >= 10)
  _kill_host(first[victim])
  began = time.time()
  rc = survivor.finish(timeout=120)
  elapsed = time.time() - began
  assert elapsed < 30, (elapsed, survivor.output()[-3000:])
  assert rc == 1, _essentials(survivor)
  return _assert_one_clean_line(survivor, start)


def test_lost_peer_stops_the_survivor_in_one_line_and_the_pair_resumes(tmp_path, procs):
  workdir = str(tmp_path / 'w')
  pair = lambda steps: _pair(procs, workdir, steps)  # noqa: E731

  _kill_one_of_a_pair(pair(5000), workdir, victim=1, start='ERROR: lost a peer: ')
  step = _latest_checkpoint(workdir)
  second = pair(step + 4)
  for p in second:
    assert p.finish() == 0, _essentials(p)
  assert f'resuming from step {step}' in second[0].output()


def test_lost_coordinator_stops_the_survivor_in_one_line_and_the_pair_resumes(tmp_path, procs):
  """Process 0 (and the coordination service in it) dies with its host.

  Usually JAX's error poller aborts process 1's training child at once; its supervising parent
  turns that into one line and keeps the dump in a crash log. When a collective fails first, the
  child finds the service gone and says the same in its own line.
  """
  workdir = str(tmp_path / 'w')
  pair = lambda steps: _pair(procs, workdir, steps)  # noqa: E731

  start = 'ERROR: lost the coordinator (process 0): '
  error = _kill_one_of_a_pair(pair(5000), workdir, victim=0, start=start)
  if '(details: ' in error:  # The supervisor's line: JAX's abort came first.
    crash_log = error.split('(details: ')[1].rstrip(')\n')
    assert os.path.dirname(crash_log) == workdir, error
    with open(crash_log) as f:
      assert 'JAX distributed service detected fatal errors' in f.read()  # The dump, kept.
  else:  # The child's own line: a collective failed first, and the service did not answer.
    assert 'a collective failed' in error, error
  step = _latest_checkpoint(workdir)
  second = pair(step + 4)
  for p in second:
    assert p.finish() == 0, _essentials(p)
    assert f'resuming from step {step}' in p.output()


def test_sigterm_to_both_supervisors_checkpoints_exits_0_and_the_pair_resumes(tmp_path, procs):
  """Preemption of a multi-process run: each supervising parent forwards SIGTERM to its child."""
  workdir = str(tmp_path / 'w')
  first = _pair(procs, workdir, 5000, '--config.log_every=1')
  first[0].wait_for(lambda: _steps_seen(workdir) >= 10)
  start = time.time()
  for p in first:
    p.proc.send_signal(signal.SIGTERM)
  for p in first:
    assert p.finish(timeout=60) == 0, _essentials(p)
  assert time.time() - start < 30
  last = metrics.read_jsonl(f'{workdir}/metrics.jsonl')[-1]['step']
  assert _latest_checkpoint(workdir) == last  # The step they agreed to stop at.
  second = _pair(procs, workdir, last + 3, '--config.log_every=1')
  codes = [p.finish() for p in second]
  assert codes == [0, 0], [_essentials(p) for p in second]  # Both outputs, to tell who failed.
  for p in second:
    assert f'resuming from step {last}' in p.output()
  assert [r['step'] for r in _strict_records(workdir)] == list(range(1, last + 4))


def test_a_corrupt_image_is_named_in_one_line_at_preparation_and_while_training(tmp_path):
  from PIL import Image

  from vit_jax import data

  root, tfds_dir = tmp_path / 'images', tmp_path / 'tfds'
  for label in ('a', 'b'):
    (root / label).mkdir(parents=True)
    for i in range(12):  # 22 train images: more than one batch of 16.
      Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(root / label / f'{i}.png')
  tfds_dir.mkdir()

  def argv(workdir):
    return [
      *_command(str(tmp_path / workdir), 2),
      f'--config.dataset=folder:{root}',
      f'--config.data_dir={tfds_dir}',
      '--config.eval_splits=validation',
      '--config.pp_train=decode|value_range(-1,1)',
      '--config.pp_eval=decode',
    ]

  bad = root / 'b' / 'bad.jpg'
  bad.write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
  p = _run(argv('w1'), expect=1)  # Caught while preparing the dataset, before any compilation.
  (error,) = p.errors()
  assert f'1 corrupt or unreadable image file(s) in {root}' in error and str(bad) in error, error
  assert 'compiled train step' not in p.output() and 'Traceback' not in p.output()
  bad.unlink()
  builder = data.prepare_folder(str(root), str(tfds_dir))
  (record,) = [  # Damaged after preparation (a bad disk): TensorFlow's checksum catches it.
    os.path.join(d, f) for d, _, fs in os.walk(builder.data_dir) for f in fs if '-train.' in f
  ]
  with open(record, 'r+b') as f:
    f.seek(os.path.getsize(record) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  p = _run(argv('w2'), expect=1)
  (error,) = p.errors()
  assert error.startswith(f"ERROR: reading dataset 'folder:{root}' failed: DataLossError: "), error
  assert 'corrupted record at ' in error and f'prepared files (under {tfds_dir})' in error, error
  assert 'Traceback' not in p.output()


@pytest.fixture(scope='module')
def pair_reference(tmp_path_factory):
  """An uninterrupted two-process run (checkpoints 4, 8, 12, 16)."""
  workdir = str(tmp_path_factory.mktemp('pair_reference'))
  started = []
  try:
    for p in _pair(lambda *a, **k: started.append(Proc(*a, **k)) or started[-1], workdir, STEPS):
      assert p.finish() == 0, _essentials(p)
  finally:
    for p in started:
      p.kill()
  return workdir


@pytest.mark.parametrize('how', ['removed', 'bit-flipped'])
def test_two_processes_agree_on_a_damaged_checkpoint_and_resume_from_the_previous_one(
  how, pair_reference, tmp_path, procs
):
  workdir = str(tmp_path / 'w')
  shutil.copytree(pair_reference, workdir)
  _damage(f'{workdir}/checkpoints/{STEPS}', how)
  for p in _pair(procs, workdir, STEPS):
    assert p.finish() == 0, _essentials(p)
    assert f'resuming from step {STEPS - 4}' in p.output()  # Both: the previous checkpoint.
    assert p.output().count(f'checkpoint step {STEPS} in {workdir}/checkpoints is damaged') == 1
  (moved,) = os.listdir(f'{workdir}/checkpoints.corrupt')  # Moved aside once.
  assert moved.startswith(f'{STEPS}-')
  _assert_same_run(workdir, pair_reference)


def test_sigterm_at_any_moment_of_start_up_or_shut_down_exits_0_and_releases_the_lock(
  reference, tmp_path, procs
):
  """Before the lock, holding it before the restore, after the restore, while compiling, at the end.

  No step has run since the newest checkpoint at any of these moments, so none is written; the
  same command then resumes from it and finishes.
  """
  workdir = str(tmp_path / 'w')
  shutil.copytree(reference, workdir)
  argv = _command(workdir, STEPS + 4)
  for line in ('JAX ', 'mesh ', f'restored step {STEPS} ', 'Cached 512 examples'):
    p = procs(argv)
    p.wait_for_line(line)
    p.proc.send_signal(signal.SIGTERM)
    assert p.finish(timeout=120) == 0, (line, p.output()[-6000:])  # The tail: the cause.
    assert not os.path.exists(f'{workdir}/lock.json'), line
    assert 'Traceback' not in p.output() and not p.errors(), p.output()
    assert 'nothing to checkpoint' in p.output() or 'nothing new to checkpoint' in p.output()
    assert (
      f'rerun the same command to resume: {sys.executable} -m vit_jax.main {argv[3]}' in p.output()
    )
    assert _latest_checkpoint(workdir) == STEPS, line
  p = procs([*argv, '--config.log_every=1'])
  p.wait_for(lambda: _steps_seen(workdir) >= STEPS + 4)  # The last step is done: finishing.
  p.proc.send_signal(signal.SIGTERM)
  assert p.finish(timeout=120) == 0, p.output()
  assert not os.path.exists(f'{workdir}/lock.json')
  assert f'resuming from step {STEPS}' in p.output()
  assert _latest_checkpoint(workdir) == STEPS + 4


def test_two_runs_started_at_once_on_a_workdir_one_trains_and_one_is_refused(tmp_path, procs):
  workdir = str(tmp_path / 'w')
  pair = [procs(_command(workdir, 8)) for _ in range(2)]
  codes = sorted(p.finish() for p in pair)
  assert codes == [0, 1], [p.output()[-3000:] for p in pair]
  refused = [p for p in pair if p.proc.returncode == 1][0]
  (error,) = refused.errors()
  assert f'workdir {workdir} is in use by pid ' in error, error
  assert not os.path.exists(f'{workdir}/lock.json')


def test_workdir_lock_race_thousands_of_trials():
  """tests/lock_race.py from the command line: 2000 trials, 4 processes, no double holder."""
  proc = subprocess.run(
    [sys.executable, 'tests/lock_race.py', '--trials', '2000', '--processes', '4'],
    cwd=REPO, env=cpu_env(1), capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert proc.returncode == 0, (out, proc.stderr[-3000:])
  assert out['double_holders'] == 0 and out['one_holder'] == 2000, out
