"""Attention and the MLP with hand-written backward passes, for the CPU layouts of `vit.py`.

XLA's automatic differentiation of these blocks on CPU transposes and copies the big
activations between the matmuls (the weight gradients contract over batch x sequence); the
backward passes below are the same math written as matmuls over contiguous axes, reusing what
the forward pass computed (the attention weights and output, the MLP's pre-activation). Values
and gradients equal the automatic ones to float rounding (tests/test_models.py).
"""

from __future__ import annotations

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
