"""BiT ResNet (v2-style weight-standardized convs + GroupNorm) used as the stem of hybrid R+ViT.

Names follow the released hybrid checkpoints: `conv_root`, `gn_root`, `block{i}/unit{j}/{conv,gn}*`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def weight_standardize(w: jax.Array, axis: Sequence[int], eps: float) -> jax.Array:
  """Standardizes a kernel to zero mean and unit std over `axis` (std + eps, as BiT does)."""
  w = w - jnp.mean(w, axis=axis)
  return w / (jnp.std(w, axis=axis) + eps)


class StdConv(nn.Conv):
  """Conv with weight standardization, computed in float32 before casting to the compute dtype."""

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      param = weight_standardize(param.astype(jnp.float32), axis=(0, 1, 2), eps=1e-5)
    return param


def _conv(features, kernel, strides, name, dtype, param_dtype):
  return StdConv(
    features,
    kernel,
    strides=strides,
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None,) * 4),
    name=name,
  )


def _gn(name, dtype, param_dtype, scale_init=nn.initializers.ones):
  return nn.GroupNorm(
    num_groups=32,
    epsilon=1e-6,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=scale_init,
    name=name,
  )


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (x4), projection shortcut when shapes change."""

  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt, pdt = self.dtype, self.param_dtype
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = _conv(self.features * 4, (1, 1), self.strides, 'conv_proj', dt, pdt)(residual)
      residual = _gn('gn_proj', dt, pdt)(residual)
    y = _conv(self.features, (1, 1), (1, 1), 'conv1', dt, pdt)(x)
    y = nn.relu(_gn('gn1', dt, pdt)(y))
    y = _conv(self.features, (3, 3), self.strides, 'conv2', dt, pdt)(y)
    y = nn.relu(_gn('gn2', dt, pdt)(y))
    y = _conv(self.features * 4, (1, 1), (1, 1), 'conv3', dt, pdt)(y)
    # Zero-init of the last norm's scale makes each unit start as the identity.
    y = _gn('gn3', dt, pdt, scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  block_size: int
  features: int
  first_stride: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.block_size):
      strides = self.first_stride if i == 0 else (1, 1)
      x = ResidualUnit(self.features, strides, self.dtype, self.param_dtype, name=f'unit{i + 1}')(x)
    return x


def resnet_stem(
  x: jax.Array, num_layers: Sequence[int], width_factor: float, dtype: Dtype, param_dtype: Dtype
) -> jax.Array:
  """Root conv (7x7/2) + GroupNorm + max-pool (3x3/2), then one stage per `num_layers` entry.

  Call it inside a compact method: its submodules attach to the calling module, so the parameters
  sit at the top level of the tree as in the released hybrid checkpoints. The root downsamples 4x;
  each stage after the first halves the resolution again.
  """
  width = int(64 * width_factor)
  x = _conv(width, (7, 7), (2, 2), 'conv_root', dtype, param_dtype)(x)
  x = nn.relu(_gn('gn_root', dtype, param_dtype)(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(
      block_size,
      width * 2**i,
      (1, 1) if i == 0 else (2, 2),
      dtype,
      param_dtype,
      name=f'block{i + 1}',
    )(x)
  return x
