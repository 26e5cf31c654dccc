"""Vision Transformer (Dosovitskiy et al., ICLR 2021) and its hybrid ResNet+ViT variant.

Parameter names follow the released checkpoints exactly (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`): they are the checkpoint format.
Every parameter and key activation carries logical axis names (`embed`, `mlp`, `heads`, `kv`,
`batch`, `seq`, `classes`) that `vit_jax.sharding` maps onto mesh axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import resnet

Dtype = Any
Initializer = Callable[..., jax.Array]

_XAVIER = nn.initializers.xavier_uniform()
CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')


def _logical(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
  return nn.with_logical_partitioning(init, names)


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, names)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings (one per token, class token included)."""

  posemb_init: Initializer = nn.initializers.normal(stddev=0.02)
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    assert inputs.ndim == 3, f'expected [batch, seq, embed], got {inputs.shape}'
    shape = (1, inputs.shape[1], inputs.shape[2])
    posemb = self.param(
      'pos_embedding',
      _logical(self.posemb_init, (None, 'seq', 'embed')),
      shape,
      self.param_dtype,
    )
    return inputs + posemb.astype(inputs.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh approximation, as the published models) -> Dense, with dropout."""

  mlp_dim: int
  out_dim: int | None = None
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
    out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    dense = lambda features, names, name: nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_logical(self.kernel_init, names),
      bias_init=_logical(self.bias_init, names[-1:]),
      name=name,
    )
    x = dense(self.mlp_dim, ('embed', 'mlp'), 'Dense_0')(inputs)
    x = nn.gelu(x, approximate=True)
    x = _constrain(x, ('batch', 'seq', 'mlp'))
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, ('mlp', 'embed'), 'Dense_1')(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class _HeadsDense(nn.Module):
  """Projection into ('in': embed -> heads x head_dim) or out of ('out') attention heads.

  Kernels are created in their 3-D checkpoint shape, (embed, heads, head_dim) or
  (heads, head_dim, embed), so their logical names hold under a mesh (flax's DenseGeneral
  initializes a flattened 2-D kernel). Xavier fans are those of the flattened matrix, as
  DenseGeneral computes them, so initialization is unchanged.
  """

  features: tuple[int, ...]
  direction: str
  kernel_init: Initializer
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.direction == 'in':
      shape, names = (x.shape[-1], *self.features), ('embed', 'heads', 'kv')
      fans = dict(in_axis=0, out_axis=(1, 2))
      bias_names = ('heads', 'kv')
      equation = '...d,dhk->...hk'
    else:
      shape, names = (*x.shape[-2:], *self.features), ('heads', 'kv', 'embed')
      fans = dict(in_axis=(0, 1), out_axis=2)
      bias_names = ('embed',)
      equation = '...hk,hkd->...d'
    init = self.kernel_init
    if init is _XAVIER:
      init = nn.initializers.xavier_uniform(**fans)
    kernel = self.param('kernel', _logical(init, names), shape, self.param_dtype)
    bias = self.param(
      'bias',
      _logical(nn.initializers.zeros, bias_names),
      shape[-len(bias_names) :],
      self.param_dtype,
    )
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    return jnp.einsum(equation, x, kernel) + bias


def fused_attention(q, k, v, implementation: str | None = None, pad_to: int | None = None):
  """`jax.nn.dot_product_attention` over [batch, seq, heads, head_dim], any sequence length.

  `implementation`: 'xla', 'cudnn', or None: for bfloat16/float16 inputs, cuDNN flash attention
  where it traces (GPUs with cuDNN; 1.31x faster ViT-B/16 training steps on an H200, same
  gradient error vs float32 as XLA's), otherwise XLA's. The choice depends on what traces, not
  on the backend's name. cuDNN trains only on sequence lengths that are multiples of 64 (ViT's
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


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the released parameter layout.

  `query`/`key`/`value` kernels are (embed, heads, head_dim) and `out` is (heads, head_dim, embed),
  as in the published checkpoints. Without attention dropout, `jax.nn.dot_product_attention`
  (`fused_attention`); with dropout or sown weights, the explicit einsum form.
  """

  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = _XAVIER
  attention_impl: str | None = None  # 'xla', 'cudnn' or None (fused_attention).

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, *, deterministic: bool):
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'hidden size {features} is not divisible by num_heads {self.num_heads}')
    head_dim = features // self.num_heads

    def dense(name, direction, features):
      return _HeadsDense(
        features, direction, self.kernel_init, self.dtype, self.param_dtype, name=name
      )

    def proj(name, x):
      return dense(name, 'in', (self.num_heads, head_dim))(x)

    q, k, v = proj('query', inputs_q), proj('key', inputs_kv), proj('value', inputs_kv)
    names = ('batch', 'seq', 'heads', 'kv')
    q, k, v = (_constrain(t, names) for t in (q, k, v))
    if self.is_mutable_collection('intermediates'):  # Asked for (attention rollout): explicit.
      scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      self.sow('intermediates', 'attention_weights', jax.nn.softmax(scores.astype(jnp.float32)))
    if deterministic or self.dropout_rate == 0.0:
      x = fused_attention(q, k, v, self.attention_impl)
    else:
      q = q / jnp.sqrt(head_dim).astype(q.dtype)
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
      weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.dropout_rate, weights.shape)
      weights = jnp.where(keep, weights / (1.0 - self.dropout_rate), 0).astype(self.dtype)
      x = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    x = _constrain(x, names)
    return dense('out', 'out', (features,))(x)


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
  """LayerNorm with epsilon 1e-6, as the released models."""
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=_logical(nn.initializers.ones, ('embed',)),
    bias_init=_logical(nn.initializers.zeros, ('embed',)),
    name=name,
  )


def _drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drops the residual branch per example, rescaling the survivors."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

  `first_token_only`: return only the first token's output ([batch, 1, embed]), computed from
  all tokens' keys and values; the other tokens' queries, attention outputs and MLPs are skipped
  (the last block under a class-token head, whose other outputs nothing reads).
  """

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  deterministic: bool = True  # A field, not a call argument, so nn.remat/nn.scan see only arrays.
  first_token_only: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, droppath_rate: jax.Array | None = None) -> jax.Array:
    """`droppath_rate`: this layer's rate as an array (scanned stacks), else the field's."""
    assert inputs.ndim == 3, f'expected [batch, seq, embed], got {inputs.shape}'
    deterministic = self.deterministic
    rate = self.droppath_rate if droppath_rate is None else droppath_rate
    inputs = _constrain(inputs, ('batch', 'seq', 'embed'))
    x = _layer_norm('LayerNorm_0', self.dtype, self.param_dtype)(inputs)
    queries = x
    if self.first_token_only:
      queries, inputs = x[:, :1], inputs[:, :1]
    x = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.attention_dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_impl=self.attention_impl,
      name='MultiHeadDotProductAttention_1',
    )(queries, x, deterministic=deterministic)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    droppath = not deterministic and self.droppath_rate > 0
    if droppath:
      x = _drop_path(x, rate, self.make_rng('dropout'))
    x = x + inputs

    y = _layer_norm('LayerNorm_2', self.dtype, self.param_dtype)(x)
    y = MlpBlock(
      mlp_dim=self.mlp_dim,
      dropout_rate=self.dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='MlpBlock_3',
    )(y, deterministic=deterministic)
    if droppath:
      y = _drop_path(y, rate, self.make_rng('dropout'))
    return _constrain(x + y, ('batch', 'seq', 'embed'))


