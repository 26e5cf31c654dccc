"""A supervising parent for multi-process runs: a lost coordinator ends in one line, not a dump.

When process 0 of a `jax.distributed` run dies, it takes JAX's coordination service with it, and
JAX's error poller aborts every other process at once with a C++ dump (`client.h:80] Terminating
process because the JAX distributed service detected fatal errors`), which no Python code in that
process can intercept. So `python -m vit_jax.main`, when it is one process of several, re-runs
itself as a child (`VIT_JAX_SUPERVISOR_PID` set, so the child trains) and stays as its parent:

- the child's stdout and stderr pass through line by line, except native crash output on stderr
  (the abort, CHECK failures, faulthandler's thread dumps), which goes to
  `<workdir>/crash-process<P>-<UTC time>.log`;
- when the child dies of such an abort caused by the coordination service, the parent prints
  `ERROR: lost the coordinator (process 0) ...` and exits 1; otherwise it exits with the child's
  status (128 + N when the child died of signal N);
- SIGTERM and SIGINT are forwarded to the child, which runs in its own process group; a child
  whose parent is gone exits within `ORPHAN_POLL_SECONDS` (`exit_when_orphaned`).

Standard library only: the parent never imports JAX or TensorFlow. `VIT_JAX_SUPERVISE=0` turns it
off.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

SUPERVISOR_ENV = 'VIT_JAX_SUPERVISOR_PID'
ORPHAN_POLL_SECONDS = 0.5
HOLD_SECONDS = 2.0  # How long a native error line waits to see whether an abort follows it.

# The start of a native crash report: a fatal absl/glog line (JAX's `client.h:80] Terminating
# process`), a CHECK failure, a C++ signal handler's report, std::terminate, faulthandler.
_DUMP = re.compile(
  r'^F\d{4} \d\d:\d\d:\d\d|client\.h:\d+\]|Check fail|\*\*\* (Begin stack trace|SIG\w+|Aborted at)'
  r'|^terminate called|^Fatal Python error'
)
# Held a moment, as they often come just before an abort: an error line of the C++ runtime (absl
# format, a C++ source), and the child's own report of a lost peer (the abort, when it follows,
# names the coordinator, and the parent reports that instead).
_HOLD = re.compile(r'^E\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w./-]+\.(cc|h|cpp):\d+\]|^ERROR: lost ')
_COORDINATION = re.compile(r'distributed service|coordination.?service', re.IGNORECASE)


def cluster_detected(environ=os.environ) -> bool:
  """A multi-process environment that `jax.distributed.initialize()` can configure by itself."""
  if int(environ.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_STEP_ID' in environ:
    return True
  hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  if ',' in hosts or environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  return bool(environ.get('JAX_COORDINATOR_ADDRESS'))


def parse_flags(argv, _depth: int = 0) -> dict[str, str]:
  """The flags that decide supervision, as absl reads them, with local `--flagfile`s read too.

  `--name=value`; `--name value` for the valued flags below; `--name` / `--noname` otherwise
  (booleans). A flagfile the parent cannot open (a gs:// path) is left to the child.
  """
  valued = ('workdir', 'coordinator_address', 'num_processes', 'process_id', 'distributed')
  found: dict[str, str] = {}
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == '--':
      break
    if not arg.startswith('-'):
      continue
    name, eq, value = arg.lstrip('-').partition('=')
    if not eq and name in (*valued, 'flagfile'):
      if not args:
        continue
      value = args.pop(0)
    elif not eq:
      name, value = (name[2:], 'false') if name.startswith('no') else (name, 'true')
    if name != 'flagfile':
      found[name] = value
      continue
    try:
      with open(value) as f:
        lines = [line.strip() for line in f]
    except OSError:
      continue
    if _depth < 10:
      found.update(parse_flags([x for x in lines if x.startswith('-')], _depth + 1))
  return found


def wanted(argv, environ=os.environ) -> bool:
  """Whether `python -m vit_jax.main argv` is one process of several and should be supervised."""
  if SUPERVISOR_ENV in environ or environ.get('VIT_JAX_SUPERVISE', '') == '0':
    return False
  flags = parse_flags(argv)
  quick = ('help', 'helpfull', 'h', 'print_config', 'list_models')
  if flags.get('distributed') == 'off' or any(flags.get(f) == 'true' for f in quick):
    return False
  if flags.get('num_processes', '').isdigit():
    return int(flags['num_processes']) > 1
  explicit = flags.get('coordinator_address') or 'process_id' in flags  # As main.py decides.
  return bool(explicit) or flags.get('distributed') == 'on' or cluster_detected(environ)


def process_id(flags: dict[str, str], environ=os.environ) -> str | None:
  """This process's index, from `--process_id` or the cluster's environment, if known."""
  ids = (flags.get('process_id'), environ.get('SLURM_PROCID'), environ.get('TPU_WORKER_ID'))
  return next((v for v in ids if v is not None and v.isdigit()), None)


class _Relay:
  """Passes the child's stderr on, holding native crash output back into the crash log.

  Only stderr: that is where absl, faulthandler and the C++ runtime write, and a dump seen there
  must not catch stdout lines printed before it but read after it.
  """

  def __init__(self, crash_path: str):
    self.crash_path = crash_path
    self.crash = None  # The crash log, opened at the first held line.
    self.lock = threading.Lock()
    self.pending: list[tuple[object, bytes]] = []  # `_HOLD` lines and after, until `deadline`.
    self.deadline = 0.0
    self.dumping = False
    self.coordination = False  # A held line names the coordination service.

  def feed(self, out, line: bytes) -> None:
    text = line.decode(errors='replace')
    with self.lock:
      if not self.dumping and _DUMP.search(text):
        self.dumping = True
        for _, held in self.pending:
          self._hold(held)
        self.pending = []
      if self.dumping:
        self._hold(line)
      elif self.pending or _HOLD.match(text):
        if not self.pending:
          self.deadline = time.monotonic() + HOLD_SECONDS
        self.pending.append((out, line))
      else:
        _write(out, line)

  def _hold(self, line: bytes) -> None:
    self.coordination = self.coordination or bool(
      _COORDINATION.search(line.decode(errors='replace'))
    )
    if self.crash is None:
      try:
        os.makedirs(os.path.dirname(self.crash_path), exist_ok=True)
        self.crash = open(self.crash_path, 'ab')
      except OSError:
        self.crash_path = os.path.join(tempfile.gettempdir(), os.path.basename(self.crash_path))
        self.crash = open(self.crash_path, 'ab')
    self.crash.write(line)
    self.crash.flush()

  def release(self, to: str = 'console', *, when_due: bool = False) -> None:
    """Pending lines go to the console (`when_due`: once held `HOLD_SECONDS`) or the crash log."""
    with self.lock:
      if not self.pending or (when_due and time.monotonic() < self.deadline):
        return
      for out, line in self.pending:
        if to == 'crash log':
          self._hold(line)
        else:
          _write(out, line)
      self.pending = []


def _write(out, line: bytes) -> None:
  with contextlib.suppress(OSError, ValueError):  # The console went away; the run goes on.
    out.write(line)
    out.flush()


def _pump(pipe, out, relay: _Relay | None) -> None:
  for line in iter(pipe.readline, b''):
    if relay is None:
      _write(out, line)
    else:
      relay.feed(out, line)


def run(argv, *, command=None, environ=os.environ) -> int:
  """Runs the training child and returns the exit status this process should end with.

  Args:
    argv: the command line's arguments (`sys.argv[1:]`), passed to the child unchanged.
    command: the child's command; default `python -m vit_jax.main argv` (tests pass others).
    environ: the environment the child inherits (with `VIT_JAX_SUPERVISOR_PID` added).
  """
  flags = parse_flags(argv)
  me = process_id(flags, environ)
  workdir = flags.get('workdir') or ''
  if not workdir or '://' in workdir:  # The parent writes only local files.
    workdir = tempfile.gettempdir()
  stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
  name = f'process{me}' if me is not None else f'{os.uname().nodename}-{os.getpid()}'
  relay = _Relay(os.path.join(workdir, f'crash-{name}-{stamp}.log'))
  env = dict(environ, **{SUPERVISOR_ENV: str(os.getpid())})
  env.setdefault('PYTHONUNBUFFERED', '1')  # Lines reach the parent as printed, not at exit.
  command = command or [sys.executable, '-m', 'vit_jax.main', *argv]
  received = []
  forward = lambda signum, frame: received.append(signum)  # noqa: E731
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    child = subprocess.Popen(
      command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0
    )
    pumps = [
      threading.Thread(target=_pump, args=args, daemon=True)
      for args in (
        (child.stdout, sys.stdout.buffer, None),
        (child.stderr, sys.stderr.buffer, relay),
      )
    ]
    for pump in pumps:
      pump.start()
    while True:
      while received:
        with contextlib.suppress(ProcessLookupError):
          child.send_signal(received.pop(0))
      try:
        rc = child.wait(timeout=0.1)
        break
      except subprocess.TimeoutExpired:
        relay.release(when_due=True)
    for pump in pumps:
      pump.join(timeout=2)  # A grandchild may hold the pipes open.
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  relay.release('crash log' if rc < 0 else 'console')  # A signal: they preceded the death.
  if relay.crash is not None:
    relay.crash.close()
    # The abort of JAX's error poller, or a death by a signal after the service's errors. Checked
    # whatever the status: a child that exits on its own while the abort is under way counts too.
    if relay.coordination and (relay.dumping or rc < 0):
      if me == '0':
        why = 'lost a peer: the JAX distributed service found a fatal error and stopped process 0'
      else:
        who = f'process {me}' if me is not None else 'this process'
        why = f'lost the coordinator (process 0): the JAX distributed service stopped {who}'
      _report(
        f'{why}; restart every process with the same command to resume from the last checkpoint '
        f'(details: {relay.crash_path})'
      )
      return 1
    _report(f'the run crashed (exit status {_status(rc)}); its native crash output is in '
            f'{relay.crash_path}')  # fmt: skip
  return _status(rc)


def _status(rc: int) -> int:
  return 128 - rc if rc < 0 else rc


def _report(message: str) -> None:
  with contextlib.suppress(OSError):
    print(f'ERROR: {message}', file=sys.stderr, flush=True)


def exit_when_orphaned(interval: float = ORPHAN_POLL_SECONDS, environ=os.environ):
  """In a supervised child: exits (status 1) once the supervising parent is gone.

  A parent that is SIGKILLed (a host going down, a scheduler killing the job) cannot stop its child;
  the child polls its parent's pid instead. Returns the watching thread, or None when unsupervised.
  """
  parent = environ.get(SUPERVISOR_ENV, '')
  if not parent.isdigit():
    return None

  def watch():
    while os.getppid() == int(parent):
      time.sleep(interval)
    os._exit(1)

  thread = threading.Thread(target=watch, daemon=True, name='supervisor-watch')
  thread.start()
  return thread
