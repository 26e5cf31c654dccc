"""The device side: value_range and mixup in the jitted step equal the host ops; prefetching."""

import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from vit_jax import config as config_lib
from vit_jax import data, losses, train
from vit_jax.data import device
from vit_jax.evaluators import classification

ALL_UINT8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)


@pytest.mark.parametrize(
  'op', ['value_range(-1,1)', 'value_range(0,1)', 'value_range(-2, 3, 10, 200, clip=True)']
)
def test_value_range_on_device_equals_the_host_op_for_every_uint8_value(op):
  host = data.get_preprocess_fn(op)({'image': tf.constant(ALL_UINT8)})['image'].numpy()
  on_device = np.asarray(jax.jit(data.device_preprocess(f'decode|{op}'))(ALL_UINT8))
  assert on_device.dtype == np.float32
  _, args, kwargs = data.preprocess.parse_op(op)
  vmin, vmax, in_min, in_max = (list(args) + [0, 255])[:4]
  step = 2.0**-23 * max(abs(vmin), abs(vmax))  # One float32 step at the largest output.
  # The host op's arithmetic; XLA's division is not correctly rounded (TensorFlow's is): one step.
  np.testing.assert_allclose(on_device, host, rtol=0, atol=step)
  # big_vision's formula in float64: the same values to float32 rounding, the ends exact.
  want = vmin + (ALL_UINT8.astype(np.float64) - in_min) / (in_max - in_min) * (vmax - vmin)
  want = np.clip(want, vmin, vmax) if kwargs.get('clip') else want
  np.testing.assert_allclose(on_device, want, rtol=0, atol=step)
  assert on_device.min() == want.min() and on_device.max() == want.max()
  # The former host op, x * float32(scale) + offset (rounded twice; 255 gave 1.0000001 on device).
  scale = np.float32((vmax - vmin) / (in_max - in_min))
  former = ALL_UINT8.astype(np.float32) * scale + np.float32(vmin - in_min * scale)
  former = np.clip(former, vmin, vmax) if kwargs.get('clip') else former
  np.testing.assert_allclose(on_device, former, rtol=0, atol=step)


def test_device_part_casts_uint8_and_leaves_other_dtypes():
  fn = data.device_preprocess('decode|resize(16)')  # No device part: a cast.
  out = fn(ALL_UINT8)
  assert out.dtype == jnp.float32 and float(out.max()) == 255.0
  floats = np.full((1, 2, 2, 3), 0.5, np.float32)
  assert data.device_preprocess('value_range(-1,1)')(floats) is floats


def _host_mixup(images, labels, ratio, cy, cx, cut):
  """Mixup/CutMix as the host op computed it (TensorFlow, float32), given the same draw."""
  images, labels = tf.constant(images, tf.float32), tf.constant(labels, tf.float32)
  other = tf.roll(images, 1, axis=0)
  if not cut:
    mixed = ratio * images + (1 - ratio) * other
  else:
    h, w = images.shape[1], images.shape[2]
    frac = tf.sqrt(1.0 - tf.constant(ratio, tf.float32))
    bh, bw = int(frac * h), int(frac * w)
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
    box = np.zeros((1, h, w, 1), np.float32)
    box[:, y0:y1, x0:x1] = 1
    mixed = images * (1 - box) + other * box
    ratio = 1.0 - np.float32((y1 - y0) * (x1 - x0)) / np.float32(h * w)
  return mixed.numpy(), (ratio * labels + (1 - ratio) * tf.roll(labels, 1, axis=0)).numpy()


def test_mixup_and_cutmix_equal_the_host_ops():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (6, 9, 11, 3)).astype(np.float32)
  labels = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
  mix = jax.jit(lambda x, y, p: device.mix(x, y, **p))
  for seed, cutmix_p in ((0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)):
    params = device.mixup_params(jax.random.key(seed), 0.5, cutmix_p, 9, 11)
    assert bool(params['cut']) == (cutmix_p == 1.0)
    got_images, got_labels = mix(images, labels, params)
    drawn = {k: np.asarray(v).item() for k, v in params.items()}
    want_images, want_labels = _host_mixup(images, labels, **drawn)
    np.testing.assert_allclose(got_images, want_images, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_labels, want_labels, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_labels.sum(1), 1.0, atol=1e-6)
  # Mixup's ratio is max(r, 1 - r), r ~ Beta(p, p) (big_vision utils.py:1148-1149): at least 1/2;
  # its mean for p=0.2, E[max(r, 1 - r)], is computed here by quadrature of the Beta density.
  ratios = np.array(
    [float(device.mixup_params(jax.random.key(i), 0.2, 0, 4, 4)['ratio']) for i in range(400)]
  )
  assert ratios.min() >= 0.5
  x = np.linspace(1e-6, 1 - 1e-6, 200_001)
  density = scipy.stats.beta.pdf(x, 0.2, 0.2)
  want = np.sum(np.maximum(x, 1 - x) * density) / np.sum(density)
  assert abs(ratios.mean() - want) < 0.03
  cut = [device.mixup_params(jax.random.key(i), 0.2, 1.0, 4, 4)['ratio'] for i in range(100)]
  assert min(map(float, cut)) < 0.5  # CutMix keeps r itself (Yun et al.: box of 1 - r).


