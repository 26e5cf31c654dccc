"""MLP-Mixer (Tolstikhin et al., 2021) in Flax NNX, with the released parameter names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models.vit import Dense, KeyStream, LayerNorm, PatchEmbedding
from vit_jax.sharding import constrain

Dtype = Any


class MlpBlock(nnx.Module):
  def __init__(self, features, mlp_dim, axes=('embed', 'mlp'), **kw):
    self.Dense_0 = Dense(features, mlp_dim, axes, **kw)
    self.Dense_1 = Dense(mlp_dim, features, axes[::-1], **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=True))


class MixerBlock(nnx.Module):
  """Token mixing (MLP across patches) then channel mixing (MLP across features)."""

  def __init__(self, tokens, features, tokens_mlp_dim, channels_mlp_dim, **kw):
    self.LayerNorm_0 = LayerNorm(features, **kw)
    self.token_mixing = MlpBlock(tokens, tokens_mlp_dim, (None, 'mlp'), **kw)
    self.LayerNorm_1 = LayerNorm(features, **kw)
    self.channel_mixing = MlpBlock(features, channels_mlp_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.swapaxes(self.token_mixing(jnp.swapaxes(self.LayerNorm_0(x), 1, 2)), 1, 2)
    x = x + y
    return constrain(x + self.channel_mixing(self.LayerNorm_1(x)), ('batch', 'seq', 'embed'))


class MlpMixer(nnx.Module):
  """MLP-Mixer classifier: NHWC images in [-1, 1] of `image_size` -> logits [batch, num_classes]."""

  def __init__(
    self,
    num_classes: int,
    patches: Sequence[int],
    hidden_dim: int,
    num_blocks: int,
    tokens_mlp_dim: int,
    channels_mlp_dim: int,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    model_name: str | None = None,
    image_size: int | Sequence[int] = 224,
    *,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=KeyStream.of(rngs))
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    ph, pw = patches
    if size[0] % ph or size[1] % pw:
      raise ValueError(f'image size {size} is not divisible by the patch size {(ph, pw)}')
    self.grid = (size[0] // ph, size[1] // pw)
    tokens = self.grid[0] * self.grid[1]
    self.stem = PatchEmbedding(3, hidden_dim, (ph, pw), **kw)
    for i in range(num_blocks):
      block = MixerBlock(tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim, **kw)
      setattr(self, f'MixerBlock_{i}', block)
    self.pre_head_layer_norm = LayerNorm(hidden_dim, **kw)
    if num_classes:
      zeros = jax.nn.initializers.zeros
      self.head = Dense(
        hidden_dim, num_classes, ('embed', 'classes'), kernel_init=zeros, bias_init=zeros, **kw
      )
    # The hyperparameters, as the original schema names them (metrics.model_flops, exports).
    self.num_classes, self.patches, self.hidden_dim = num_classes, (ph, pw), hidden_dim
    self.num_blocks, self.tokens_mlp_dim = num_blocks, tokens_mlp_dim
    self.channels_mlp_dim, self.model_name, self.dtype = channels_mlp_dim, model_name, dtype

  def __call__(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    del rng  # Mixer has no dropout.
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected NHWC RGB images [batch, height, width, 3], got {images.shape}')
    x = self.stem(images.astype(self.dtype))
    n, h, w, c = x.shape
    if (h, w) != self.grid:
      raise ValueError(
        f'images {images.shape[1:3]} give a {h}x{w} patch grid; this model was built for '
        f'{self.grid} (image_size); build it with get_model(..., image_size=...) for this size'
      )
    x = jnp.reshape(x, (n, h * w, c))
    for i in range(self.num_blocks):
      x = getattr(self, f'MixerBlock_{i}')(x)
    x = jnp.mean(self.pre_head_layer_norm(x), axis=1)
    if not hasattr(self, 'head'):
      return x
    return self.head(x).astype(jnp.float32)
