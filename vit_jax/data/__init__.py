"""Input pipeline: TFDS + tf.data on the host, uint8 batches, normalisation and mixup on device.

from vit_jax import data
pp = 'decode|resize(32)|value_range(-1,1)'
ds = data.get_dataset('digits', 'train', preprocess=pp, train=True, global_batch_size=128)
batch = next(iter(ds))  # {'image': uint8 [128, 32, 32, 3], 'label': int32, 'mask': bool}
image = data.device_preprocess(pp)(batch['image'])  # float32 in [-1, 1]; jittable
"""

import tensorflow as _tf

# TensorFlow only feeds the host: it must never take GPU/TPU memory from JAX.
for _kind in ('GPU', 'TPU'):
  try:
    _tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):  # Already initialised, or no such device type.
    pass

from vit_jax.data.builders import (  # noqa: E402, F401
  get_dataset_info,
  prepare_digits,
  prepare_folder,
  prepare_imagenet21k,
)
from vit_jax.data.device import device_preprocess, mixup, prefetch  # noqa: E402, F401
from vit_jax.data.pipeline import Dataset, get_dataset  # noqa: E402, F401
from vit_jax.data.preprocess import get_preprocess_fn  # noqa: E402, F401
