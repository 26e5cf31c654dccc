"""The training losses, per example, and the targets they compare the logits with.

Shared by the training step (`vit_jax.train`) and the classification evaluator, which reports the
same loss on held-out data.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

LOSSES = ('softmax_xent', 'sigmoid_xent')


def targets(batch: Mapping[str, jax.Array], num_classes: int, smoothing: float) -> jax.Array:
  """Float targets [batch, num_classes]: `batch['labels']` as given (mixup's soft or multi-hot
  labels, which carry no further smoothing), else one-hot `batch['label']` smoothed toward the
  uniform distribution by `smoothing`.
  """  # fmt: skip
  if 'labels' in batch:
    return batch['labels'].astype(jnp.float32)
  onehot = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
  return onehot * (1.0 - smoothing) + smoothing / num_classes


def per_example_loss(logits: jax.Array, targets: jax.Array, kind: str) -> jax.Array:
  """Softmax or sigmoid cross-entropy per example (summed over classes for sigmoid).

  Raises:
    ValueError: `kind` is not one of `LOSSES`.
  """
  if kind == 'softmax_xent':
    return optax.softmax_cross_entropy(logits, targets)
  if kind == 'sigmoid_xent':
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
  raise ValueError(f'unknown loss {kind!r}; expected one of {LOSSES}')
