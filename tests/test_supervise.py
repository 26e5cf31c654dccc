"""The supervising parent of multi-process runs (vit_jax/supervise.py), with small fake children.

No JAX here: each child is a `python -c` script that prints, crashes or waits the way a training
process would; the parent runs in its own interpreter so that its signal handling is real.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vit_jax import supervise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARENT = (
  'import sys; from vit_jax import supervise; '
  'sys.exit(supervise.run(sys.argv[2:], command=[sys.executable, "-c", sys.argv[1]]))'
)
# What JAX prints when its error poller aborts a process whose coordinator died (abridged).
ABORT = r"""
import faulthandler, os, sys
faulthandler.enable()
print('I1203 07:36:19.115377 1401 train_state.py:133] checkpoint: saving step 8', file=sys.stderr)
print('E1203 07:36:20.131606    7798 coordination_service_agent.cc:289] Polled an error from '
      'coordination service (this can be an error from this or another task).', file=sys.stderr)
print('F1203 07:36:20.131614    7798 client.h:80] Terminating process because the JAX distributed '
      'service detected fatal errors.', file=sys.stderr)
print('*** Check failure stack trace: ***', file=sys.stderr)
print('    @     0x7f0385c40634  absl::log_internal::LogMessage::SendToLog()', file=sys.stderr)
sys.stderr.flush()
os.abort()
"""


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=REPO, **extra)
  env.pop(supervise.SUPERVISOR_ENV, None)
  return env


def _start(child, *argv, env=None):
  return subprocess.Popen(
    [sys.executable, '-c', PARENT, textwrap.dedent(child), *argv],
    cwd=REPO,
    env=env or _env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _supervise(child, *argv):
  p = _start(child, *argv)
  out, err = p.communicate(timeout=60)
  return p.returncode, out, err


def _wait_line(stream, text, timeout=20):
  deadline = time.time() + timeout
  lines = []
  while time.time() < deadline:
    line = stream.readline()
    lines.append(line)
    if text in line:
      return lines
  raise TimeoutError(f'{text!r} not seen: {lines}')


def test_output_passes_through_line_by_line_and_status_0():
  child = """
    import sys
    print('I1203 07:32:40.029388 1396 pipeline.py:203] cached', file=sys.stderr)
    print('W1203 07:32:40.029388 1396 gloo.cc:12] a native warning', file=sys.stderr)
    print('Training finished at step 16.')
  """
  rc, out, err = _supervise(child)
  assert rc == 0
  assert out == 'Training finished at step 16.\n'
  assert err.splitlines() == [
    'I1203 07:32:40.029388 1396 pipeline.py:203] cached',
    'W1203 07:32:40.029388 1396 gloo.cc:12] a native warning',
  ]


@pytest.mark.parametrize('me', ['1', '0'])
def test_an_abort_from_the_coordination_service_is_one_line_and_the_dump_goes_to_a_crash_log(
  me, tmp_path
):
  workdir = str(tmp_path / 'w')
  rc, out, err = _supervise(ABORT, f'--workdir={workdir}', f'--process_id={me}')
  assert rc == 1
  (log,) = os.listdir(workdir)
  assert re.fullmatch(rf'crash-process{me}-\d{{8}}T\d{{6}}Z\.log', log), log
  lines = err.splitlines()
  assert lines[0] == 'I1203 07:36:19.115377 1401 train_state.py:133] checkpoint: saving step 8'
  assert len(lines) == 2, err  # The line before the abort, then ours: nothing of the dump.
  if me == '1':
    assert lines[1].startswith(
      'ERROR: lost the coordinator (process 0): the JAX distributed service stopped process 1; '
      'restart every process with the same command to resume from the last checkpoint'
    ), lines[1]
  else:  # Process 0 runs the service: it lost a peer.
    assert lines[1].startswith('ERROR: lost a peer: the JAX distributed service found a fatal'), (
      lines[1]
    )
  assert lines[1].endswith(f'(details: {workdir}/{log})')
  with open(f'{workdir}/{log}') as f:
    dump = f.read()
  for held in ('Polled an error', 'client.h:80] Terminating', 'Check failure', 'SendToLog'):
    assert held in dump
  assert 'Fatal Python error: Aborted' in dump and 'most recent call first' in dump  # faulthandler
  assert out == ''


def test_another_native_crash_keeps_its_status_and_names_the_crash_log(tmp_path):
  child = """
    import faulthandler, os, signal
    faulthandler.enable()
    print('step 3', flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
  """
  rc, out, err = _supervise(child, f'--workdir={tmp_path}', '--process_id=2')
  assert rc == 128 + signal.SIGSEGV
  assert out == 'step 3\n'
  (line,) = err.splitlines()
  (log,) = os.listdir(tmp_path)
  assert line == (
    f'ERROR: the run crashed (exit status {128 + signal.SIGSEGV}); its native crash output is in '
    f'{tmp_path}/{log}'
  )
  with open(tmp_path / log) as f:
    assert 'Fatal Python error: Segmentation fault' in f.read()


@pytest.mark.parametrize(
  'child, status',
  [
    ('import sys; sys.exit(3)', 3),
    ('import os, signal; os.kill(os.getpid(), signal.SIGKILL)', 128 + signal.SIGKILL),
    ('import os, signal; os.kill(os.getpid(), signal.SIGTERM)', 128 + signal.SIGTERM),
  ],
)
def test_exit_status_passes_through_and_a_signal_is_128_plus_its_number(child, status, tmp_path):
  rc, out, err = _supervise(child, f'--workdir={tmp_path}')
  assert (rc, out, err) == (status, '', '')
  assert os.listdir(tmp_path) == []  # No dump, no crash log.


def test_a_native_error_line_without_a_crash_reaches_the_console_while_the_child_runs(tmp_path):
  go = tmp_path / 'go'
  child = f"""
    import os, sys, time
    print('E1203 07:36:20.131606 7798 gloo.cc:9] a recoverable error', file=sys.stderr, flush=True)
    print('more', file=sys.stderr, flush=True)
    end = time.time() + 30
    while not os.path.exists({str(go)!r}) and time.time() < end:
      time.sleep(0.05)
  """
  p = _start(child)
  try:
    lines = _wait_line(p.stderr, 'more')  # Released after HOLD_SECONDS, in order.
    assert lines == ['E1203 07:36:20.131606 7798 gloo.cc:9] a recoverable error\n', 'more\n']
    assert p.poll() is None
    go.touch()
    assert p.wait(timeout=30) == 0
  finally:
    p.kill()


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_are_forwarded_to_the_child_in_its_own_process_group(sig):
  child = """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda s, f: (print('got', s, flush=True), sys.exit(0)))
    signal.signal(signal.SIGINT, lambda s, f: (print('got', s, flush=True), sys.exit(0)))
    print('ready', os.getpgrp() == os.getpid(), flush=True)
    time.sleep(60)
  """
  p = _start(child)
  try:
    assert _wait_line(p.stdout, 'ready')[-1] == 'ready True\n'  # Its own process group.
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert (p.returncode, out, err) == (0, f'got {int(sig)}\n', '')
  finally:
    p.kill()


def _gone(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(') ')[1][0] == 'Z'  # A zombie has exited.
  except FileNotFoundError:
    return True


def test_a_child_whose_supervisor_is_killed_exits_within_a_second():
  child = """
    import os, time
    from vit_jax import supervise
    supervise.exit_when_orphaned()
    print(os.getpid(), flush=True)
    time.sleep(60)
  """
  p = _start(child)
  pid = None
  try:
    pid = int(p.stdout.readline())
    time.sleep(1)
    assert not _gone(pid)  # Supervised and alive.
    p.kill()  # SIGKILL: the parent cannot stop its child.
    p.wait()
    start = time.time()
    while not _gone(pid) and time.time() - start < 10:
      time.sleep(0.05)
    assert _gone(pid) and time.time() - start < 1 + supervise.ORPHAN_POLL_SECONDS
  finally:
    p.kill()
    if pid is not None and not _gone(pid):
      os.kill(pid, signal.SIGKILL)


def test_exit_when_orphaned_does_nothing_unsupervised():
  assert supervise.exit_when_orphaned(environ={}) is None


@pytest.mark.parametrize(
  'env, detected',
  [
    ({}, False),
    ({'SLURM_NTASKS': '4', 'SLURM_STEP_ID': '0'}, True),
    ({'SLURM_NTASKS': '4'}, False),  # sbatch's own shell, not a job step.
    ({'SLURM_NTASKS': '1', 'SLURM_STEP_ID': '0'}, False),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'w0'}, False),
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'h:8080'}, True),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1234'}, True),
  ],
)
def test_cluster_detection(env, detected):
  assert supervise.cluster_detected(env) is detected


@pytest.mark.parametrize(
  'argv, env, supervised',
  [
    (['--config=c.py', '--workdir=w'], {}, False),
    (['--num_processes=2', '--process_id=0', '--coordinator_address=h:1'], {}, True),
    (['--num_processes', '2', '--process_id', '1'], {}, True),
    (['-num_processes=4'], {}, True),
    (['--num_processes=1', '--coordinator_address=h:1'], {}, False),
    (['--coordinator_address=h:1'], {}, True),
    (['--process_id=3'], {}, True),
    (['--distributed=on'], {}, True),
    (['--distributed', 'off', '--num_processes=2'], {}, False),
    ([], {'SLURM_NTASKS': '2', 'SLURM_STEP_ID': '0'}, True),
    (['--distributed=off'], {'SLURM_NTASKS': '2', 'SLURM_STEP_ID': '0'}, False),
    (['--num_processes=2'], {supervise.SUPERVISOR_ENV: '123'}, False),  # The child itself.
    (['--num_processes=2'], {'VIT_JAX_SUPERVISE': '0'}, False),
    (['--num_processes=2', '--print_config'], {}, False),
    (['--list_models'], {'SLURM_NTASKS': '2', 'SLURM_STEP_ID': '0'}, False),
    (['--num_processes=2', '--noprint_config'], {}, True),
    (['--config=c.py', '--', '--num_processes=2'], {}, False),
  ],
)
def test_which_runs_are_supervised(argv, env, supervised):
  assert supervise.wanted(argv, env) is supervised


def test_flagfiles_are_read_and_a_missing_one_leaves_the_run_unsupervised(tmp_path):
  inner, outer = tmp_path / 'inner.flags', tmp_path / 'outer.flags'
  inner.write_text('# multi-process\n--num_processes=2\n--process_id=1\n')
  outer.write_text(f'--workdir=/w\n--flagfile={inner}\n')
  assert supervise.wanted([f'--flagfile={outer}'], {})
  assert supervise.parse_flags(['--flagfile', str(outer)]) == {
    'workdir': '/w',
    'num_processes': '2',
    'process_id': '1',
  }
  assert not supervise.wanted(['--flagfile=gs://bucket/run.flags'], {})


def test_the_parent_never_imports_jax_or_tensorflow():
  code = (
    'import sys, vit_jax.main, vit_jax.supervise; '
    "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, env=_env(), capture_output=True, text=True, check=True
  ).stdout
  assert out == '[]\n'


def test_a_supervised_main_reports_a_config_mistake_in_one_line_with_its_status(tmp_path):
  """`python -m vit_jax.main` of a multi-process run, through the parent and its child."""
  argv = ['--num_processes=2', '--process_id=1', '--coordinator_address=127.0.0.1:1']
  p = subprocess.run(
    [sys.executable, '-m', 'vit_jax.main', '--config=configs/nope.py', f'--workdir={tmp_path}',
     *argv],
    cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert p.returncode == 2
  (line,) = p.stderr.splitlines()
  assert line.startswith("ERROR: --config=configs/nope.py: no recipe 'configs/nope.py'"), line