class _ScanBlock(Encoder1DBlock):
  """Encoder1DBlock with the (carry, out) signature `nn.scan` needs; scans over drop-path rates."""

  @nn.compact
  def __call__(self, x, droppath_rate):
    return super().__call__(x, droppath_rate), None


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm.

  With `scan_layers` the blocks are one `nn.scan` over stacked parameters (`encoderblock/...`
  with a leading layer axis): much faster compilation for deep models. `vit_jax.npz`
  converts between the scanned and the released (unscanned) layouts. `remat_policy` ('none',
  'full', or a `jax.checkpoint_policies` name such as 'dots_with_no_batch_dims_saveable') trades
  compute for memory.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  add_position_embedding: bool = True
  scan_layers: bool = False
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, first_token_only: bool = False) -> jax.Array:
    """[batch, seq, embed] -> the same, or [batch, 1, embed] with `first_token_only`: the last
    block then computes only the first token's output (unscanned; a scanned stack runs every
    token and only the first goes on to the final LayerNorm).
    """  # fmt: skip
    assert x.ndim == 3, f'expected [batch, seq, embed], got {x.shape}'
    if self.add_position_embedding:
      x = AddPositionEmbs(param_dtype=self.param_dtype, name='posembed_input')(x)
      x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    block_kwargs = dict(
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_impl=self.attention_impl,
      deterministic=not train,
    )
    block_cls = _ScanBlock if self.scan_layers else Encoder1DBlock
    if self.remat_policy != 'none':
      policy = (
        None if self.remat_policy == 'full' else getattr(jax.checkpoint_policies, self.remat_policy)
      )
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not self.scan_layers)
    # Stochastic depth ramps linearly from 0 (first block) to `droppath_rate` (last block).
    rates = [self.droppath_rate * i / max(self.num_layers - 1, 1) for i in range(self.num_layers)]
    if self.scan_layers:
      # The same per-layer rates, scanned over with the blocks (the field only switches it on).
      x, _ = nn.scan(
        block_cls,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=0,
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )(
        droppath_rate=self.droppath_rate, name='encoderblock', **block_kwargs
      )(x, jnp.asarray(rates, jnp.float32))
      if first_token_only:  # The stack ran every token; only the first is normalised and leaves.
        x = x[:, :1]
    else:
      for i, rate in enumerate(rates):
        x = block_cls(
          droppath_rate=rate,
          first_token_only=first_token_only and i == self.num_layers - 1,
          name=f'encoderblock_{i}',
          **block_kwargs,
        )(x)
    return _layer_norm('encoder_norm', self.dtype, self.param_dtype)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens (big_vision layout)."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, _, d = x.shape
    probe = self.param(
      'probe',
      _logical(nn.initializers.xavier_uniform(), (None, None, 'embed')),
      (1, 1, d),
      self.param_dtype,
    )
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='MultiHeadDotProductAttention_0',
    )(probe, x, deterministic=True)
    y = _layer_norm('LayerNorm_0', self.dtype, self.param_dtype)(x)
    x = x + MlpBlock(
      mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name='MlpBlock_0'
    )(y, deterministic=True)
    return x[:, 0]


