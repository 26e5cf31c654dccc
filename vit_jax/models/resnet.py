"""BiT ResNet (v2-style weight-standardized convs + GroupNorm) used as the stem of hybrid R+ViT.

Names follow the released hybrid checkpoints: `conv_root`, `gn_root`, `block{i}/unit{j}/{conv,gn}*`,
at the top level of the model's tree (`add_stem` attaches them to the model that owns them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


def weight_standardize(w: jax.Array, axis: Sequence[int], eps: float) -> jax.Array:
  """Standardizes a kernel to zero mean and unit std over `axis` (std + eps, as BiT does)."""
  w = w - jnp.mean(w, axis=axis)
  return w / (jnp.std(w, axis=axis) + eps)


class StdConv(nnx.Module):
  """Bias-free 'SAME' conv whose kernel is weight-standardized in float32, then cast."""

  def __init__(self, in_features, features, kernel, strides, *, dtype, param_dtype, rngs):
    shape = (*kernel, in_features, features)
    value = jax.nn.initializers.lecun_normal()(rngs.params(), shape, param_dtype)
    self.kernel = nnx.Param(value, logical_axes=(None,) * 4)
    self.strides, self.dtype = tuple(strides), dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = weight_standardize(self.kernel[...].astype(jnp.float32), axis=(0, 1, 2), eps=1e-5)
    dims = ('NHWC', 'HWIO', 'NHWC')
    return jax.lax.conv_general_dilated(
      x.astype(self.dtype), kernel.astype(self.dtype), self.strides, 'SAME', dimension_numbers=dims
    )


class GroupNorm(nnx.Module):
  """GroupNorm with 32 groups and epsilon 1e-6 (flax's arithmetic: float32 statistics)."""

  def __init__(self, features, *, dtype, param_dtype, rngs, zero_scale: bool = False):
    scale = (jnp.zeros if zero_scale else jnp.ones)((features,), param_dtype)
    self.scale = nnx.Param(scale, logical_axes=(None,))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=(None,))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    xf, group = x.astype(jnp.float32), x.shape[-1] // 32
    grouped = xf.reshape(*x.shape[:-1], 32, group)
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    mean = jnp.mean(grouped, axis=axes)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(grouped), axis=axes) - jnp.square(mean))
    mean, var = (jnp.repeat(v, group, axis=-1)[:, None, None] for v in (mean, var))
    mul = jax.lax.rsqrt(var + 1e-6) * self.scale[...]
    return ((xf - mean) * mul + self.bias[...]).astype(self.dtype)


class ResidualUnit(nnx.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (x4), projection shortcut when shapes change."""

  def __init__(self, in_features, features, strides, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if in_features != features * 4 or tuple(strides) != (1, 1):
      self.conv_proj = StdConv(in_features, features * 4, (1, 1), strides, **kw)
      self.gn_proj = GroupNorm(features * 4, **kw)
    self.conv1 = StdConv(in_features, features, (1, 1), (1, 1), **kw)
    self.gn1 = GroupNorm(features, **kw)
    self.conv2 = StdConv(features, features, (3, 3), strides, **kw)
    self.gn2 = GroupNorm(features, **kw)
    self.conv3 = StdConv(features, features * 4, (1, 1), (1, 1), **kw)
    # Zero-init of the last norm's scale makes each unit start as the identity.
    self.gn3 = GroupNorm(features * 4, zero_scale=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = self.gn_proj(self.conv_proj(x)) if hasattr(self, 'conv_proj') else x
    y = jax.nn.relu(self.gn1(self.conv1(x)))
    y = jax.nn.relu(self.gn2(self.conv2(y)))
    return jax.nn.relu(residual + self.gn3(self.conv3(y)))


class ResNetStage(nnx.Module):
  def __init__(self, block_size, in_features, features, first_stride, **kw):
    for i in range(block_size):
      strides = first_stride if i == 0 else (1, 1)
      setattr(self, f'unit{i + 1}', ResidualUnit(in_features, features, strides, **kw))
      in_features = features * 4
    self.block_size = block_size

  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.block_size):
      x = getattr(self, f'unit{i + 1}')(x)
    return x


def add_stem(
  owner: nnx.Module, num_layers: Sequence[int], width_factor: float, *, dtype, param_dtype, rngs
) -> int:
  """Attaches the root conv (7x7/2), its GroupNorm and one stage per `num_layers` entry to
  `owner` (so the parameters sit at the top level of its tree, as in the released hybrid
  checkpoints); returns the number of output channels.
  """  # fmt: skip
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  width = int(64 * width_factor)
  owner.conv_root = StdConv(3, width, (7, 7), (2, 2), **kw)
  owner.gn_root = GroupNorm(width, **kw)
  channels = width
  for i, block_size in enumerate(num_layers):
    stage = ResNetStage(block_size, channels, width * 2**i, (1, 1) if i == 0 else (2, 2), **kw)
    setattr(owner, f'block{i + 1}', stage)
    channels = width * 2**i * 4
  return channels


def stem_output_size(size: tuple[int, int], num_stages: int) -> tuple[int, int]:
  """The feature-map size: the root downsamples 4x, each stage after the first 2x more (SAME)."""
  factor = 4 * 2 ** max(num_stages - 1, 0)  # Repeated ceil-division by 2 is one by the product.
  return tuple(-(-s // factor) for s in size)


def stem(owner: nnx.Module, x: jax.Array, num_stages: int) -> jax.Array:
  """Runs the stem `add_stem` attached to `owner`: root conv, GroupNorm, max-pool 3x3/2, stages."""
  x = jax.nn.relu(owner.gn_root(owner.conv_root(x)))
  x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i in range(num_stages):
    x = getattr(owner, f'block{i + 1}')(x)
  return x
