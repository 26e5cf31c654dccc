"""Guards around a training run: the workdir lock, the loss-spike guard, the lost-peer watchdog.

`WorkdirLock` keeps a second run off a workdir in use, `SpikeGuard` flags a finite blow-up of the
loss or gradient norm before it is checkpointed, and `PeerWatchdog` stops a multi-process run in
one line when a peer stops answering (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vit_jax.train_state import CheckpointError, WorkdirLockedError

_HELD_HERE: set[str] = set()  # Tokens of the locks this process holds (two runs in one process).
_MISSING = object()


class _LocalLockFile:
  """`lock.json` on a POSIX filesystem: each compare-and-swap runs under `flock`.

  The file is only ever replaced whole (`os.replace` of a complete temporary file), so no reader
  sees it half-written; the `flock` makes read-compare-replace one step for every process on this
  host, and for every host where the filesystem supports it (NFSv4, Lustre, GPFS).
  """

  def __init__(self, path: str):
    self.path = path
    self._warned = False

  @contextlib.contextmanager
  def _mutex(self):
    # The directory itself where it can be locked (no extra file), else a companion file.
    fds = []
    try:
      for target, flags in ((os.path.dirname(self.path), os.O_RDONLY),
                            (f'{self.path}.mutex', os.O_RDWR | os.O_CREAT)):  # fmt: skip
        fd = os.open(target, flags, 0o644)
        fds.append(fd)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX)
          break
        except OSError as e:
          error = e
      else:
        if not self._warned:
          logging.warning('workdir lock %s: no file locks here (%s): best effort', self.path, error)
          self._warned = True
      yield
    finally:
      for fd in fds:
        os.close(fd)  # Releases the flock.

  def read(self) -> tuple[bytes | None, Any]:
    try:
      with open(self.path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      data = None
    return data, data

  def swap(self, version: Any, data: bytes | None) -> Any:
    """Replaces the file by `data` (None: removes it) if it still reads `version`.

    Returns the new version, or None when another process changed the file first.
    """
    with self._mutex():
      if self.read()[1] != version:
        return None
      if data is None:
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        return _MISSING
      tmp = f'{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
      try:
        with open(tmp, 'wb') as f:
          f.write(data)
        os.replace(tmp, self.path)
      finally:
        with contextlib.suppress(FileNotFoundError):
          os.remove(tmp)
      return data


class _GcsLockFile:
  """`lock.json` in a GCS bucket: compare-and-swap on the object's generation."""

  def __init__(self, path: str):
    from google.api_core import exceptions
    from google.cloud import storage

    bucket, _, name = path.removeprefix('gs://').partition('/')
    self._bucket = storage.Client().bucket(bucket)
    self._name = name
    self._conflict = (exceptions.PreconditionFailed, exceptions.NotFound)

  def read(self) -> tuple[bytes | None, Any]:
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None, 0  # Generation 0: "does not exist" in a precondition.
    try:
      return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
    except self._conflict:  # Replaced between the two calls: read again.
      return self.read()

  def swap(self, version: Any, data: bytes | None) -> Any:
    blob = self._bucket.blob(self._name)
    try:
      if data is None:
        blob.delete(if_generation_match=version)
        return _MISSING
      blob.upload_from_string(data, content_type='application/json', if_generation_match=version)
    except self._conflict:
      return None
    return blob.generation


class _GfileLockFile:
  """Other remote filesystems (gs:// without google-cloud-storage): no compare-and-swap."""

  def __init__(self, path: str):
    import tensorflow as tf

    self._gfile = tf.io.gfile
    self.path = path
    logging.warning(
      'workdir lock %s: best effort (no atomic compare-and-swap without google-cloud-storage: two '
      'runs started within a second of each other may both start); pip install '
      'google-cloud-storage for an atomic lock',
      path,
    )

  def read(self) -> tuple[bytes | None, Any]:
    if not self._gfile.exists(self.path):
      return None, None
    with self._gfile.GFile(self.path, 'rb') as f:
      data = f.read()
    return data, data

  def swap(self, version: Any, data: bytes | None) -> Any:
    if self.read()[1] != version:
      return None
    if data is None:
      self._gfile.remove(self.path)
      return _MISSING
    with self._gfile.GFile(self.path, 'wb') as f:
      f.write(data)
    return data


def _lock_file(path: str):
  if '://' not in path:
    return _LocalLockFile(path)
  if path.startswith('gs://'):
    with contextlib.suppress(ImportError):  # No google-cloud-storage.
      return _GcsLockFile(path)
  return _GfileLockFile(path)


