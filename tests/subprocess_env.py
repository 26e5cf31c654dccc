"""Test subprocesses: a CPU-only environment with simulated devices, the training command."""

import os
import sys


def cpu_env(devices: int = 2) -> dict:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    JAX_PLATFORMS='cpu',
    TF_CPP_MIN_LOG_LEVEL='2',
  )
  return env


def main_command(workdir: str, steps: int, *extra: str) -> list[str]:
  """`python -m vit_jax.main` on the quickstart's runlocal recipe for `steps` steps, no evals."""
  return [
    sys.executable,
    '-m',
    'vit_jax.main',
    f'--config=configs/quickstart.py:runlocal,steps={steps}',
    f'--workdir={workdir}',
    '--config.eval_every=0',
    *extra,
  ]
