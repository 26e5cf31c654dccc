"""The fused resize op and the lazy geometric ops: equal to TensorFlow's kernels op by op."""

import ctypes
import io
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax import data
from vit_jax.data import fast_jpeg, fast_resize

pytestmark = pytest.mark.skipif(
  not fast_resize.available(), reason='needs a C/C++ compiler (the fallback is tested below)'
)


def _photo(h, w, seed=0):
  y, x = np.mgrid[:h, :w] / max(h, w)
  rng = np.random.default_rng(seed)
  image = np.stack(
    [128 + 100 * np.sin(9 * x + 3 * y), 128 + 100 * np.cos(7 * y - 4 * x), 255 * x * y]
  )
  image = np.moveaxis(image, 0, -1) + rng.normal(0, 12, (h, w, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(image, **kw):
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='JPEG', quality=90, **kw)
  return out.getvalue()


def _reference(crop, out_size, window, flip, affine):
  """TensorFlow's ops one by one: cast, resize (half-pixel bilinear), slice, reverse, affine."""
  image = tf.image.resize(tf.cast(crop, tf.float32), out_size).numpy()
  y, x, h, w = window
  image = image[y : y + h, x : x + w]
  image = image[:, ::-1] if flip else image
  return image * affine[0] + affine[1]


def test_resize_window_equals_tf_ops_to_float_rounding():
  rng = np.random.default_rng(0)
  for trial in range(60):
    H, W = rng.integers(8, 200, 2)
    image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    ch, cw = rng.integers(1, H + 1), rng.integers(1, W + 1)
    cy, cx = rng.integers(0, H - ch + 1), rng.integers(0, W - cw + 1)
    oh, ow = rng.integers(1, 300, 2)  # Up- and downscaling, any aspect.
    wh, ww = rng.integers(1, oh + 1), rng.integers(1, ow + 1)
    wy, wx = rng.integers(0, oh - wh + 1), rng.integers(0, ow - ww + 1)
    flip, affine = bool(trial % 2), [(1.0, 0.0), (2 / 255, -1.0), (1 / 255, 0.0)][trial % 3]
    crop, window = (cy, cx, ch, cw), (wy, wx, wh, ww)
    # Only the region the op asks for (here without margin) is passed: it must be enough.
    box = fast_resize.region((H, W), crop, (oh, ow), window, 0).numpy()
    assert (box[:2] >= 0).all() and box[0] + box[2] <= H and box[1] + box[3] <= W, box
    src = image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
    got = fast_resize.resize_window(
      tf.constant(src), box[:2], crop, (oh, ow), window, tf.constant(flip), affine
    ).numpy()
    want = _reference(image[cy : cy + ch, cx : cx + cw], (oh, ow), window, flip, affine)
    assert got.shape == want.shape == (wh, ww, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=6e-5 * affine[0] + 2.5e-7)


def test_region_is_tight_and_a_smaller_source_is_an_error():
  # 100 -> 50 rows: output rows 10..19 read source rows 20..39 exactly (lerp 0.5 between pairs).
  box = fast_resize.region((100, 80), (0, 0, 100, 80), (50, 40), (10, 5, 10, 10), 0).numpy()
  np.testing.assert_array_equal(box, [20, 10, 20, 20])
  box = fast_resize.region((100, 80), (0, 0, 100, 80), (50, 40), (10, 5, 10, 10), 2).numpy()
  np.testing.assert_array_equal(box, [18, 8, 24, 24])
  src = tf.zeros([19, 20, 3], tf.uint8)  # One row short.
  with pytest.raises(tf.errors.InvalidArgumentError, match='outside the decoded region'):
    fast_resize.resize_window(
      src, (20, 10), (0, 0, 100, 80), (50, 40), (10, 5, 10, 10), tf.constant(False), (1.0, 0.0)
    )


def _manual(pp, raw):
  """What the preset strings compute, spelled out with TensorFlow's ops on a full decode."""
  full = tf.io.decode_image(raw, channels=3, expand_animations=False)
  h, w = full.shape[:2]
  if pp == 'exact_eval':  # decode|resize_small(256)|central_crop(224)|value_range(-1,1)
    r = np.float32(256) / np.float32(min(h, w))  # resize_small's float32 arithmetic.
    nh, nw = int(np.round(np.float32(h) * r)), int(np.round(np.float32(w) * r))
    big = tf.image.resize(tf.cast(full, tf.float32), (nh, nw)).numpy()
    top, left = (nh - 224) // 2, (nw - 224) // 2
    return big[top : top + 224, left : left + 224] * (2 / 255) - 1
  if pp == 'resize':  # decode|resize(96)|value_range(0,1)
    return tf.image.resize(tf.cast(full, tf.float32), (96, 96)).numpy() * np.float32(1 / 255)
  raise ValueError(pp)


@pytest.mark.parametrize('fast', [True, False])
@pytest.mark.parametrize('shape', [(375, 500), (500, 375), (301, 257)])
def test_lazy_strings_equal_op_by_op(monkeypatch, fast, shape):
  if not fast:
    monkeypatch.setattr(fast_resize, 'available', lambda: False)
  photo = _photo(*shape)
  for raw in (_jpeg(photo), _jpeg(photo, subsampling=0), _jpeg(photo[..., 0])):
    example = {'image': tf.constant(raw), '_rng': tf.constant([1, 2], tf.int64)}
    for name, pp in [
      ('exact_eval', 'decode|resize_small(256)|central_crop(224)|value_range(-1,1)'),
      ('resize', 'decode|resize(96)|value_range(0,1)'),
    ]:
      fn = data.get_preprocess_fn(pp)
      eager = fn(dict(example))['image'].numpy()
      graph = next(iter(tf.data.Dataset.from_tensors(example).map(fn)))['image'].numpy()
      want = _manual(name, raw)
      assert eager.shape == want.shape and eager.dtype == np.float32
      tol = 5e-7 if fast else 0  # Float rounding (4e-5 of 255); the TF fallback is bit-exact.
      np.testing.assert_allclose(eager, want, rtol=0, atol=tol, err_msg=pp)
      np.testing.assert_array_equal(eager, graph)


@pytest.mark.parametrize('fast_decode', [True, False])
@pytest.mark.parametrize('fast', [True, False])
def test_jpeg_crops_equal_full_decode_then_crop(monkeypatch, fast, fast_decode):
  """Decoding only a window gives exactly the pixels of a full decode, with the windowed decoder
  or with TensorFlow's decode_and_crop_jpeg (the margin's job), resizing fused or not."""
  if not fast:
    monkeypatch.setattr(fast_resize, 'available', lambda: False)
  if not fast_decode:
    monkeypatch.setattr(fast_jpeg, 'available', lambda: False)
  else:
    assert fast_jpeg.available()
  photo = _photo(203, 301)
  cmyk = io.BytesIO()
  Image.fromarray(photo).convert('CMYK').save(cmyk, format='JPEG', quality=90)
  raws = [_jpeg(photo, subsampling=sub) for sub in (0, 1, 2)]
  raws += [_jpeg(photo, progressive=True), _jpeg(photo[..., 0]), cmyk.getvalue()]
  for raw in raws:
    full = tf.io.decode_jpeg(raw, channels=3).numpy()
    for seed in range(6):
      rng = tf.constant([seed, 9], tf.int64)
      lazy = data.get_preprocess_fn('decode_jpeg_and_inception_crop')(
        {'image': tf.constant(raw), '_rng': rng}
      )
      plain = data.get_preprocess_fn('inception_crop')({'image': full, '_rng': rng})  # Same seed.
      np.testing.assert_array_equal(lazy['image'], plain['image'])
      crop = data.get_preprocess_fn(f'decode|central_crop({17 + 11 * seed})')(
        {'image': tf.constant(raw)}
      )
      c = 17 + 11 * seed
      top, left = (203 - c) // 2, (301 - c) // 2
      np.testing.assert_array_equal(crop['image'], full[top : top + c, left : left + c])


def test_train_string_equals_op_by_op_on_decoded_pixels(monkeypatch):
  """Inception crop + flip + value_range: the fused op vs TF ops on the same (exact) crop."""
  raw = _jpeg(_photo(375, 500))
  pp = 'decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1,1)'
  flips = []
  for seed in range(12):
    example = {'image': tf.constant(raw), '_rng': tf.constant([seed, 3], tf.int64)}
    fast = data.get_preprocess_fn(pp)(dict(example))['image'].numpy()
    with monkeypatch.context() as m:
      m.setattr(fast_resize, 'available', lambda: False)
      slow = data.get_preprocess_fn(pp)(dict(example))['image'].numpy()
    np.testing.assert_allclose(fast, slow, rtol=0, atol=5e-7)
    # Flips follow tf.image.stateless_random_flip_left_right's draw for the op's seed.
    op_seed = tf.random.experimental.stateless_fold_in(example['_rng'], 1)
    probe = tf.constant([[[0], [1]]], tf.uint8)
    flips.append(int(tf.image.stateless_random_flip_left_right(probe, op_seed)[0, 0, 0]))
    unflipped = data.get_preprocess_fn('decode_jpeg_and_inception_crop(224)|value_range(-1,1)')(
      dict(example)
    )['image'].numpy()
    np.testing.assert_array_equal(fast, unflipped[:, ::-1] if flips[-1] else unflipped)
  assert 0 < sum(flips) < len(flips), flips


def test_fallback_when_the_compiler_is_missing(monkeypatch, tmp_path):
  monkeypatch.setenv('VIT_JAX_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
  assert fast_resize._load.__wrapped__() is None  # Logged a warning naming the cause.
  monkeypatch.setenv('VIT_JAX_FAST_RESIZE', '0')
  assert fast_resize._load.__wrapped__() is None
  assert not list(tmp_path.glob('ops/*.so'))


def test_simd_and_portable_kernels_give_the_same_bits(tmp_path):
  """_resize.c's AVX2+FMA path and its portable path (other CPUs) fuse the same multiply-adds:
  identical floats, so a batch does not depend on the host's SIMD."""
  kernels = {}
  for name, flags in (('simd', []), ('portable', ['-DVJ_NO_SIMD'])):
    lib = tmp_path / f'{name}.so'
    cc = os.environ.get('CC', 'gcc')
    cmd = [cc, '-O3', '-ffp-contract=off', '-fPIC', '-shared', *flags, fast_resize._C, '-o', lib]
    subprocess.run([*cmd, '-lm'], check=True, capture_output=True)
    kernel = ctypes.CDLL(str(lib)).vj_resize_bilinear_u8
    kernel.argtypes = (
      [ctypes.c_void_p]
      + [ctypes.c_int64] * 13
      + [ctypes.c_int]
      + [ctypes.c_float] * 2
      + [ctypes.c_void_p]
    )
    kernels[name] = kernel
  src = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
  # (crop h, w, resized h, w, window y, x, h, w): eval, train crop, upscale, odd sizes.
  for crop_h, crop_w, out_h, out_w, wy, wx, wh, ww in [
    (375, 500, 256, 341, 16, 58, 224, 224),
    (300, 260, 224, 224, 0, 0, 224, 224),
    (100, 77, 384, 384, 0, 0, 384, 384),
    (375, 500, 33, 47, 3, 5, 20, 31),
  ]:
    for flip in (0, 1):
      outs = []
      for kernel in kernels.values():
        out = np.zeros((wh, ww, 3), np.float32)
        rc = kernel(
          src.ctypes.data,
          375,
          500,
          1500,
          0,
          0,
          crop_h,
          crop_w,
          out_h,
          out_w,
          wy,
          wx,
          wh,
          ww,
          flip,
          1 / 127.5,
          -1.0,
          out.ctypes.data,
        )
        assert rc == 0
        outs.append(out)
      np.testing.assert_array_equal(outs[0], outs[1])
