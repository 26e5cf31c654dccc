"""Train-state checkpoints: orbax `CheckpointManager` (async, atomic, keep-N), resume, preemption.

`workdir/checkpoints/<step>/` holds `state` (params, optimizer state, step, rng, the weight EMA;
restored directly into the run's shardings, so no host holds a full copy) and `meta` (JSON: the
data position `data_batches`, the config, and a fingerprint of the state: per leaf the wrapped
uint32 sum of its bits, exact whatever the sharding, checked after every restore). Orbax renames a
step's directory only when it is complete, so a killed run leaves only whole checkpoints. All
processes must call `save`/`restore`. A damaged checkpoint is moved to `checkpoints.corrupt/` and
the previous one is used; a background save that fails is noticed at the next step (`check`).

`PreemptionWatcher` turns SIGTERM (how TPU VMs and most schedulers preempt) into a flag that the
loop polls; every process agrees on the step at which to stop, which is checkpointed before exiting.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(Exception):
  """Base of the one-line checkpoint errors that `vit_jax.main` reports without a traceback."""


class CheckpointSaveError(CheckpointError):
  """A save failed (disk full, permissions, ...); the previous checkpoints are intact."""


class ResumeError(CheckpointError):
  """The workdir's checkpoint cannot be resumed with this config (another model, batch, ...)."""


class WorkdirLockedError(CheckpointError):
  """Another live run holds the workdir."""


class OutputWriteError(CheckpointError):
  """Writing the metrics or TensorBoard events failed (disk full); the checkpoints are intact."""

  def __init__(self, cause: OSError, directory: str, last_good: int | None):
    good = [] if last_good is None else [last_good]
    last = f'step {last_good} is the last good checkpoint' if good else 'no checkpoint yet'
    super().__init__(
      f'{cause.strerror}; {last}. Free space ({space_needed(directory, good)}) and rerun the same '
      'command to resume.'
    )


# A write that fails for want of space: the disk, a quota, a file size limit.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CorruptCheckpointError(CheckpointError):
  """A checkpoint that cannot be read or does not match its fingerprint."""


