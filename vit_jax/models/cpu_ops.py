"""Attention, the MLP and LayerNorm with hand-written backward passes, for the CPU layouts of
`vit.py`.

XLA's automatic differentiation of these blocks on CPU transposes and copies the big
activations between the matmuls (the weight gradients contract over batch x sequence) and
splits LayerNorm's gradient into many small fusions; the backward passes below are the same
math written as matmuls over contiguous axes and two row reductions, reusing what the forward
pass computed (the attention weights and output, the MLP's pre-activation, the normalized
input). Values and gradients equal the automatic ones to float rounding (tests/test_models.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_GELU_C = float(np.sqrt(2 / np.pi))  # tanh-approximate GELU, as the published models use.


def _attention_fwd(q, k, v):
  b, n, t, h = q.shape
  s = k.shape[2]
  q = (q / jnp.sqrt(h).astype(q.dtype)).reshape(b * n, t, h)
  k, v = k.reshape(b * n, s, h), v.reshape(b * n, s, h)
  logits = jnp.einsum('bqd,bkd->bqk', q, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(q.dtype)
  out = jnp.einsum('bqk,bkd->bqd', weights, v)
  return out.reshape(b, n, t, h), (q, k, v, weights, out)


def _attention_bwd(residuals, d_out):
  q, k, v, weights, out = residuals  # q scaled by 1/sqrt(head_dim); all [batch*heads, seq, dim].
  shape = d_out.shape
  b, n, t, h = shape
  d_out = d_out.reshape(b * n, t, h)
  d_v = jnp.einsum('bqk,bqd->bkd', weights, d_out)
  d_weights = jnp.einsum('bqd,bkd->bqk', d_out, v)
  # Softmax backward; sum_k(d_weights * weights) = sum_d(d_out * out), a [.., seq] reduction
  # over head_dim instead of over the keys.
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (weights.astype(jnp.float32) * (d_weights.astype(jnp.float32) - row)).astype(q.dtype)
  d_q = jnp.einsum('bqk,bkd->bqd', d_logits, k) / jnp.sqrt(h).astype(q.dtype)
  d_k = jnp.einsum('bqk,bqd->bkd', d_logits, q)
  s = k.shape[1]
  return d_q.reshape(shape), d_k.reshape(b, n, s, h), d_v.reshape(b, n, s, h)


@jax.custom_vjp
def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v over [batch, heads, seq, head_dim], softmax in float32.

  The heads are folded into the one batch dimension of every matmul, whose contractions run
  over contiguous axes: on XLA:CPU this trains and infers faster than
  `jax.nn.dot_product_attention`'s grouped [batch, seq, heads, group, head_dim] layout, whose
  transposes and copies cost more than the attention matmuls themselves (benchmarks/README.md).
  The backward pass is written out (softmax gradient from the saved weights and output).
  """
  return _attention_fwd(q, k, v)[0]


heads_first_attention.defvjp(_attention_fwd, _attention_bwd)


def _gelu_and_slope(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """tanh-approximate GELU and its derivative, from one tanh."""
  inner = _GELU_C * (x + 0.044715 * x**3)
  tanh = jnp.tanh(inner)
  gelu = 0.5 * x * (1 + tanh)
  slope = 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh**2) * _GELU_C * (1 + 3 * 0.044715 * x**2)
  return gelu, slope


def _mlp_fwd(x, kernel_0, bias_0, kernel_1, bias_1):
  flat = x.reshape(-1, x.shape[-1])
  pre = jnp.dot(flat, kernel_0) + bias_0
  hidden = jax.nn.gelu(pre, approximate=True)
  out = jnp.dot(hidden, kernel_1) + bias_1
  return out.reshape(*x.shape[:-1], out.shape[-1]), (flat, pre, kernel_0, kernel_1)


def _mlp_bwd(residuals, d_out):
  flat, pre, kernel_0, kernel_1 = residuals
  shape = (*d_out.shape[:-1], flat.shape[-1])
  d_out = d_out.reshape(-1, d_out.shape[-1])
  hidden, slope = _gelu_and_slope(pre)
  d_kernel_1 = jnp.dot(hidden.T, d_out)
  d_pre = jnp.dot(d_out, kernel_1.T) * slope
  d_kernel_0 = jnp.dot(flat.T, d_pre)
  d_x = jnp.dot(d_pre, kernel_0.T)
  return d_x.reshape(shape), d_kernel_0, d_pre.sum(0), d_kernel_1, d_out.sum(0)


@jax.custom_vjp
def mlp_gelu(x, kernel_0, bias_0, kernel_1, bias_1) -> jax.Array:
  """x @ kernel_0 + bias_0 -> GELU (tanh approximation) -> @ kernel_1 + bias_1, over the last
  axis of x, all in x's dtype. The backward pass recomputes the GELU and its slope from the
  saved pre-activation and runs each weight gradient as one matmul over batch x sequence.
  """  # fmt: skip
  return _mlp_fwd(x, kernel_0, bias_0, kernel_1, bias_1)[0]


mlp_gelu.defvjp(_mlp_fwd, _mlp_bwd)


def _layer_norm_fwd(x, scale, bias, epsilon):
  # Flax's nn.LayerNorm arithmetic: float32 statistics, variance as E[x^2] - E[x]^2.
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(xf * xf, axis=-1, keepdims=True) - mean * mean)
  rstd = jax.lax.rsqrt(var + epsilon)
  normalized = (xf - mean) * rstd
  out = normalized * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return out.astype(x.dtype), (normalized, rstd, scale)


def _layer_norm_bwd(epsilon, residuals, d_out):
  del epsilon
  normalized, rstd, scale = residuals
  d_out32 = d_out.astype(jnp.float32)
  rows = d_out32.reshape(-1, d_out.shape[-1])
  d_bias = rows.sum(0)
  d_scale = (rows * normalized.reshape(rows.shape)).sum(0)
  g = d_out32 * scale.astype(jnp.float32)
  mean_g = jnp.mean(g, axis=-1, keepdims=True)
  mean_gn = jnp.mean(g * normalized, axis=-1, keepdims=True)
  d_x = rstd * (g - mean_g - normalized * mean_gn)
  # The output, hence its cotangent, has the input's dtype.
  return d_x.astype(d_out.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis, as flax's nn.LayerNorm computes it (float32 statistics,
  output in x's dtype), with the backward pass written out: the input gradient from the saved
  normalized input and two row means, the scale and bias gradients as column sums.
  """  # fmt: skip
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