def _config(**fields):
  c = config_lib.base_config()
  c.model_name = 'testing'
  c.model = ml_collections.ConfigDict({'patches': (4, 4), 'dropout_rate': 0.0})
  c.image_size, c.batch_size, c.eval_batch_size = 16, 8, 8
  c.optimizer, c.lr, c.warmup_steps = 'sgd', 0.1, 0
  c.pp_train = c.pp_eval = 'decode|resize(16)|value_range(-1,1)'
  for key, value in fields.items():
    c[key] = value
  return c


def test_train_and_eval_steps_normalise_and_mix_on_device():
  """A uint8 batch through the steps = the model on the host-normalised (and mixed) batch."""
  rng = np.random.default_rng(0)
  uint8 = rng.integers(0, 256, (1, 8, 16, 16, 3)).astype(np.uint8)
  label = rng.integers(0, 10, (1, 8)).astype(np.int32)
  normalised = uint8[0].astype(np.float32) * (2 / 255) - 1
  targets = np.eye(10, dtype=np.float32)[label[0]]
  key = jax.random.key_data(jax.random.key(1))
  mixup = {'p': 0.5, 'cutmix_p': 0.5}
  # The step's mixup key: fold_in(fold_in(rng, step), micro_batch), as for dropout (then salted).
  mixed, mixed_targets = data.mixup(jax.random.fold_in(jax.random.fold_in(key, 0), 0), normalised,
                                    targets, **mixup)  # fmt: skip
  for config, image, want_targets in (
    (_config(), normalised, targets),
    (_config(mixup=mixup), mixed, mixed_targets),
  ):
    trainer = train.Trainer(config, num_classes=10)
    state = trainer.init_state(0)
    params = trainer.host_params(state)
    batch = trainer.global_batch({'image': uint8, 'label': label}, stacked=True)
    _, out = trainer.train_step(state, batch, key)
    logits = jax.jit(trainer.apply)
    want = losses.per_example_loss(logits(params, image), want_targets, 'softmax_xent').mean()
    np.testing.assert_allclose(float(out['train/loss']), float(want), rtol=1e-6)
  eval_batch = {'image': uint8[0], 'label': label[0], 'mask': np.ones(8, bool)}
  ev = classification.Classification(
    'e', trainer.eval_context(), [eval_batch], pp=config.pp_eval, loss='softmax_xent', every=0
  )
  got = ev.run(params)
  want = losses.per_example_loss(logits(params, normalised), targets, 'softmax_xent').mean()
  np.testing.assert_allclose(got['eval/e/loss'], float(want), rtol=1e-6)


def test_prefetch_keeps_order_raises_where_it_failed_and_stops():
  assert list(data.prefetch(iter(range(7)), lambda x: x * 10, size=2)) == list(range(0, 70, 10))

  def failing():
    yield from range(3)
    raise OSError('disk gone')

  got = []
  with pytest.raises(OSError, match='disk gone'):
    for x in data.prefetch(failing(), lambda x: x):
      got.append(x)
  assert got == [0, 1, 2]

  pulled = []

  def endless():
    i = 0
    while True:
      pulled.append(i)
      yield i
      i += 1

  before = threading.active_count()
  stream = data.prefetch(endless(), lambda x: x, size=2)
  assert [next(stream) for _ in range(3)] == [0, 1, 2]
  time.sleep(0.3)
  assert len(pulled) <= 3 + 2 + 1  # At most `size` ahead (plus one in the thread's hand).
  stream.close()
  deadline = time.time() + 5
  while threading.active_count() > before and time.time() < deadline:
    time.sleep(0.05)
  assert threading.active_count() == before
