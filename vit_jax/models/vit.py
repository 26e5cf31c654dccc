"""Vision Transformer (Dosovitskiy et al., ICLR 2021) and its hybrid ResNet+ViT variant (Flax NNX).

Attribute names follow the released checkpoints exactly (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`): `nnx.state(model, nnx.Param)` is the
checkpoint's tree. Every parameter carries logical axis names (`logical_axes` metadata: `embed`,
`mlp`, `heads`, `kv`, `classes`, `layers`) and key activations are constrained by name (`batch`,
`seq`, ...); `vit_jax.sharding` maps both onto mesh axes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from vit_jax.models import resnet as resnet_lib
from vit_jax.sharding import constrain

Dtype = Any
Initializer = Callable[..., jax.Array]
init = jax.nn.initializers
_LECUN = init.lecun_normal()
CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
POSEMBS = ('learn', 'sincos2d')


class KeyStream:
  """The `params()` and `dropout()` draws of an `nnx.Rngs`, counted in Python: one key per stream
  from `rngs`, then `fold_in(key, n)` for the n-th draw.

  `nnx.Rngs` counts draws in a state variable, and under a trace (`nnx.eval_shape`, a jitted
  init) each update costs time proportional to the trace so far: quadratic model building.
  """

  def __init__(self, rngs: nnx.Rngs):
    self._rngs, self._keys, self._count = rngs, {}, 0

  @classmethod
  def of(cls, rngs) -> KeyStream:
    return rngs if isinstance(rngs, KeyStream) else cls(rngs)

  def _draw(self, stream: str) -> jax.Array:
    if stream not in self._keys:
      self._keys[stream] = getattr(self._rngs, stream)()
    self._count += 1
    return jax.random.fold_in(self._keys[stream], self._count)

  params = functools.partialmethod(_draw, 'params')
  dropout = functools.partialmethod(_draw, 'dropout')


def param(rngs: nnx.Rngs, initializer: Initializer, shape, dtype, axes) -> nnx.Param:
  """A parameter drawn from `rngs.params()`, tagged with its logical axis names."""
  return nnx.Param(initializer(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def dropout(x: jax.Array, rate, rng: jax.Array | None, shape=None) -> jax.Array:
  """Inverted dropout of a `shape` (default: x's) mask broadcast over x; the identity without an
  rng (evaluation) or at a (non-traced) rate 0."""
  if rng is None or (not isinstance(rate, jax.Array) and rate == 0.0):
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape if shape is None else shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x: jax.Array, rate, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: drops the residual branch per example, rescaling the survivors."""
  return dropout(x, rate, rng, (x.shape[0],) + (1,) * (x.ndim - 1))


class Dense(nnx.Module):
  """x @ kernel + bias in the compute dtype (flax's Dense parameters: `kernel`, `bias`)."""

  def __init__(
    self,
    in_features: int,
    features: int,
    axes: tuple[str | None, str | None],
    *,
    kernel_init: Initializer = _LECUN,
    bias_init: Initializer = init.zeros,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.kernel = param(rngs, kernel_init, (in_features, features), param_dtype, axes)
    self.bias = param(rngs, bias_init, (features,), param_dtype, axes[-1:])
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
    return jnp.dot(x.astype(self.dtype), kernel) + bias


def LayerNorm(
  features: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, axis: str = 'embed'
) -> nnx.LayerNorm:
  """Flax's `nnx.LayerNorm` over the last axis (`scale`, `bias`), epsilon 1e-6 as the released
  models: float32 statistics, variance as E[x^2] - E[x]^2 (the linen LayerNorm's arithmetic, as in
  big_vision). Flax's op, not a hand-written one: XLA's CPU fusion of a hand-written backward
  recomputes each block's residual gradient once per consumer (benchmarks/peers.py).
  """
  metadata = dict.fromkeys(('scale_metadata', 'bias_metadata'), {'logical_axes': (axis,)})
  return nnx.LayerNorm(
    features, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **metadata
  )


class MlpBlock(nnx.Module):
  """Dense -> GELU (tanh approximation, as the published models) -> Dense, with dropout."""

  def __init__(
    self,
    features: int,
    mlp_dim: int,
    *,
    dropout_rate: float = 0.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kw.update(kernel_init=init.xavier_uniform(), bias_init=init.normal(stddev=1e-6))
    self.Dense_0 = Dense(features, mlp_dim, ('embed', 'mlp'), **kw)
    self.Dense_1 = Dense(mlp_dim, features, ('mlp', 'embed'), **kw)
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    rngs = (None, None) if rng is None else jax.random.split(rng)
    x = constrain(jax.nn.gelu(self.Dense_0(x), approximate=True), ('batch', 'seq', 'mlp'))
    x = self.Dense_1(dropout(x, self.dropout_rate, rngs[0]))
    return dropout(x, self.dropout_rate, rngs[1])


class HeadsDense(nnx.Module):
  """Projection into ('in': embed -> heads x head_dim) or out of ('out') attention heads, with
  the checkpoint's 3-D kernels (embed, heads, head_dim) / (heads, head_dim, embed). Xavier fans
  are those of the flattened matrix, as flax's DenseGeneral computes them.
  """  # fmt: skip

  def __init__(self, features, num_heads, direction, *, dtype, param_dtype, rngs: nnx.Rngs):
    head_dim = features // num_heads
    if direction == 'in':
      shape, axes, bias_axes = (features, num_heads, head_dim), ('embed', 'heads', 'kv'), 1
      fans, self.equation = dict(in_axis=0, out_axis=(1, 2)), '...d,dhk->...hk'
    else:
      shape, axes, bias_axes = (num_heads, head_dim, features), ('heads', 'kv', 'embed'), 2
      fans, self.equation = dict(in_axis=(0, 1), out_axis=2), '...hk,hkd->...d'
    self.kernel = param(rngs, init.xavier_uniform(**fans), shape, param_dtype, axes)
    self.bias = param(rngs, init.zeros, shape[bias_axes:], param_dtype, axes[bias_axes:])
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel) + bias


def fused_attention(q, k, v, implementation: str | None = None, pad_to: int | None = None):
  """`jax.nn.dot_product_attention` over [batch, seq, heads, head_dim], any sequence length.

  `implementation`: 'xla', 'cudnn', or None: for bfloat16/float16 inputs, cuDNN flash attention
  where it traces (GPUs with cuDNN), otherwise XLA's: the choice depends on what traces, not on
  the backend's name. cuDNN trains only on sequence lengths that are multiples of 64 (ViT's
  197 or 577 tokens are not), so for it (or with `pad_to`) the tokens are zero-padded to a
  multiple of `pad_to` (default 64), the padding masked out through the sequence lengths, and
  the output cut back: values and gradients equal the unpadded attention's.
  """
  if implementation is None:
    if q.dtype in (jnp.bfloat16, jnp.float16):
      try:
        return fused_attention(q, k, v, 'cudnn', pad_to)
      except (NotImplementedError, ValueError, RuntimeError):  # No cuDNN, or shapes it refuses.
        pass
    implementation = 'xla'
  if implementation == 'cudnn' and pad_to is None:
    pad_to = 64
  n = q.shape[1]
  if not pad_to or n % pad_to == 0 or k.shape[1] != n:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = ((0, 0), (0, -n % pad_to), (0, 0), (0, 0))
  lengths = jnp.full((q.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(
    *(jnp.pad(t, pad) for t in (q, k, v)),
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
    implementation=implementation,
  )
  return out[:, :n]


class MultiHeadDotProductAttention(nnx.Module):
  """Multi-head attention with the released parameter layout (`query`, `key`, `value`, `out`);
  with `qk_norm` (ViT-22B, Dehghani et al. 2023; timm's `qk_norm=True`) also `query_norm` and
  `key_norm`: LayerNorms over head_dim (epsilon 1e-6) applied to each head's queries and keys.

  Without attention dropout, `fused_attention`; with dropout, or with `sow_weights` set (the
  softmax weights are then sown as `nnx.Intermediate` `attention_weights`), the explicit einsums.
  """

  def __init__(
    self,
    features: int,
    num_heads: int,
    *,
    dropout_rate: float = 0.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: str | None = None,  # 'xla', 'cudnn' or None (fused_attention).
    qk_norm: bool = False,
    rngs: nnx.Rngs,
  ):
    if features % num_heads:
      raise ValueError(f'hidden size {features} is not divisible by num_heads {num_heads}')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query, self.key, self.value = (
      HeadsDense(features, num_heads, 'in', **kw) for _ in range(3)
    )
    self.out = HeadsDense(features, num_heads, 'out', **kw)
    if qk_norm:  # One LayerNorm over head_dim for queries, one for keys, shared by the heads.
      self.query_norm = LayerNorm(features // num_heads, axis='kv', **kw)
      self.key_norm = LayerNorm(features // num_heads, axis='kv', **kw)
    self.head_dim, self.dropout_rate, self.dtype = features // num_heads, dropout_rate, dtype
    self.attention_impl, self.sow_weights = attention_impl, False

  def __call__(self, inputs_q, inputs_kv, rng: jax.Array | None = None) -> jax.Array:
    names = ('batch', 'seq', 'heads', 'kv')
    q, k, v = (
      constrain(proj(x), names)
      for proj, x in ((self.query, inputs_q), (self.key, inputs_kv), (self.value, inputs_kv))
    )
    if hasattr(self, 'query_norm'):  # QK-norm: per head, before the dot product.
      q, k = self.query_norm(q), self.key_norm(k)
    if self.sow_weights or (rng is not None and self.dropout_rate > 0):
      q = q / jnp.sqrt(self.head_dim).astype(q.dtype)
      weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32))
      if self.sow_weights:
        self.sow(nnx.Intermediate, 'attention_weights', weights)
      weights = dropout(weights.astype(self.dtype), self.dropout_rate, rng)
      x = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    else:
      x = fused_attention(q, k, v, self.attention_impl)
    return self.out(constrain(x, names))


class Encoder1DBlock(nnx.Module):
  """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

  With `layer_scale` (CaiT, Touvron et al. 2021; DeiT III; timm's `init_values`) each residual
  branch is multiplied per channel by `layerscale_attention` / `layerscale_mlp` (size width,
  initialised to the value) before it is added.
  """

  def __init__(
    self,
    features: int,
    mlp_dim: int,
    num_heads: int,
    *,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: str | None = None,
    layer_scale: float | None = None,
    qk_norm: bool = False,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.LayerNorm_0 = LayerNorm(features, **kw)
    mha = dict(dropout_rate=attention_dropout_rate, attention_impl=attention_impl, qk_norm=qk_norm)
    self.MultiHeadDotProductAttention_1 = MultiHeadDotProductAttention(
      features, num_heads, **mha, **kw
    )
    self.LayerNorm_2 = LayerNorm(features, **kw)
    self.MlpBlock_3 = MlpBlock(features, mlp_dim, dropout_rate=dropout_rate, **kw)
    if layer_scale is not None:
      gamma = init.constant(float(layer_scale))
      self.layerscale_attention = param(rngs, gamma, (features,), param_dtype, ('embed',))
      self.layerscale_mlp = param(rngs, gamma, (features,), param_dtype, ('embed',))
    self.dropout_rate = dropout_rate

  def __call__(
    self, inputs, droppath_rate=0.0, rng: jax.Array | None = None, first_token_only: bool = False
  ) -> jax.Array:
    """[batch, seq, embed] -> the same; `rng` (training) draws dropout and stochastic depth.

    `first_token_only`: return only the first token's output ([batch, 1, embed]), computed from
    all tokens' keys and values (the last block under a class-token head).
    """
    assert inputs.ndim == 3, f'expected [batch, seq, embed], got {inputs.shape}'
    rngs = [None] * 5 if rng is None else list(jax.random.split(rng, 5))
    inputs = constrain(inputs, ('batch', 'seq', 'embed'))
    x = self.LayerNorm_0(inputs)
    queries = x
    if first_token_only:
      queries, inputs = x[:, :1], inputs[:, :1]
    x = self.MultiHeadDotProductAttention_1(queries, x, rngs[0])
    x = dropout(x, self.dropout_rate, rngs[1])
    if hasattr(self, 'layerscale_attention'):
      x = x * self.layerscale_attention[...].astype(x.dtype)
    x = drop_path(x, droppath_rate, rngs[2]) + inputs
    y = self.MlpBlock_3(self.LayerNorm_2(x), rngs[3])
    if hasattr(self, 'layerscale_mlp'):
      y = y * self.layerscale_mlp[...].astype(y.dtype)
    y = drop_path(y, droppath_rate, rngs[4])
    return constrain(x + y, ('batch', 'seq', 'embed'))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings, [1, h * w, width] float32, row-major grid.

  The MoCo v3 / "Better plain ViT baselines" embedding as big_vision computes it
  (big_vision/models/vit.py:34-44, `posemb_sincos_2d`): width/4 frequencies
  temperature^(-i / (width/4 - 1)), and per token [sin(x f), cos(x f), sin(y f), cos(y f)] of its
  column x and row y. Computed here in float64 and rounded once to float32 (a constant; no
  parameter), so any grid works.
  """
  if width % 4:
    raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {width}")
  quarter = width // 4
  freqs = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / max(quarter - 1, 1))
  y, x = (np.outer(coords.ravel(), freqs) for coords in np.mgrid[:h, :w])  # Row, column.
  table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return table[None].astype(np.float32)


def keep_patches(num_patches: int, rate: float) -> int:
  """Patch tokens that patch dropout keeps at `rate` (timm's PatchDropout: at least one)."""
  return max(1, int(num_patches * (1.0 - rate))) if rate else num_patches


def drop_patches(x: jax.Array, prefix: int, rate: float, rng: jax.Array) -> jax.Array:
  """Patch dropout (FLIP, Li et al. 2023; timm's PatchDropout): keeps `keep_patches` random
  patch tokens per example (in their original order) after the `prefix` class/register tokens,
  which are always kept.
  """  # fmt: skip
  n, tokens, d = x.shape
  keep = keep_patches(tokens - prefix, rate)
  order = jnp.argsort(jax.random.uniform(rng, (n, tokens - prefix)), axis=1)[:, :keep]
  kept = jnp.take_along_axis(x[:, prefix:], jnp.sort(order, axis=1)[..., None], axis=1)
  return jnp.concatenate([x[:, :prefix], kept], axis=1)


class AddPositionEmbs(nnx.Module):
  """Adds learned position embeddings (one per token, class token included; register tokens,
  which have none, are skipped).
  """  # fmt: skip

  def __init__(self, num_tokens: int, features: int, param_dtype: Dtype, rngs: nnx.Rngs):
    shape, axes = (1, num_tokens, features), (None, 'seq', 'embed')
    self.pos_embedding = param(rngs, init.normal(stddev=0.02), shape, param_dtype, axes)

  def __call__(self, x: jax.Array, skip: tuple[int, int] = (0, 0)) -> jax.Array:
    """`skip=(start, count)`: tokens start..start+count-1 (registers) get no embedding."""
    posemb = self.pos_embedding[...].astype(x.dtype)
    start, count = skip
    if count:
      zeros = jnp.zeros((1, count, posemb.shape[-1]), posemb.dtype)
      posemb = jnp.concatenate([posemb[:, :start], zeros, posemb[:, start:]], axis=1)
    assert x.shape[1:] == posemb.shape[1:], (x.shape, posemb.shape)
    return x + posemb


class Encoder(nnx.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm.

  With `scan_layers` the blocks are one stacked module (`encoderblock/...` with a leading layer
  axis, logical name `layers`) run by `nnx.scan`: much faster compilation for deep models;
  `vit_jax.npz` converts between the scanned and the released (unscanned) layouts. Stochastic
  depth ramps linearly from 0 (first block) to `droppath_rate` (last block), scanned or not.
  `remat_policy` ('none', 'full', or a `jax.checkpoint_policies` name such as
  'dots_with_no_batch_dims_saveable') trades compute for memory.

  `num_tokens` counts the class token (if any) and the patches: the learned table's length.
  `posemb='sincos2d'`: fixed sine-cosine embeddings of the `grid` added to the patch tokens only
  (big_vision), no parameter. `num_registers` register tokens (after the class token) get no
  position embedding. `patch_dropout`: in training, each example keeps a random
  `keep_patches` subset of its patch tokens after the position embeddings (FLIP; timm), the
  class and register tokens always; evaluation sees every token. `layer_scale`, `qk_norm`: see
  `Encoder1DBlock` and `MultiHeadDotProductAttention`.
  """

  def __init__(
    self,
    num_tokens: int,
    features: int,
    *,
    num_layers: int,
    mlp_dim: int,
    num_heads: int,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    droppath_rate: float = 0.0,
    add_position_embedding: bool = True,
    scan_layers: bool = False,
    remat_policy: str = 'none',
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: str | None = None,
    posemb: str = 'learn',
    layer_scale: float | None = None,
    qk_norm: bool = False,
    patch_dropout: float = 0.0,
    grid: tuple[int, int] | None = None,
    num_registers: int = 0,
    rngs: nnx.Rngs,
  ):
    if remat_policy not in ('none', 'full') and not hasattr(jax.checkpoint_policies, remat_policy):
      raise ValueError(f"unknown remat_policy {remat_policy!r}; 'none', 'full' or a "
                       'jax.checkpoint_policies name')  # fmt: skip
    if posemb not in POSEMBS:
      raise ValueError(f'unknown posemb {posemb!r}; expected one of {POSEMBS}')
    if not 0.0 <= patch_dropout < 1.0:
      raise ValueError(f'patch_dropout must be in [0, 1), got {patch_dropout}')
    if posemb == 'sincos2d' and add_position_embedding:
      if grid is None:
        raise ValueError("posemb='sincos2d' needs the patch grid")
      posemb_sincos_2d(*grid, features)  # Checks the width now; computed again when called.
    elif add_position_embedding:
      self.posembed_input = AddPositionEmbs(num_tokens, features, param_dtype, rngs)
    block_kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    block_kw.update(dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate)
    block_kw.update(layer_scale=layer_scale, qk_norm=qk_norm)
    block = lambda rngs: Encoder1DBlock(features, mlp_dim, num_heads, rngs=rngs, **block_kw)
    if scan_layers:
      keys = jax.random.split(rngs.params(), num_layers)
      self.encoderblock = nnx.vmap(lambda key: block(KeyStream(nnx.Rngs(params=key))))(keys)
      for _, variable in nnx.iter_graph(self.encoderblock):
        if isinstance(variable, nnx.Param):
          variable.set_metadata('logical_axes', ('layers', *variable.get_metadata('logical_axes')))
    else:
      for i in range(num_layers):
        setattr(self, f'encoderblock_{i}', block(rngs))
    self.encoder_norm = LayerNorm(features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_layers, self.scan_layers, self.remat_policy = num_layers, scan_layers, remat_policy
    self.dropout_rate, self.droppath_rate = dropout_rate, droppath_rate
    self.patch_dropout, self.num_registers = float(patch_dropout), int(num_registers)
    self.posemb = posemb if add_position_embedding else 'none'
    self.grid = None if grid is None else tuple(grid)
    # Tokens before the patches: the class token (if any) and the registers.
    patches = None if grid is None else grid[0] * grid[1]
    self.num_cls = 0 if patches is None else num_tokens - patches
    self.stochastic = bool(dropout_rate or attention_dropout_rate or droppath_rate or patch_dropout)

  def __call__(self, x, rng: jax.Array | None = None, first_token_only: bool = False):
    """[batch, seq, embed] -> the same, or [batch, 1, embed] with `first_token_only`: the last
    block then computes only the first token's output (unscanned; a scanned stack runs every
    token and only the first goes on to the final LayerNorm). `rng`: training randomness.
    """  # fmt: skip
    assert x.ndim == 3, f'expected [batch, seq, embed], got {x.shape}'
    rng = rng if self.stochastic else None  # Nothing to draw: no keys in the program.
    n = self.num_layers
    keys = [None] * (n + 1) if rng is None else jax.random.split(rng, n + 1)
    prefix = self.num_cls + self.num_registers
    if hasattr(self, 'posembed_input'):
      skip = (self.num_cls, self.num_registers)
      x = dropout(self.posembed_input(x, skip), self.dropout_rate, keys[-1])
    elif self.posemb == 'sincos2d':  # Patches only (big_vision adds it before the class token).
      table = posemb_sincos_2d(*self.grid, x.shape[-1])
      patches = x[:, prefix:] + jnp.asarray(table).astype(x.dtype)
      x = dropout(jnp.concatenate([x[:, :prefix], patches], axis=1), self.dropout_rate, keys[-1])
    if self.patch_dropout and rng is not None:  # Its own key: the other draws are unchanged.
      x = drop_patches(x, prefix, self.patch_dropout, jax.random.fold_in(rng, n + 1))
    rates = [self.droppath_rate * i / max(self.num_layers - 1, 1) for i in range(self.num_layers)]

    def run(block, x, rate, key, first_token_only=False):
      return block(x, rate, key, first_token_only)

    if self.remat_policy != 'none':
      policy = None
      if self.remat_policy != 'full':
        policy = getattr(jax.checkpoint_policies, self.remat_policy)
      run = nnx.remat(run, policy=policy, prevent_cse=not self.scan_layers, static_argnums=(4,))
    if self.scan_layers:
      layer_keys = None if rng is None else keys[: self.num_layers]
      scan = nnx.scan(
        lambda block, x, rate, key: run(block, x, rate if self.droppath_rate else 0.0, key),
        in_axes=(0, nnx.Carry, 0, None if rng is None else 0),
        out_axes=nnx.Carry,
      )
      x = scan(self.encoderblock, x, jnp.asarray(rates, jnp.float32), layer_keys)
      if first_token_only:
        x = x[:, :1]
    else:
      for i, rate in enumerate(rates):
        last = first_token_only and i == self.num_layers - 1
        x = run(getattr(self, f'encoderblock_{i}'), x, rate, keys[i], last)
    return self.encoder_norm(x)


class MAPHead(nnx.Module):
  """Multihead attention pooling: a learned probe attends over the tokens (big_vision layout)."""

  def __init__(self, features, num_heads, mlp_dim, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.probe = param(
      rngs, init.xavier_uniform(), (1, 1, features), param_dtype, (None, None, 'embed')
    )
    self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(features, num_heads, **kw)
    self.LayerNorm_0 = LayerNorm(features, **kw)
    self.MlpBlock_0 = MlpBlock(features, mlp_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    probe = jnp.tile(self.probe[...].astype(x.dtype), [x.shape[0], 1, 1])
    x = self.MultiHeadDotProductAttention_0(probe, x)
    return (x + self.MlpBlock_0(self.LayerNorm_0(x)))[:, 0]


class PatchEmbedding(nnx.Module):
  """Non-overlapping patches -> `features`: one strided convolution (kernel [ph, pw, c, features],
  bias), as flax's Conv.
  """  # fmt: skip

  def __init__(self, in_features, features, patch_size, *, dtype, param_dtype, rngs: nnx.Rngs):
    shape = (*patch_size, in_features, features)
    self.kernel = param(rngs, init.lecun_normal(), shape, param_dtype, (None, None, None, 'embed'))
    self.bias = param(rngs, init.zeros, (features,), param_dtype, ('embed',))
    self.patch_size, self.dtype = tuple(patch_size), dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
    dims = ('NHWC', 'HWIO', 'NHWC')
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype), kernel, self.patch_size, 'VALID', dimension_numbers=dims
    )
    return y + bias


class VisionTransformer(nnx.Module):
  """ViT classifier; with `resnet` set, the hybrid R+ViT (a BiT ResNet stem before the patches).

  `model(images)` takes NHWC images in [-1, 1] of `image_size` and returns float32 logits
  ([batch, num_classes], or [batch, tokens, num_classes] for the unpooled classifiers; pre-logits
  features when `num_classes` is 0). `model.train()` switches dropout and stochastic depth on
  (randomness from `rngs`' `dropout` stream, or the call's `rng`); `model.eval()` off.

  `num_registers` (Darcet et al., ICLR 2024): learned `registers` tokens [1, N, width] inserted
  after the class token, without position embeddings, and dropped after the encoder (the heads
  and the unpooled outputs see the class token and the patches only). The encoder options
  (`posemb`, `layer_scale`, `qk_norm`, `patch_dropout`) are described in `Encoder`.
  """

  def __init__(
    self,
    num_classes: int,
    patches: Sequence[int],
    hidden_size: int,
    transformer: dict,
    classifier: str = 'token',
    representation_size: int | None = None,
    resnet: dict | None = None,
    head_bias_init: float = 0.0,
    head_zero_init: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    model_name: str | None = None,
    image_size: int | Sequence[int] = 224,
    num_registers: int = 0,
    *,
    rngs: nnx.Rngs,
  ):
    if classifier not in CLASSIFIERS:
      raise ValueError(f'unknown classifier {classifier!r}; expected one of {CLASSIFIERS}')
    if num_registers < 0:
      raise ValueError(f'num_registers must be >= 0, got {num_registers}')
    if transformer.get('patch_dropout') and classifier in ('unpooled', 'token_unpooled'):
      raise ValueError(f'patch_dropout drops tokens, so an {classifier!r} classifier (one output '
                       'per token) cannot use it; use token, gap or map')  # fmt: skip
    rngs = KeyStream.of(rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    channels = 3
    self.resnet_stages = None
    if resnet is not None:
      self.resnet_stages = len(resnet['num_layers'])
      channels = resnet_lib.add_stem(self, resnet['num_layers'], resnet['width_factor'], **kw)
      size = resnet_lib.stem_output_size(size, self.resnet_stages)
    ph, pw = patches
    if size[0] % ph or size[1] % pw:
      raise ValueError(
        f'feature map {size} of image_size {image_size} is not divisible by the patch size '
        f'{(ph, pw)}; use an image size that is a multiple of the patch size'
      )
    self.embedding = PatchEmbedding(channels, hidden_size, (ph, pw), **kw)
    grid = (size[0] // ph, size[1] // pw)
    tokens = grid[0] * grid[1]
    if classifier in ('token', 'token_unpooled'):
      self.cls = param(rngs, init.zeros, (1, 1, hidden_size), param_dtype, (None, None, 'embed'))
      tokens += 1
    if num_registers:  # Darcet et al. 2024; timm initialises its reg_token with std 1e-6.
      shape = (1, num_registers, hidden_size)
      self.registers = param(rngs, init.normal(1e-6), shape, param_dtype, (None, None, 'embed'))
    self.Transformer = Encoder(
      tokens, hidden_size, **dict(transformer), grid=grid, num_registers=num_registers, **kw
    )
    if classifier == 'map':
      self.MAPHead_0 = MAPHead(hidden_size, transformer['num_heads'], transformer['mlp_dim'], **kw)
    features, head_axes = hidden_size, ('embed', 'classes')
    if representation_size is not None:
      self.pre_logits = Dense(hidden_size, representation_size, ('embed', 'mlp'), **kw)
      features, head_axes = representation_size, ('mlp', 'classes')
    if num_classes:
      kernel_init = init.zeros if head_zero_init else init.lecun_normal()
      head_init = dict(kernel_init=kernel_init, bias_init=init.constant(head_bias_init))
      self.head = Dense(features, num_classes, head_axes, **head_init, **kw)
    # The hyperparameters, as the original schema names them (metrics.model_flops, exports).
    self.num_classes, self.patches, self.hidden_size = num_classes, (ph, pw), hidden_size
    frozen = lambda d: FrozenDict({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    self.transformer = frozen(transformer)
    self.resnet = None if resnet is None else frozen(resnet)
    self.classifier, self.representation_size = classifier, representation_size
    self.model_name, self.dtype, self.num_registers = model_name, dtype, num_registers
    self.grid = grid
    self.deterministic, self.sow_weights = True, False
    self.dropout_rngs = nnx.Rngs(dropout=rngs.dropout())

  def __call__(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected NHWC RGB images [batch, height, width, 3], got {images.shape}')
    if rng is None and not self.deterministic:
      rng = self.dropout_rngs.dropout()
    elif self.deterministic:
      rng = None
    x = constrain(images.astype(self.dtype), ('batch', None, None, None))
    if self.resnet_stages is not None:
      x = resnet_lib.stem(self, x, self.resnet_stages)
    x = self.embedding(x)
    n, h, w, c = x.shape
    if (h, w) != self.grid:
      raise ValueError(
        f'images {images.shape[1:3]} give a {h}x{w} patch grid; this model was built for '
        f'{self.grid} (image_size); build it with get_model(..., image_size=...) for this size'
      )
    x = jnp.reshape(x, (n, h * w, c))
    c = int(hasattr(self, 'cls'))
    if c:
      x = jnp.concatenate([jnp.tile(self.cls[...].astype(x.dtype), [n, 1, 1]), x], axis=1)
    r = self.num_registers
    if r:  # After the class token, before the patches (timm's order).
      registers = jnp.tile(self.registers[...].astype(x.dtype), [n, 1, 1])
      x = jnp.concatenate([x[:, :c], registers, x[:, c:]], axis=1)
    # Under a class-token head only the first token leaves the encoder: its last block skips
    # the other tokens' outputs. All tokens when attention weights are sown.
    first_token_only = self.classifier == 'token' and not self.sow_weights
    x = self.Transformer(x, rng, first_token_only=first_token_only)
    if r and not first_token_only:  # The heads never see the registers.
      x = jnp.concatenate([x[:, :c], x[:, c + r :]], axis=1)
    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    elif self.classifier == 'map':
      x = self.MAPHead_0(x)
    if hasattr(self, 'pre_logits'):
      x = jnp.tanh(self.pre_logits(x))
    if not hasattr(self, 'head'):
      return x  # Feature extractor: pre-logits features.
    # Logits in float32 whatever the compute dtype, for a stable softmax/cross-entropy.
    return self.head(x).astype(jnp.float32)
