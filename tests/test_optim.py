"""Schedules, weight-decay masks, clipping, and the optimizers against hand-written updates."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import optim


def _config(**kw):
  c = ml_collections.ConfigDict(
    dict(
      optimizer='sgd',
      lr=0.1,
      warmup_steps=10,
      total_steps=110,
      decay_type='cosine',
      end_lr_factor=0.0,
      grad_clip_norm=0.0,
      weight_decay=0.0,
      weight_decay_mode='decoupled',
      wd_mask='kernels',
      momentum=0.9,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      mu_dtype='',
    )
  )
  c.update(kw)
  return c


def test_warmup_then_cosine_and_linear():
  cos = optim.make_schedule(_config())
  assert float(cos(0)) == 0.0
  assert float(cos(5)) == pytest.approx(0.05)
  assert float(cos(10)) == pytest.approx(0.1)
  assert float(cos(60)) == pytest.approx(0.05, rel=1e-5)  # Half way through the cosine.
  assert float(cos(110)) == pytest.approx(0.0, abs=1e-9)
  lin = optim.make_schedule(_config(decay_type='linear', end_lr_factor=0.01))
  assert float(lin(60)) == pytest.approx(0.1 - 0.5 * (0.1 - 0.001), rel=1e-5)
  assert float(lin(110)) == pytest.approx(0.001, rel=1e-5)
  const = optim.make_schedule(_config(decay_type='constant', warmup_steps=0))
  assert float(const(0)) == float(const(100)) == pytest.approx(0.1)


def test_unknown_names_fail_loudly():
  with pytest.raises(ValueError, match="unknown decay_type 'cosin'"):
    optim.make_schedule(_config(decay_type='cosin'))
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
    optim.make_optimizer(_config(optimizer='lamb'))
  with pytest.raises(ValueError, match='unknown wd_mask'):
    optim.weight_decay_mask({'w': jnp.ones((2, 2))}, 'biases')
  with pytest.raises(ValueError, match='warmup_steps=200'):
    optim.make_schedule(_config(warmup_steps=200))


PARAMS = {
  'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))},
  'Transformer': {'posembed_input': {'pos_embedding': jnp.ones((1, 4, 2))}},
  'cls': jnp.ones((1, 1, 2)),
  'LayerNorm_0': {'scale': jnp.ones((2,))},
  'query': {'kernel': jnp.ones((2, 1, 2)), 'bias': jnp.ones((1, 2))},
}


def test_weight_decay_mask_kernels_only():
  mask = optim.weight_decay_mask(PARAMS, 'kernels')
  assert mask['dense']['kernel'] is True or mask['dense']['kernel']
  assert not mask['dense']['bias']
  assert not mask['Transformer']['posembed_input']['pos_embedding']
  assert not mask['cls']
  assert not mask['LayerNorm_0']['scale']
  assert mask['query']['kernel'] and not mask['query']['bias']  # Names decide, not ranks.


@pytest.mark.parametrize('mode', ['decoupled', 'lr_scaled'])
def test_adamw_first_step_matches_the_formula(mode):
  lr, wd = 0.01, 0.1
  tx, _ = optim.make_optimizer(
    _config(
      optimizer='adamw',
      lr=lr,
      warmup_steps=0,
      weight_decay=wd,
      weight_decay_mode=mode,
      decay_type='constant',
    )
  )
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  # Adam's first step is lr * g / (|g| + eps) = lr; the decay adds wd * p on kernels
  # ('decoupled', big_vision's: not scaled by lr) or lr * wd * p ('lr_scaled', torch's AdamW).
  decay = wd if mode == 'decoupled' else lr * wd
  np.testing.assert_allclose(updates['dense']['kernel'], -(lr + decay), rtol=1e-5)
  np.testing.assert_allclose(updates['dense']['bias'], -lr, rtol=1e-5)
  np.testing.assert_allclose(updates['cls'], -lr, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown weight_decay_mode 'coupled'"):
    optim.make_optimizer(_config(optimizer='adamw', weight_decay=wd, weight_decay_mode='coupled'))


def test_sgd_momentum_with_global_norm_clipping():
  tx, _ = optim.make_optimizer(
    _config(lr=0.1, warmup_steps=0, decay_type='constant', grad_clip_norm=1.0)
  )
  params = {'w': jnp.zeros((4,))}
  grads = {'w': jnp.full((4,), 3.0)}  # Norm 6 -> clipped to norm 1: each entry 0.5.
  state = tx.init(params)
  u1, state = tx.update(grads, state, params)
  np.testing.assert_allclose(u1['w'], -0.1 * 0.5, rtol=1e-6)
  u2, state = tx.update(grads, state, params)
  np.testing.assert_allclose(u2['w'], -0.1 * (0.5 + 0.9 * 0.5), rtol=1e-6)


def test_bfloat16_momentum_state():
  tx, _ = optim.make_optimizer(_config(optimizer='adamw', mu_dtype='bfloat16'))
  state = tx.init({'w': jnp.zeros((4, 4))})
  dtypes = {x.dtype for x in jax.tree.leaves(state) if getattr(x, 'ndim', 0) == 2}
  assert dtypes == {jnp.dtype('bfloat16'), jnp.dtype('float32')}  # mu in bf16, nu in f32.
