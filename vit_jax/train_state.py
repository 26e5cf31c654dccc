"""Train-state checkpoints: orbax `CheckpointManager` (async, atomic, keep-N), resume, preemption.

`workdir/checkpoints/<step>/` holds `state` (params, optimizer state, step, rng; restored directly
into the run's shardings, so no host holds a full copy) and `meta` (JSON: the step, the data
position `data_batches = step * accum_steps`, the config). Orbax writes each step to a temporary
directory and renames it when complete, so a run killed at any moment leaves only whole checkpoints.
All processes must call `save`/`restore`; orbax coordinates them.

`PreemptionWatcher` turns SIGTERM (how TPU VMs and most schedulers preempt) into a flag that the
loop polls; every process agrees on the step at which to stop, which is checkpointed before exiting.
The original npz format (`vit_jax.npz`) is for interop, not for resuming.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> bool:
    """Starts saving `state` at `step` (returns at once when async). False if already saved."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))),
    )
    saved = self._manager.save(step, args=args, force=True)
    logging.info('checkpoint: saving step %d to %s (async)', step, self.directory)
    return saved

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
    logging.info('checkpoint: restored step %d from %s', step, self.directory)
    return restored['state'], dict(restored['meta'] or {})

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, step: int | None = None) -> dict:
  """Reads a train checkpoint's params as host numpy arrays (for predict/export/inspection).

  Works whatever mesh or process count wrote it: arrays are read whole, not into shardings.
  """
  directory = os.path.abspath(directory) if '://' not in directory else directory
  if step is None:
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    manager.close()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  path = os.path.join(directory, str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=args)['params']


class PreemptionWatcher:
  """SIGTERM -> stop at an agreed step, checkpoint, exit 0.

  `should_stop()` is cheap on one process; with several processes it all-gathers the flag every
  `sync_every` steps so they all stop at the same step (a collective save needs every process),
  and also honours JAX's own preemption notice where the runtime provides one (Cloud TPU).
  """

  def __init__(self, signals=(signal.SIGTERM,), *, sync_every: int = 10):
    self.requested = False
    self.sync_every = sync_every
    self._previous = {}
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
        logging.warning('cannot install a %s handler outside the main thread', sig)

  def _handler(self, signum, frame):
    del frame
    logging.warning('received signal %d: will checkpoint and exit', signum)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    flag = self.requested
    if jax.process_count() > 1:
      if step % self.sync_every:  # Agreeing costs a host sync: only every `sync_every` steps.
        return False
      from jax.experimental import multihost_utils

      flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
      try:
        flag = flag or multihost_utils.reached_preemption_sync_point(step)
      except Exception:  # The preemption service runs only where the runtime provides it.
        pass
    return flag

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
