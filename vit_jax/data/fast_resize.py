"""The fused resize kernel as a TensorFlow op: uint8 crop -> float32 window, in one pass.

`resize_window(src, ...)` computes what TensorFlow's cast, ResizeBilinear (half-pixel centres),
slice, reverse and multiply-add compute in six ops; results equal them to float32 rounding
(|diff| <= 4e-5 on the 0..255 scale; tests/test_data_fast_resize.py). The C kernel (_resize.c)
and its op wrapper (_resize_op.cc) are compiled on first use against the installed TensorFlow
(~6 s, once: cached in $VIT_JAX_CACHE_DIR or ~/.cache/vit_jax, keyed by the sources and the
TensorFlow version) and loaded with `tf.load_op_library`.

Where that is impossible (no C/C++ compiler: set CC/CXX to choose one) or `VIT_JAX_FAST_RESIZE=0`
is set, `available()` is False and the preprocessing ops use TensorFlow's kernels instead, with a
warning once: the same images to float rounding, a slower pipeline (see docs/data.md).
"""

import functools
import glob
import hashlib
import os
import subprocess
import tempfile

import tensorflow as tf
from absl import logging

_DIR = os.path.dirname(os.path.abspath(__file__))
_C, _CC = os.path.join(_DIR, '_resize.c'), os.path.join(_DIR, '_resize_op.cc')


def build_op_library(
  name: str, cc: str, c: str | None = None, cflags=(), libs=(), extra_key: str = ''
) -> str:
  """Compiles a TensorFlow op library from `cc` (+ C file `c`) if not cached; returns its path.

  The cache key covers the sources, the TensorFlow version and all flags. Raises RuntimeError with
  the compiler's message on failure.
  """
  tf_cflags, tf_lflags = tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()
  key = hashlib.sha256()
  headers = sorted(glob.glob(os.path.join(os.path.dirname(cc), '*.h')))  # Included by the sources.
  for source in (cc, c, *headers):
    if source:
      key.update(open(source, 'rb').read())
  key.update(tf.__version__.encode())
  c_flags = ['-O3', '-ffp-contract=off', '-fPIC', '-fvisibility=hidden']
  key.update(' '.join([*tf_cflags, *tf_lflags, *cflags, *libs, *c_flags, extra_key]).encode())
  cache = os.environ.get('VIT_JAX_CACHE_DIR') or os.path.expanduser('~/.cache/vit_jax')
  path = os.path.join(cache, 'ops', f'{name}_{key.hexdigest()[:16]}.so')
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  cc_bin, cxx_bin = os.environ.get('CC', 'gcc'), os.environ.get('CXX', 'g++')
  # Argument lists, no shell: CC/CXX and the paths are never parsed by a shell.
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
    lib, cmds, objs = os.path.join(tmp, 'op.so'), [], []
    if c:
      objs.append(os.path.join(tmp, 'kernel.o'))
      # Hidden: two op libraries that both link the C file never share or clash on its symbols.
      cmds.append([cc_bin, *c_flags, '-c', c, '-o', objs[0]])
    cmds.append(
      [cxx_bin, '-O2', '-fPIC', '-shared', '-w', *tf_cflags, *cflags, cc, *objs, '-o', lib]
      + [*tf_lflags, *libs]
    )
    for cmd in cmds:
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{done.stderr[-2000:]}')
    os.replace(lib, path)  # Atomic: concurrent builders (test workers, hosts) never see half.
  return path


def _build() -> str:
  return build_op_library('resize_op', _CC, _C)


@functools.cache
def _load():
  if os.environ.get('VIT_JAX_FAST_RESIZE', '1') == '0':
    return None
  try:
    return tf.load_op_library(_build())
  except (OSError, RuntimeError, tf.errors.NotFoundError) as e:
    logging.warning(
      'The fused resize op could not be built or loaded, so the input pipeline resizes with '
      "TensorFlow's ops (same images, slower). Install a C/C++ compiler (or set CC/CXX) to fix "
      'this. Cause: %s',
      e,
    )
    return None


# Plain Python, never converted by autograph (which would trace it as graph code).
@tf.autograph.experimental.do_not_convert
def available() -> bool:
  """Whether the op is built and enabled (env VIT_JAX_FAST_RESIZE=0 disables it)."""
  return _load() is not None


def _ints(values) -> tf.Tensor:
  if isinstance(values, tf.Tensor):
    return tf.cast(values, tf.int32)
  return tf.stack([tf.cast(v, tf.int32) for v in values])


@tf.autograph.experimental.do_not_convert
def region(shape, crop, out_size, window, margin: int) -> tf.Tensor:
  """int32 (y, x, h, w): the source pixels that `resize_window` reads, plus `margin` (clamped).

  Args:
    shape: (h, w) of the source image.
    crop: (y, x, h, w) in the source: the image that is resized.
    out_size: (h, w) of the whole resized crop.
    window: (y, x, h, w) of the resized crop that is wanted.
    margin: extra source pixels on every side (clamped to the source).
  """
  return _load().vit_jax_resize_region(
    _ints(shape), _ints(crop), _ints(out_size), _ints(window), margin=margin
  )


@tf.autograph.experimental.do_not_convert
def resize_window(src, src_yx, crop, out_size, window, flip, affine) -> tf.Tensor:
  """float32 [window h, window w, 3]: the window of the crop resized bilinearly, flipped, affine.

  Args:
    src: uint8 [h, w, 3], the source pixels from (y, x) = `src_yx` on; must cover `region(...)`
      without margin.
    crop, out_size, window: as in `region`; the window's h and w may be Python ints (static).
    flip: bool scalar tensor: mirror the window left-right.
    affine: (mul, add) floats: output = value * mul + add.
  """
  out = _load().vit_jax_resize_window(
    src,
    _ints(src_yx),
    _ints(crop),
    _ints(out_size),
    _ints(window),
    flip,
    tf.constant(affine, tf.float32),
  )
  out.set_shape([w if isinstance(w, int) else None for w in window[2:]] + [3])
  return out