class PatchEmbedding(nn.Module):
  """Non-overlapping patches -> `features`: one strided convolution (nn.Conv's parameters,
  kernel [ph, pw, c, features] and bias).
  """  # fmt: skip

  features: int
  patch_size: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.patch_size
    kernel = self.param(
      'kernel',
      _logical(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
      (ph, pw, x.shape[-1], self.features),
      self.param_dtype,
    )
    bias = self.param(
      'bias', _logical(nn.initializers.zeros, ('embed',)), (self.features,), self.param_dtype
    )
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    dims = ('NHWC', 'HWIO', 'NHWC')
    return jax.lax.conv_general_dilated(x, kernel, (ph, pw), 'VALID', dimension_numbers=dims) + bias


class VisionTransformer(nn.Module):
  """ViT classifier; with `resnet` set, the hybrid R+ViT (a BiT ResNet stem before the patches).

  `__call__(images, *, train)` takes NHWC images in [-1, 1] and returns logits
  ([batch, num_classes], or [batch, tokens, num_classes] for the unpooled classifiers).
  """

  num_classes: int
  patches: Sequence[int]
  hidden_size: int
  transformer: dict
  classifier: str = 'token'
  representation_size: int | None = None
  resnet: dict | None = None
  head_bias_init: float = 0.0
  head_zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  model_name: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'unknown classifier {self.classifier!r}; expected one of {CLASSIFIERS}')
    if inputs.ndim != 4 or inputs.shape[-1] != 3:
      raise ValueError(f'expected NHWC RGB images [batch, height, width, 3], got {inputs.shape}')
    x = _constrain(inputs.astype(self.dtype), ('batch', None, None, None))

    if self.resnet is not None:
      x = resnet.resnet_stem(
        x,
        num_layers=tuple(self.resnet['num_layers']),
        width_factor=self.resnet['width_factor'],
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )

    ph, pw = self.patches
    if x.shape[1] % ph or x.shape[2] % pw:
      raise ValueError(
        f'feature map {x.shape[1:3]} is not divisible by the patch size {(ph, pw)}; '
        'resize the images to a multiple of the patch size'
      )
    x = PatchEmbedding(self.hidden_size, (ph, pw), self.dtype, self.param_dtype, name='embedding')(
      x
    )
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))

    if self.classifier in ('token', 'token_unpooled'):
      cls = self.param(
        'cls',
        _logical(nn.initializers.zeros, (None, None, 'embed')),
        (1, 1, c),
        self.param_dtype,
      )
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)

    transformer = dict(self.transformer)
    # Under a class-token head only the first token leaves the encoder: its last block skips
    # the other tokens' outputs (1/depth of the encoder's work). All tokens when intermediates
    # are asked for (attention maps, captured features).
    x = Encoder(
      name='Transformer',
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      **transformer,
    )(
      x,
      train=train,
      first_token_only=self.classifier == 'token'
      and not self.is_mutable_collection('intermediates'),
    )

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    elif self.classifier == 'map':
      x = MAPHead(
        num_heads=transformer['num_heads'],
        mlp_dim=transformer['mlp_dim'],
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )(x)

    if self.representation_size is not None:
      x = nn.Dense(
        self.representation_size,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_logical(nn.initializers.lecun_normal(), ('embed', 'mlp')),
        bias_init=_logical(nn.initializers.zeros, ('mlp',)),
        name='pre_logits',
      )(x)
      x = jnp.tanh(x)
      head_in = ('mlp', 'classes')
    else:
      head_in = ('embed', 'classes')

    if not self.num_classes:
      return x  # Feature extractor: pre-logits features.
    kernel_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
    x = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_logical(kernel_init, head_in),
      bias_init=_logical(nn.initializers.constant(self.head_bias_init), ('classes',)),
      name='head',
    )(x)
    # Logits in float32 whatever the compute dtype, for a stable softmax/cross-entropy.
    return x.astype(jnp.float32)