def _leaf_bits(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  bits = x.dtype.itemsize * 8
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  u = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{bits}'))
  return u.astype(jnp.uint32) if bits < 32 else u


def _sum_bits(tree):
  # Unsigned addition wraps and is associative: the same sum whatever the sharding or device count.
  return jax.tree.map(lambda x: jnp.sum(_leaf_bits(x), dtype=jnp.uint32), tree)


def _path_str(path) -> str:
  """'params/head/kernel' for dict keys, attributes (optax states) and indices alike."""
  names = (getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)
  return '/'.join(map(str, names))


def fingerprint(state: Any) -> dict[str, int]:
  """{leaf path: wrapped uint32 sum of the leaf's bits}; any single flipped bit changes it."""
  sharding = jax.tree.leaves(state)[0].sharding
  replicated = None
  if isinstance(sharding, jax.sharding.NamedSharding):  # Every process gets the sums.
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  sums = jax.jit(_sum_bits, out_shardings=replicated)(state)
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {_path_str(path): int(np.asarray(v.addressable_data(0))) for path, v in flat}


class Checkpointer:
  """A thin wrapper around `ocp.CheckpointManager` for the train state.

  Args:
    directory: where step directories go (created; local path or gs://).
    max_to_keep: how many recent checkpoints survive (None: all).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory) if '://' not in directory else directory
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # Leftovers of a save interrupted by SIGKILL.
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Orbax's background thread logs a failed write and may not raise it again: keep its cause.
    self._errors = _LastError()
    logging.getLogger().addHandler(self._errors)
    self._pending: int | None = None  # The step of the async save not yet known to be committed.

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> bool:
    """Starts saving `state` at `step` (returns at once when async). False if already saved."""
    if step in self._manager.all_steps():
      return False
    self.check(step, wait=True)  # One save at a time; a failed one is reported before the next.
    meta = dict(meta or {}, step=int(step), fingerprint=fingerprint(state))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
      saved = self._manager.save(step, args=args, force=True)
    except Exception as e:
      raise self._save_error(step, e, step) from e
    self._pending = step
    logging.info('checkpoint: saving step %d to %s (async)', step, self.directory)
    return saved

  def _save_error(self, step: int, cause: Exception, at: int | None) -> CheckpointSaveError:
    with contextlib.suppress(Exception):
      self._manager.reload()
    good = [s for s in self.all_steps() if s != step]
    last = f'step {max(good)} is the last good checkpoint' if good else 'no earlier checkpoint'
    noticed = f' (noticed at step {at})' if at is not None else ''
    text = _one_line(cause)
    if 'No space left on device' in text or getattr(cause, 'errno', None) == errno.ENOSPC:
      fix = f'Free space ({space_needed(self.directory, good)})'
    else:
      fix = 'Fix the cause (free space, permissions)'
    return CheckpointSaveError(
      f'saving checkpoint step {step} to {os.path.join(self.directory, str(step))} failed'
      f'{noticed}: {type(cause).__name__}: {text}; {last}. {fix} and rerun the same command to '
      'resume.'
    )

  def check(self, at: int | None = None, *, wait: bool = False) -> None:
    """Raises `CheckpointSaveError` if the pending async save failed; cheap, call it every step.

    Args:
      at: the run's current step, for the message.
      wait: block until the pending save is done (else only a finished one is checked).
    """
    step = self._pending
    if step is None:
      return
    try:
      if wait:
        self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:
      self._pending = None
      raise self._save_error(step, e, at) from e
    if self._manager.is_saving_in_progress():
      return
    self._pending = None
    self._manager.reload()
    if step not in self._manager.all_steps():  # Orbax logged the failure but did not raise it.
      why = self._errors.text or 'see the log'
      raise self._save_error(step, RuntimeError(f'the step was not committed ({why})'), at)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: latest) into `abstract_state`'s shardings.

    Args:
      abstract_state: a tree of `jax.ShapeDtypeStruct` with `.sharding`, shaped like the state.
      step: which checkpoint.

    Raises:
      FileNotFoundError: no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    return restored['state'], dict(restored['meta'] or {})

  def read_meta(self, step: int) -> dict:
    """The `meta` item of checkpoint `step` (raises `CorruptCheckpointError` if unreadable)."""
    try:
      with epath.Path(self.directory, str(step), 'meta', 'metadata').open() as f:
        return json.load(f)
    except Exception as e:
      raise CorruptCheckpointError(f'meta unreadable: {type(e).__name__}: {_one_line(e)}') from e

  def restore_verified(self, abstract_state: Any, step: int, meta: Mapping[str, Any]) -> Any:
    """Restores `step` and checks it against the fingerprint saved in its meta.

    Raises:
      ResumeError: the checkpoint's tree differs from `abstract_state` (missing, extra or
        misshaped keys): it was made by another model, not damaged.
      CorruptCheckpointError: unreadable arrays, or a fingerprint mismatch.
    """
    _check_tree(self._state_metadata(step), abstract_state, self.directory, step)
    try:
      state, _ = self.restore(abstract_state, step)
    except Exception as e:
      raise CorruptCheckpointError(f'{type(e).__name__}: {_one_line(e)}') from e
    want = meta.get('fingerprint')
    if want is not None:
      got = fingerprint(state)
      common = set(want) & set(got)
      if common:
        bad = sorted(k for k in common if want[k] != got[k])
      else:  # Paths named another way (an older format): the values must still all match.
        bad = ['(any)'] if sorted(want.values()) != sorted(got.values()) else []
      if bad:
        raise CorruptCheckpointError(f'fingerprint mismatch in {len(bad)} arrays, e.g. {bad[0]}')
    logging.info('checkpoint: restored step %d from %s (fingerprint checked)', step, self.directory)
    return state

  def _state_metadata(self, step: int):
    # The handler, not `PyTreeCheckpointer().metadata`: that one turns any error into a warning
    # and None, losing the cause.
    path = os.path.join(self.directory, str(step), 'state')
    try:
      return ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
    except Exception as e:
      raise CorruptCheckpointError(
        f'state metadata in {path} unreadable: {type(e).__name__}: {_one_line(e)}'
      ) from e

  def move_aside(self, step: int, reason: str) -> None:
    """Moves checkpoint `step` to `<directory>.corrupt/` (process 0) and forgets it."""
    target = f'{self.directory}.corrupt/{step}-{int(time.time())}'
    logging.warning(
      'checkpoint step %d in %s is damaged (%s): moved to %s; resuming from the previous one',
      step,
      self.directory,
      reason,
      target,
    )
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    _sync(f'vit_jax_move_aside_{step}')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending saves are committed; raises `CheckpointSaveError` if one failed."""
    self.check(wait=True)

  def close(self, at: int | None = None) -> CheckpointSaveError | None:
    """Waits for pending saves and closes; returns the error of a pending save that failed.

    Args:
      at: the run's current step, for the message.
    """
    error = None
    try:
      self.check(at, wait=True)
    except CheckpointSaveError as e:
      error = e
    try:
      self._manager.close()
    except Exception as e:  # After a failed save: the error is already reported.
      logging.warning('closing the checkpoint manager: %s', _one_line(e))
    logging.getLogger().removeHandler(self._errors)
    return error


