"""MLP-Mixer (Tolstikhin et al., 2021) with the released parameter names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models.vit import _layer_norm

Dtype = Any


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  names: tuple[str, str] = ('embed', 'mlp')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, names, name: nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
      name=name,
    )
    y = dense(self.mlp_dim, self.names, 'Dense_0')(x)
    y = nn.gelu(y, approximate=True)
    return dense(x.shape[-1], self.names[::-1], 'Dense_1')(y)


class MixerBlock(nn.Module):
  """Token mixing (MLP across patches) then channel mixing (MLP across features)."""

  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _layer_norm('LayerNorm_0', self.dtype, self.param_dtype)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = MlpBlock(
      self.tokens_mlp_dim, self.dtype, self.param_dtype, (None, 'mlp'), name='token_mixing'
    )(y)
    x = x + jnp.swapaxes(y, 1, 2)
    y = _layer_norm('LayerNorm_1', self.dtype, self.param_dtype)(x)
    y = MlpBlock(self.channels_mlp_dim, self.dtype, self.param_dtype, name='channel_mixing')(y)
    return nn.with_logical_constraint(x + y, ('batch', 'seq', 'embed'))


class MlpMixer(nn.Module):
  """MLP-Mixer classifier: NHWC images in [-1, 1] -> logits [batch, num_classes]."""

  num_classes: int
  patches: Sequence[int]
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  model_name: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    del train  # Mixer has no dropout.
    if inputs.ndim != 4 or inputs.shape[-1] != 3:
      raise ValueError(f'expected NHWC RGB images [batch, height, width, 3], got {inputs.shape}')
    ph, pw = self.patches
    if inputs.shape[1] % ph or inputs.shape[2] % pw:
      raise ValueError(
        f'image size {inputs.shape[1:3]} is not divisible by the patch size {(ph, pw)}'
      )
    x = nn.Conv(
      self.hidden_dim,
      (ph, pw),
      strides=(ph, pw),
      padding='VALID',
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, None, 'embed')
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
      name='stem',
    )(inputs.astype(self.dtype))
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    for i in range(self.num_blocks):
      x = MixerBlock(
        self.tokens_mlp_dim,
        self.channels_mlp_dim,
        self.dtype,
        self.param_dtype,
        name=f'MixerBlock_{i}',
      )(x)
    x = _layer_norm('pre_head_layer_norm', self.dtype, self.param_dtype)(x)
    x = jnp.mean(x, axis=1)
    if not self.num_classes:
      return x
    x = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed', 'classes')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('classes',)),
      name='head',
    )(x)
    return x.astype(jnp.float32)
