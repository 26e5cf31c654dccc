"""The device side of the input pipeline: normalisation and mixup in the jitted step, prefetching.

Batches leave tf.data as uint8; `device_preprocess(pp)` applies the string's device part (its
trailing `value_range` ops, `preprocess.split`) in the step, and `mixup` mixes there. `prefetch`
moves the next global batches to the devices while the current step runs.
"""

import collections
import concurrent.futures
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from vit_jax.data import preprocess

_MIXUP_SALT = 0x6D6978  # Keeps the mixup key apart from the per-micro-batch dropout keys.


def device_preprocess(pp: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the jittable `fn(image) -> image` of the device part of preprocessing string `pp`.

  A uint8 image (what the host part yields) gets the trailing `value_range` ops of `pp` (none: a
  cast to float32), with the host op's arithmetic. Images of another dtype pass through: the host
  applied the whole string (its host part did not end in uint8), or the caller made them.

  Raises:
    ValueError: `pp` cannot be parsed, or bad arguments.
  """
  device_pp = preprocess.split(pp or '')[1]
  preprocess.get_preprocess_fn(device_pp)  # Raises on bad arguments.
  specs = map(preprocess.parse_op, filter(None, device_pp.split('|')))
  ops = [preprocess.value_range_fn(*args, **kw, clip_fn=jnp.clip) for _, args, kw in specs]

  def fn(image):
    if image.dtype != jnp.uint8:
      return image
    image = image.astype(jnp.float32)
    for op in ops:
      image = op(image)
    return image

  return fn


def mixup_params(rng: jax.Array, p: float, cutmix_p: float, height: int, width: int) -> dict:
  """Draws one batch's mixing: `r` ~ Beta(p, p); `cut` with probability `cutmix_p`.

  Mixup keeps `ratio = max(r, 1 - r)` of each example's own image and label, as big_vision
  (utils.py:1146-1150 `get_mixup`: `a = jnp.maximum(a, 1.0 - a)`). CutMix (Yun et al.) uses
  `ratio = r`: a box covering (1 - r) of the area, centred at (cy, cx) uniform over the image,
  clipped.
  """
  k_ratio, k_y, k_x, k_cut = jax.random.split(rng, 4)
  alpha = max(p, 1e-6)
  r = jax.random.beta(k_ratio, alpha, alpha).astype(jnp.float32)
  cut = jax.random.uniform(k_cut) < cutmix_p
  return {
    'ratio': jnp.where(cut, r, jnp.maximum(r, 1.0 - r)),
    'cy': jax.random.randint(k_y, (), 0, height),
    'cx': jax.random.randint(k_x, (), 0, width),
    'cut': cut,
  }


@jax.jit  # Eager calls then compute exactly what a jitted step does.
def mix(images: jax.Array, labels: jax.Array, *, ratio, cy, cx, cut) -> tuple:
  """Mixes each example with its neighbour in the batch (roll by one), as big_vision does.

  Blend: ratio * own + (1 - ratio) * neighbour, images and labels alike. CutMix (`cut`): a box of
  (1 - ratio) of the area centred at (cy, cx), clipped, is pasted from the neighbour; the labels mix
  with the share of the own image that is kept. Returns (images, labels), float32.
  """
  images = images.astype(jnp.float32)
  h, w = images.shape[1], images.shape[2]
  frac = jnp.sqrt(1.0 - ratio)
  bh, bw = (frac * h).astype(jnp.int32), (frac * w).astype(jnp.int32)
  y0, y1 = jnp.maximum(cy - bh // 2, 0), jnp.minimum(cy + bh - bh // 2, h)
  x0, x1 = jnp.maximum(cx - bw // 2, 0), jnp.minimum(cx + bw - bw // 2, w)
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).astype(jnp.float32)[None, :, :, None]
  own = jnp.where(cut, 1.0 - box, ratio)  # Each pixel's weight of its own image.
  share = jnp.where(cut, 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w), ratio)
  images = own * images + (1 - own) * jnp.roll(images, 1, axis=0)
  labels = labels.astype(jnp.float32)
  return images, share * labels + (1 - share) * jnp.roll(labels, 1, axis=0)


def mixup(rng: jax.Array, images, labels, *, p: float, cutmix_p: float = 0.0) -> tuple:
  """Mixup (Zhang et al.) / CutMix (Yun et al.) of one batch: `mix` with `mixup_params`.

  Args:
    rng: a key (typed or raw uint32 [2]); folded with a salt, so dropout keys can be passed.
    images: [b, h, w, c], labels: [b, num_classes] soft targets.
    p: Beta(p, p) concentration; cutmix_p: probability that the batch uses CutMix.
  """
  rng = jax.random.fold_in(rng, _MIXUP_SALT)
  return mix(images, labels, **mixup_params(rng, p, cutmix_p, images.shape[1], images.shape[2]))


def prefetch(iterator: Iterator, put: Callable, size: int = 2) -> Iterator:
  """Yields `put(x)` for x in `iterator`, computed up to `size` (>= 1) ahead in a background thread.

  With `put` placing a host batch on the devices (`Trainer.global_batch`), the next batches are
  read from tf.data and copied while the current step runs. Order is kept; an exception in the
  thread is raised here, at the batch it stopped. The thread ends with this generator (exhausted,
  closed, or garbage collected), which waits for it: a thread left inside TensorFlow at exit
  aborts the interpreter.
  """
  done, iterator = object(), iter(iterator)

  def step():
    x = next(iterator, done)
    return x if x is done else put(x)

  pool = concurrent.futures.ThreadPoolExecutor(1, 'vit_jax_prefetch')
  try:
    ahead = collections.deque(pool.submit(step) for _ in range(size))
    while (item := ahead.popleft().result()) is not done:
      ahead.append(pool.submit(step))
      yield item
  finally:
    pool.shutdown(cancel_futures=True)