def space_needed(directory: str, steps: list[int]) -> str:
  """'N MiB free on the filesystem of D; a checkpoint takes M MiB' (what a full disk needs)."""
  if '://' in directory:
    return f'in {directory}'
  size = 0
  for step in sorted(steps)[-1:]:
    for root, _, files in os.walk(os.path.join(directory, str(step))):
      size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    return f'on the filesystem of {directory}'
  need = f'; a checkpoint takes {size / 2**20:.1f} MiB' if size else ''
  return f'{free / 2**20:.1f} MiB free on the filesystem of {directory}{need}'


class _LastError(logging.Handler):
  """Keeps the last exception logged at ERROR level (by orbax's save thread)."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.text: str | None = None

  def emit(self, record: logging.LogRecord) -> None:
    if record.exc_info and record.exc_info[1] is not None:
      e = record.exc_info[1]
      self.text = f'{type(e).__name__}: {_one_line(e)}'


def _one_line(e: BaseException) -> str:
  """The message on one line; a long one keeps its start and its end (where the OS error is).

  TensorStore's spec and source locations (hundreds of characters of JSON) are left out.
  """
  text = re.sub(r"\s*\[(tensorstore_spec|source locations)='.*?'\]", '', str(e), flags=re.S)
  text = ' '.join(text.split())
  return text if len(text) <= 400 else f'{text[:200]} ... {text[-200:]}'


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _check_tree(stored: Any, abstract_state: Any, directory: str, step: int) -> None:
  """Compares the stored tree (paths, shapes) with the run's; `ResumeError` if they differ."""

  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): tuple(getattr(v, 'shape', ()) or ()) for p, v in leaves}

  have, want = flat(stored), flat(abstract_state)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = sorted(k for k in set(have) & set(want) if have[k] != want[k])
  if not (missing or extra or shapes):
    return
  parts = []
  if missing:
    parts.append(f'missing {len(missing)} keys (e.g. {missing[0]})')
  if extra:
    parts.append(f'{len(extra)} unexpected keys (e.g. {extra[0]})')
  if shapes:
    k = shapes[0]
    parts.append(f'{len(shapes)} misshaped arrays (e.g. {k}: {have[k]} stored, {want[k]} here)')
  raise ResumeError(
    f'checkpoint step {step} in {directory} does not fit this model: {"; ".join(parts)}. '
    'It was made by another model or config: use a new --workdir (never a partial restore).'
  )


