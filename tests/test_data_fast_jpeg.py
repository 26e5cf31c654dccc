"""The windowed JPEG decoder (vit_jax/data/fast_jpeg.py): exact pixels, errors, both libraries."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from subprocess_env import cpu_env

from vit_jax.data import fast_jpeg


def _photo(h, w, seed=0):
  """Smooth colour gradients plus noise: chroma that upsampling errors would show."""
  y, x = np.mgrid[:h, :w]
  rng = np.random.default_rng(seed)
  image = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin((x + 2 * y) / 9)], -1)
  return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def _jpegs(h=203, w=301) -> dict[str, bytes]:
  photo = _photo(h, w)
  out = {}
  for name, image, kw in [
    ('4:4:4', photo, dict(subsampling=0)),
    ('4:2:2', photo, dict(subsampling=1)),
    ('4:2:0', photo, dict(subsampling=2)),
    ('progressive', photo, dict(progressive=True)),
    ('grayscale', photo[..., 0], {}),
    ('cmyk', photo, dict(mode='CMYK')),
    ('restart markers', photo, dict(restart_marker_rows=1)),
  ]:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    pil = pil.convert(kw.pop('mode')) if 'mode' in kw else pil
    pil.save(buf, format='JPEG', quality=90, **kw)
    out[name] = buf.getvalue()
  return out


@pytest.fixture(scope='module')
def jpegs():
  assert fast_jpeg.available(), 'the windowed decoder must build here (compiler + libjpeg-turbo)'
  return _jpegs()


def _boxes(h, w, rng, n=12):
  boxes = [(0, 0, h, w), (0, 0, 1, 1), (h - 1, w - 1, 1, 1), (1, 1, h - 2, w - 2)]
  for _ in range(n):
    y, x = rng.integers(0, h - 1), rng.integers(0, w - 1)
    boxes.append((y, x, rng.integers(1, h - y + 1), rng.integers(1, w - x + 1)))
  return boxes


def test_windows_equal_full_decode(jpegs):
  """Bit-identical to tf.io.decode_jpeg (its default fast IDCT) in every box, every JPEG kind."""
  rng = np.random.default_rng(0)
  for name, raw in jpegs.items():
    full = tf.io.decode_jpeg(raw, channels=3).numpy()
    h, w = full.shape[:2]
    for y, x, bh, bw in _boxes(h, w, rng):
      got = fast_jpeg.decode_window(raw, (y, x, bh, bw)).numpy()
      np.testing.assert_array_equal(got, full[y : y + bh, x : x + bw], err_msg=f'{name} {y, x}')


def test_region_covers_the_box_and_decodes_little(jpegs):
  """The region starts at most an iMCU (16 px) + margin left and 2 rows above the box, ends at
  the box's last row, and equals the full decode inside the box."""
  raw = jpegs['4:2:0']
  full = tf.io.decode_jpeg(raw, channels=3).numpy()
  for box in [(50, 70, 100, 120), (0, 0, 203, 301), (100, 200, 3, 5)]:
    region, origin = fast_jpeg.decode_region(raw, box)
    (oy, ox), (rh, rw) = origin.numpy(), region.shape[:2]
    y, x, h, w = box
    assert y - 2 <= oy <= y and x - 2 - 16 < ox <= x, (box, oy, ox)
    assert oy + rh == y + h and ox + rw >= x + w, (box, oy, ox, rh, rw)
    inside = region.numpy()[y - oy : y - oy + h, x - ox : x - ox + w]
    np.testing.assert_array_equal(inside, full[y : y + h, x : x + w])
  # A box's size of 0 means "to the image's edge".
  np.testing.assert_array_equal(fast_jpeg.decode_window(raw, (0, 0, 0, 0)).numpy(), full)


def test_graph_equals_eager(jpegs):
  raw = jpegs['4:2:2']
  box = tf.constant([31, 17, 90, 140])
  eager = fast_jpeg.decode_window(raw, box).numpy()
  ds = tf.data.Dataset.from_tensors(raw).map(lambda r: fast_jpeg.decode_window(r, box))
  np.testing.assert_array_equal(next(iter(ds.as_numpy_iterator())), eager)


def test_bad_input_errors(jpegs):
  raw = jpegs['4:2:0']
  with pytest.raises(tf.errors.InvalidArgumentError, match='not inside the 203x301 image'):
    fast_jpeg.decode_window(raw, (200, 0, 10, 10))
  with pytest.raises(tf.errors.InvalidArgumentError, match='invalid JPEG data'):
    fast_jpeg.decode_window(b'\x89PNG\r\n\x1a\n not a jpeg', (0, 0, 1, 1))
  truncated = raw[: len(raw) // 2]
  with pytest.raises(tf.errors.InvalidArgumentError, match='premature end of JPEG data'):
    fast_jpeg.decode_window(truncated, (0, 0, 0, 0))
  # TensorFlow's own decoder refuses the truncated file too.
  with pytest.raises(tf.errors.InvalidArgumentError):
    tf.io.decode_jpeg(truncated, channels=3)


_BUILD_ONE = """
import sys
import numpy as np
import tensorflow as tf
from vit_jax.data import fast_jpeg
name, cflags, libs = [c for c in fast_jpeg._candidates() if c[0] == sys.argv[1]][0]
module = tf.load_op_library(fast_jpeg._build(cflags, libs))
fast_jpeg._self_test(module)
print('OK', name)
"""


def _pillow_has_libjpeg() -> bool:
  return any(c[0] == 'Pillow libjpeg' for c in fast_jpeg._candidates())


@pytest.mark.parametrize('library', ['system libjpeg', 'Pillow libjpeg'])
def test_each_library_builds_and_matches_tensorflow(library, tmp_path):
  """Each libjpeg-turbo the builder tries compiles, loads and passes the self-test (a fresh
  process each: an op library registers its op once per process)."""
  if library == 'system libjpeg' and not os.path.exists('/usr/include/jpeglib.h'):
    pytest.fail('no system libjpeg headers here (install libjpeg-turbo dev files)')
  assert library != 'Pillow libjpeg' or _pillow_has_libjpeg(), 'Pillow wheel without libjpeg'
  env = dict(cpu_env(1), VIT_JAX_CACHE_DIR=os.environ.get('VIT_JAX_CACHE_DIR', str(tmp_path)))
  done = subprocess.run(
    [sys.executable, '-c', _BUILD_ONE, library], capture_output=True, text=True, env=env
  )
  assert done.returncode == 0 and f'OK {library}' in done.stdout, done.stderr[-3000:]


_FAILING_SELF_TEST = """
from vit_jax.data import fast_jpeg, preprocess
def fail(module):
  raise RuntimeError('self-test: forced failure')
fast_jpeg._self_test = fail
print('available', fast_jpeg.available())
"""


def test_a_library_failing_its_self_test_falls_back_to_tensorflow(tmp_path):
  """A library that loads but decodes differently is not used (nor any other: its op name is
  taken), and the warning says why."""
  env = dict(cpu_env(1), VIT_JAX_CACHE_DIR=os.environ.get('VIT_JAX_CACHE_DIR', str(tmp_path)))
  env['TF_CPP_MIN_LOG_LEVEL'] = '0'
  done = subprocess.run(
    [sys.executable, '-c', _FAILING_SELF_TEST], capture_output=True, text=True, env=env
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'available False' in done.stdout
  assert 'self-test: forced failure' in done.stderr and 'decode_and_crop_jpeg' in done.stderr
