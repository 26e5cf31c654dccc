"""Guards around a training run: the workdir lock, the loss-spike guard, the lost-peer watchdog.

`WorkdirLock` keeps a second run off a workdir in use, `SpikeGuard` flags a finite blow-up of the
loss or gradient norm before it is checkpointed, and `PeerWatchdog` stops a multi-process run in
one line when a peer stops answering (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vit_jax.train_state import CheckpointError, WorkdirLockedError


class WorkdirLock:
  """`workdir/lock.json`: host, pid and a lease renewed in the background while the run lives.

  A second run on the same workdir is refused at once. A lock whose process is gone (same host) or
  whose lease has expired (another host, e.g. a preempted VM) is taken over, so a dead run never
  blocks its restart. Process 0 holds it for the whole job. Local and shared POSIX filesystems get
  an atomic create; on gs:// the check is best effort (no atomic create-if-absent).
  """

  def __init__(self, workdir: str, *, lease_seconds: float = 60.0):
    self.path = os.path.join(workdir, 'lock.json')
    self.lease_seconds = lease_seconds
    self._stop = threading.Event()
    self._thread = None
    self._held = False

  def _record(self) -> dict:
    return {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'lease_until': time.time() + self.lease_seconds,
      'started': time.strftime('%Y-%m-%d %H:%M:%S'),
    }

  def _stale(self, held: dict) -> bool:
    if time.time() > float(held.get('lease_until', 0)):
      return True
    if held.get('host') == socket.gethostname():
      try:
        os.kill(int(held['pid']), 0)
      except ProcessLookupError:
        return True
      except (PermissionError, KeyError, ValueError):
        return False
    return False

  def acquire(self) -> WorkdirLock:
    """Takes the lock (process 0); raises `WorkdirLockedError` if a live run holds it."""
    if jax.process_index() != 0:
      return self
    workdir = os.path.dirname(self.path)
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise CheckpointError(
        f'workdir {workdir} cannot be created: {e.strerror}; choose a writable --workdir'
      ) from e
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          with open(self.path) as f:
            held = json.load(f)
        except (OSError, ValueError):
          held = {}  # Torn by a crash during the write: nobody holds it.
        if held.get('pid') == os.getpid() and held.get('host') == socket.gethostname():
          held = {}  # This process's own, left by an earlier run in the same process.
        if held and not self._stale(held):
          raise WorkdirLockedError(
            f'workdir {os.path.dirname(self.path)} is in use by pid {held.get("pid")} on host '
            f'{held.get("host")} (since {held.get("started")}): wait for that run or stop it, '
            f"or use another --workdir (a dead run's lock expires {self.lease_seconds:.0f} s "
            'after its last renewal).'
          ) from None
        logging.warning('workdir lock %s: taking over a stale lock %s', self.path, held)
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(self._record(), f)
      self._held = True
      self._thread = threading.Thread(target=self._renew, daemon=True, name='workdir-lock')
      self._thread.start()
      return self
    raise WorkdirLockedError(f'could not take the workdir lock {self.path}; another run races')

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      tmp = f'{self.path}.{os.getpid()}.tmp'
      try:
        with open(tmp, 'w') as f:
          json.dump(self._record(), f)
        os.replace(tmp, self.path)
      except OSError as e:  # A full disk must not kill the run from this thread.
        logging.warning('workdir lock %s: renewal failed: %s', self.path, e)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    if not self._held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with contextlib.suppress(OSError):
      os.remove(self.path)
    self._held = False


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
