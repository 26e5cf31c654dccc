"""Processes racing `WorkdirLock.acquire()`: how many trials ended with two holders.

    python tests/lock_race.py --trials 2000 --processes 8

Each trial is a fresh workdir that every process tries to lock at the same moment (a barrier),
holds until all have tried, then releases; a third of the trials start from a stale lock left by a
dead run (a dead pid, an empty file, `{}`), which every process then tries to take over. Prints one
line: trials, processes, how many trials had exactly one holder, how many had two or more.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

DEAD_PID = 2**22 + 12345  # Above Linux's largest pid_max: no such process.


def _stale(workdir: str, kind: int) -> None:
  import socket

  os.makedirs(workdir)
  record = {'host': socket.gethostname(), 'pid': DEAD_PID, 'lease_until': time.time() + 60}
  text = [json.dumps(record), '', '{}'][kind]
  with open(os.path.join(workdir, 'lock.json'), 'w') as f:
    f.write(text)


def _worker(root, trials, barrier, results):
  import logging

  from vit_jax import guards, train_state

  logging.getLogger().setLevel(logging.ERROR)  # Not one takeover warning per trial.
  held = []
  for trial in range(trials):
    lock = guards.WorkdirLock(os.path.join(root, str(trial)))
    barrier.wait()
    try:
      lock.acquire()
    except train_state.WorkdirLockedError:
      pass
    else:
      held.append(trial)
    barrier.wait()  # Everyone has tried while the holder still holds it.
    lock.release()
  results.put(held)


def race(trials: int, processes: int, root: str | None = None) -> dict:
  """Runs the race; returns {'trials', 'processes', 'one_holder', 'double_holders', 'seconds'}."""
  with tempfile.TemporaryDirectory(dir=root) as root:
    for trial in range(trials):
      if trial % 3 == 1:
        _stale(os.path.join(root, str(trial)), (trial // 3) % 3)
    context = multiprocessing.get_context('spawn')
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
      context.Process(target=_worker, args=(root, trials, barrier, results))
      for _ in range(processes)
    ]
    for w in workers:
      w.start()
    start = time.time()
    holders = [0] * trials
    for _ in workers:
      for trial in results.get(timeout=600):
        holders[trial] += 1
    seconds = time.time() - start
    for w in workers:
      w.join()
    left = [t for t in range(trials) if os.path.exists(os.path.join(root, str(t), 'lock.json'))]
  return {
    'trials': trials,
    'processes': processes,
    'one_holder': holders.count(1),
    'no_holder': holders.count(0),
    'double_holders': sum(h > 1 for h in holders),
    'locks_left': len(left),
    'seconds': round(seconds, 1),
    'exitcodes': sorted({w.exitcode for w in workers}),
  }


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trials', type=int, default=2000)
  parser.add_argument('--processes', type=int, default=8)
  args = parser.parse_args()
  out = race(args.trials, args.processes)
  print(json.dumps(out))
  sys.exit(0 if out['double_holders'] == 0 and out['one_holder'] == out['trials'] else 1)
