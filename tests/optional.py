"""Which optional dependencies (the export extra, timm) this environment can import."""

from __future__ import annotations


def have(*names: str) -> bool:
  """True when every module imports (not only is found: a torchvision built for another torch is
  found but fails to import, and then so does transformers' vision side)."""
  try:
    for name in names:
      __import__(name)
  except ImportError:
    return False
  return True