class WorkdirLock:
  """`workdir/lock.json`: host, pid, a token, and a lease renewed in the background while it runs.

  A second run on the same workdir is refused at once. A lock whose process is gone (same host) or
  whose lease has expired (another host, e.g. a preempted VM) is taken over, so a dead run never
  blocks its restart. Every change of the file is a compare-and-swap: local and shared POSIX
  filesystems under `flock`, gs:// on the object's generation (with google-cloud-storage; best
  effort without it), so two runs can never both hold it. Process 0 holds it for the whole job.
  """

  def __init__(self, workdir: str, *, lease_seconds: float = 60.0):
    self.path = os.path.join(workdir, 'lock.json')
    self.lease_seconds = lease_seconds
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None
    self._file = None
    self._version = None
    self._started = ''

  def _record(self) -> bytes:
    return json.dumps({
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'token': self.token,
      'lease_until': time.time() + self.lease_seconds,
      'started': self._started,
    }).encode()  # fmt: skip

  def _stale(self, held: dict) -> bool:
    """Whether the run that wrote `held` is gone: by its pid on this host, else by its lease."""
    if held.get('host') != socket.gethostname():
      return time.time() > float(held.get('lease_until', 0))
    if held.get('token') in _HELD_HERE:
      return False  # Another run in this very process.
    try:
      pid = int(held['pid'])
    except (KeyError, TypeError, ValueError):
      return True
    if pid == os.getpid():
      return True  # Left by an earlier run of this process that did not release it.
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # Alive, another user's.
      return False
    return False

  def acquire(self) -> WorkdirLock:
    """Takes the lock (process 0); raises `WorkdirLockedError` if a live run holds it."""
    if jax.process_index() != 0:
      return self
    workdir = os.path.dirname(self.path)
    if '://' not in workdir:
      try:
        os.makedirs(workdir, exist_ok=True)
      except OSError as e:
        raise CheckpointError(
          f'workdir {workdir} cannot be created: {e.strerror}; choose a writable --workdir'
        ) from e
    self._file = _lock_file(self.path)
    self._started = time.strftime('%Y-%m-%d %H:%M:%S')
    for _ in range(20):
      raw, version = self._file.read()
      try:
        held = None if raw is None else json.loads(raw)
      except ValueError:  # Damaged by hand or a disk fault: nobody holds it.
        held = None
      if isinstance(held, dict) and held and not self._stale(held):
        raise WorkdirLockedError(_locked_message(workdir, held, self.lease_seconds))
      with _signals_deferred():  # The file and this object agree before a signal can stop us.
        new = self._file.swap(version, self._record())
        if new is None:
          continue  # Another process changed it first: look again.
        self._version = new
        _HELD_HERE.add(self.token)
      if raw is not None:
        logging.warning('workdir lock %s: taking over a stale lock %s', self.path, raw.decode(
          errors='replace'))  # fmt: skip
      self._stop.clear()
      self._thread = threading.Thread(target=self._renew, daemon=True, name='workdir-lock')
      self._thread.start()
      return self
    raise WorkdirLockedError(f'could not take the workdir lock {self.path}: other runs race for it')

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      try:
        new = self._file.swap(self._version, self._record())
      except OSError as e:  # A full disk must not kill the run from this thread.
        logging.warning('workdir lock %s: renewal failed: %s', self.path, e)
        continue
      if new is None:
        logging.error('workdir lock %s: taken over by another run; this run no longer holds it',
                      self.path)  # fmt: skip
        return
      self._version = new

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    """Removes the lock file if it is still this run's (by its token), whatever else happened.

    Safe to call at any moment, also when `acquire` was interrupted (a signal) after the file was
    written: the file, not this object's bookkeeping, decides. Signals wait until it is done.
    """
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    if self._file is None:
      return
    with _signals_deferred():
      with contextlib.suppress(OSError, ValueError):
        raw, version = self._file.read()
        if raw is not None and json.loads(raw).get('token') == self.token:
          self._file.swap(version, None)
      _HELD_HERE.discard(self.token)


@contextlib.contextmanager
def _signals_deferred():
  """SIGTERM and SIGINT are delivered after the block (main thread; elsewhere a no-op)."""
  deferred = {signal.SIGTERM, signal.SIGINT}
  try:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
  except (AttributeError, OSError, ValueError):
    previous = None
  try:
    yield
  finally:
    if previous is not None:
      signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _locked_message(workdir: str, held: dict, lease_seconds: float) -> str:
  same_host = held.get('host') == socket.gethostname()
  then = (
    'it is taken over as soon as that process is gone'
    if same_host
    else f'if that host is gone, it is taken over {lease_seconds:.0f} s after its last renewal'
  )
  return (
    f'workdir {workdir} is in use by pid {held.get("pid")} on host {held.get("host")} (since '
    f'{held.get("started")}): wait for that run or stop it, or use another --workdir ({then})'
  )