def agree(ok: bool) -> bool:
  """True when `ok` on every process (each reads its own shards of a checkpoint)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


WEIGHTS = ('ema', 'raw')  # Which weights of a checkpoint: the EMA (vit_jax.ema) or the params.


def restore_params(directory: str, step: int | None = None, *, weights: str = 'raw') -> dict:
  """Reads a train checkpoint's params as host numpy arrays (for predict/export/inspection).

  Works whatever mesh or process count wrote it: arrays are read whole, not into shardings.

  Args:
    directory: the run's checkpoints/ folder.
    step: which checkpoint (default: the latest).
    weights: 'raw' (the params), 'ema' (the weight EMA; `ValueError` if the run kept none) or
      'auto' (the EMA when the checkpoint holds one, else the params).
  """
  if weights not in (*WEIGHTS, 'auto'):
    raise ValueError(f'weights={weights!r}; expected one of {WEIGHTS} or auto')
  directory = os.path.abspath(directory) if '://' not in directory else directory
  if step is None:
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    manager.close()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  path = os.path.join(directory, str(step), 'state')
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
  if weights == 'ema' and 'ema' not in tree:
    raise ValueError(
      f'checkpoint step {step} in {directory} holds no EMA weights (its run had ema_decay=0): '
      'use --weights=raw'
    )
  item = 'ema' if weights != 'raw' and 'ema' in tree else 'params'
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(path, restore_args=args)[item]


class Preempted(BaseException):  # noqa: N818 (not an error: a request to stop)
  """SIGTERM before the training loop began (restore, compile, data set-up): stop at once.

  No step has run since the newest checkpoint, so there is nothing to save; the run unwinds (the
  workdir lock is released on the way) and `vit_jax.main` exits 0. A BaseException, so that no
  `except Exception` on the way turns it into a failure.
  """


class PreemptionWatcher:
  """SIGTERM -> stop at an agreed step, checkpoint, exit 0.

  Until `arm()` (called when the training loop starts) the handler raises `Preempted`, so a
  preemption during start-up, which can take minutes on a pod, ends the run at once. After it, the
  handler only sets a flag that the loop polls: `should_stop()` is cheap on one process; with
  several processes it all-gathers the flag every `sync_every` steps so they all stop at the same
  step (a collective save needs every process), and also honours JAX's own preemption notice where
  the runtime provides one (Cloud TPU).
  """

  def __init__(self, signals=(signal.SIGTERM,), *, sync_every: int = 10):
    self.requested = False
    self.armed = False
    self.sync_every = sync_every
    self._previous = {}
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
        logging.warning('cannot install a %s handler outside the main thread', sig)

  def _handler(self, signum, frame):
    del frame
    if self.requested:
      return  # Stopping already; a second signal must not interrupt the clean-up.
    self.requested = True
    if not self.armed:
      logging.warning(
        'received signal %d during start-up: stopping (no step to checkpoint)', signum
      )
      raise Preempted(signum)
    logging.warning('received signal %d: will checkpoint and exit', signum)

  def arm(self) -> None:
    """From now on a signal only sets the flag: the loop checkpoints and stops.

    A start-up signal whose `Preempted` did not reach the top (raised while the main thread ran
    code that swallows exceptions, such as a finalizer or a library's clean-up) stops the run
    here, before the first step, as it would have at once.
    """
    if self.requested:
      raise Preempted(signal.SIGTERM)
    self.armed = True

  def should_stop(self, step: int) -> bool:
    flag = self.requested
    if jax.process_count() > 1:
      if step % self.sync_every:  # Agreeing costs a host sync: only every `sync_every` steps.
        return False
      from jax.experimental import multihost_utils

      flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
      # The preemption service runs only where the runtime provides it.
      with contextlib.suppress(Exception):
        flag = flag or multihost_utils.reached_preemption_sync_point(step)
    return flag

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
