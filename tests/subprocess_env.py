"""Environment for test subprocesses: CPU only, `devices` simulated devices."""

import os


def cpu_env(devices: int = 2) -> dict:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    JAX_PLATFORMS='cpu',
    TF_CPP_MIN_LOG_LEVEL='2',
  )
  return env
