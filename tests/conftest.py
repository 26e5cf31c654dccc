"""Test setup: 8 simulated CPU devices (set before JAX initializes), golden data path."""

import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'golden'  # reference outputs of the original implementation (data)


@pytest.fixture(scope='session')
def golden_dir() -> pathlib.Path:
  if not GOLDEN.is_dir():
    pytest.fail(f'golden reference data missing at {GOLDEN}')
  return GOLDEN