class SpikeGuard:
  """Flags a finite blow-up: loss or grad norm above `factor` times its running median.

  `factor` <= 0 disables it. The median is over the last `window` checked steps and the guard
  starts after `min_history` of them, so early training's fast changes do not trigger it.
  """

  KEYS = ('train/loss', 'train/grad_norm')

  def __init__(self, factor: float, *, window: int = 200, min_history: int = 10):
    self.factor = factor
    self.window = window
    self.min_history = min_history
    self._history = {k: [] for k in self.KEYS}

  def check(self, metrics: Mapping[str, Any]) -> list[str]:
    """Descriptions of the spiking values (empty if none); records the values otherwise."""
    if self.factor <= 0:
      return []
    bad = []
    for key in self.KEYS:
      history = self._history[key]
      value = float(metrics[key])
      if len(history) >= self.min_history:
        median = float(np.median(history))
        if median > 0 and value > self.factor * median:
          bad.append(
            f'{key}={value:.4g} spiked over {self.factor:g}x its running median {median:.4g}'
          )
    if not bad:
      for key in self.KEYS:
        self._history[key] = (self._history[key] + [float(metrics[key])])[-self.window :]
    return bad


class PeerWatchdog:
  """Multi-process runs: stops this process with one line when a peer stops answering.

  Each process bumps a counter in JAX's coordination service every `timeout / 6` seconds; a
  background thread watches the others' counters and, when one has not moved for `timeout`
  seconds (a host died, the network split) or the service itself is gone (process 0 died),
  prints `ERROR: lost peer ...` and exits 1 at once: the collectives it would wait in never return,
  and JAX's own heartbeat (set to four times `timeout` as a backstop) would abort with a C++ dump.
  Restarting every process with the same command resumes from the last checkpoint.
  """

  def __init__(self, timeout: float, workdir: str):
    self.timeout = timeout
    self.workdir = workdir
    self._stop = threading.Event()

  def start(self) -> PeerWatchdog:
    if jax.process_count() == 1 or self.timeout <= 0:
      return self
    from jax._src import distributed  # The client multihost_utils uses too.

    client = distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    thread = threading.Thread(
      target=self._watch, args=(client, me, n), daemon=True, name='peer-watchdog'
    )
    thread.start()
    return self

  def _watch(self, client, me: int, n: int) -> None:
    seen: dict[int, tuple[str, float]] = {}
    count = failures = 0
    while not self._stop.wait(self.timeout / 6):
      count += 1
      now = time.monotonic()
      try:
        client.key_value_set(f'vit_jax/alive/{me}', str(count), allow_overwrite=True)
        for peer in range(n):
          if peer == me:
            continue
          try:
            value = client.key_value_try_get(f'vit_jax/alive/{peer}')
          except Exception:  # Not stamped yet: still starting.
            continue
          if seen.get(peer, (None,))[0] != value:
            seen[peer] = (value, now)
          elif now - seen[peer][1] > self.timeout and not self._stop.is_set():
            self._lost(f'peer process {peer} sent no heartbeat for {self.timeout:.0f} s')
        failures = 0
      except Exception as e:  # The coordination service (process 0) is gone, if it persists.
        failures += 1
        if failures >= 3 and not self._stop.is_set():
          self._lost(f'it stopped answering ({type(e).__name__})', coordinator=True)

  def _lost(self, why: str, *, coordinator: bool = False) -> None:
    lost = 'the coordinator (process 0)' if coordinator else 'a peer'
    message = (
      f'lost {lost}: {why} (host down or network split); stopping process '
      f'{jax.process_index()} too. Restart every process with the same command: they resume from '
      f'the last checkpoint in {os.path.join(self.workdir, "checkpoints")}.'
    )
    exit_lost_peer(message)

  def stop(self) -> None:
    self._stop.set()


def coordinator_lost(timeout: float = 2.0) -> bool:
  """Whether JAX's coordination service, in process 0, has stopped answering this process.

  Asked after a collective failed, to name the peer that is gone: process 0's death takes the
  service with it. False in process 0, and when the answer takes longer than `timeout` seconds.
  """
  if jax.process_count() == 1 or jax.process_index() == 0:
    return False
  from jax._src import distributed

  client = distributed.global_state.client
  answer = []

  def probe():
    try:
      client.key_value_set(f'vit_jax/probe/{jax.process_index()}', '1', allow_overwrite=True)
      answer.append(False)
    except Exception:  # UNAVAILABLE: the service is gone.
      answer.append(True)

  thread = threading.Thread(target=probe, daemon=True, name='coordinator-probe')
  thread.start()
  thread.join(timeout)
  return bool(answer and answer[0])


_LOST_PEER = threading.Lock()


def exit_lost_peer(message: str) -> None:
  """Prints `ERROR: <message>` and exits 1 at once (`os._exit`), once per process.

  The watchdog thread and the main thread (a failed collective) may both see the loss: the second
  waits for the first to end the process. Not `sys.exit`: the main thread may be blocked in a
  collective forever, and its exit handlers include `jax.distributed.shutdown`, whose barrier waits
  for the dead peer until JAX's heartbeat timeout and then aborts with a C++ dump.
  """
  if not _LOST_PEER.acquire(blocking=False):
    threading.Event().wait()  # The other reporter is ending the process.
  logging.error('%s', message)
  print(f'ERROR: {message}', file=sys.stderr, flush=True)
  for handler in logging.getLogger().handlers:
    handler.flush()
  sys.stdout.flush()
  os._exit(1)
