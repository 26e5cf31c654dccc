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
      layer_decay=0.0,
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


def _timm_layer_id(timm_name: str, depth: int) -> int:
  """timm optim/_param_groups.py:136-162 with ViT's group_matcher (vision_transformer.py:973-976):
  stem r'^cls_token|reg_token|pos_embed|patch_embed' -> 0, r'^blocks\\.(\\d+)' -> i + 1,
  r'^norm' -> the last block's depth (its ordinal MATCH_PREV_GROUP joins the previous group,
  models/_manipulate.py:77,125; what timm 1.0.31 computes, tests/test_model_options.py), anything
  else (head, fc_norm, attn_pool) -> layer_max = depth + 1."""
  import re

  if re.match(r'^cls_token|reg_token|pos_embed|patch_embed', timm_name):
    return 0
  if match := re.match(r'^blocks\.(\d+)', timm_name):
    return int(match.group(1)) + 1
  if re.match(r'^norm', timm_name):
    return depth
  return depth + 1


def _timm_name(ours: str) -> str:
  """Our (released-checkpoint) names -> timm's ViT names, as timm's npz loader maps them."""
  import re

  for pattern, repl in (
    (r'^embedding/', 'patch_embed.proj.'),
    (r'^cls$', 'cls_token'),
    (r'^Transformer/posembed_input/', 'pos_embed.'),
    (r'^Transformer/encoderblock_(\d+)/', r'blocks.\1.'),
    (r'^Transformer/encoder_norm/', 'norm.'),
    (r'^pre_logits/', 'head.pre_logits.'),
    (r'^head/', 'head.'),
  ):
    if re.match(pattern, ours):
      return re.sub(pattern, repl, ours)
  raise AssertionError(f'no timm name for {ours}')


def test_layer_decay_multipliers_are_timms():
  """Every parameter's lr multiplier is decay ** (layer_max - layer_id) (timm _param_groups.py:144,
  162-163), unscanned and scanned alike."""
  from vit_jax import models

  decay, depth = 0.75, 3
  trees = {}
  for scan in (False, True):
    model = models.abstract_model(
      'testing', 4, image_size=32, num_layers=depth, scan_layers=scan, representation_size=6
    )
    trees[scan] = models.params_of(model)
  flat = jax.tree_util.tree_flatten_with_path(trees[False])[0]
  mults = jax.tree.leaves(optim.layer_decay_multipliers(trees[False], decay))
  names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]
  assert len(names) == len(mults)
  for name, mult in zip(names, mults):
    want = decay ** (depth + 1 - _timm_layer_id(_timm_name(name), depth))
    assert float(mult) == pytest.approx(want, rel=1e-6), name
  scanned = optim.layer_decay_multipliers(trees[True], decay)
  block = scanned['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel']
  np.testing.assert_allclose(np.ravel(block), [decay**3, decay**2, decay**1], rtol=1e-6)
  assert float(scanned['cls']) == pytest.approx(decay**4)


@pytest.mark.parametrize('mode', ['decoupled', 'lr_scaled'])
def test_layer_decay_scales_the_lr_part_of_the_update(mode):
  """decoupled: p -= m(t) * (lr * mult * u + wd * p) (big_vision puts its lr_mults before the decay,
  optax.py:115-138); lr_scaled: p -= lr(t) * mult * (u + wd * p) (timm's groups scale the lr)."""
  params = {
    'Transformer': {
      'encoderblock_0': {'Dense_0': {'kernel': jnp.ones((2, 2))}},
      'encoderblock_1': {'Dense_0': {'kernel': jnp.ones((2, 2))}},
      'encoder_norm': {'scale': jnp.ones((2,))},
    },
    'embedding': {'kernel': jnp.ones((1, 1, 3, 2))},
    'head': {'kernel': jnp.ones((2, 2))},
  }
  base = dict(optimizer='adamw', warmup_steps=0, decay_type='constant', lr=0.01)
  base.update(weight_decay=0.1, weight_decay_mode=mode)
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  plain_tx, _ = optim.make_optimizer(_config(**base))
  tx, _ = optim.make_optimizer(_config(**base, layer_decay=0.5))
  plain, _ = plain_tx.update(grads, plain_tx.init(params), params)
  got, _ = tx.update(grads, tx.init(params), params)
  mults = {'encoderblock_0': 0.25, 'encoderblock_1': 0.5}
  for block, mult in mults.items():
    u = float(got['Transformer'][block]['Dense_0']['kernel'][0, 0])
    # Adam's first step is lr * 1; the decay adds wd * p (decoupled) or lr * wd * p (lr_scaled).
    want = -(0.01 * mult + 0.1) if mode == 'decoupled' else -0.01 * mult * (1 + 0.1)
    assert u == pytest.approx(want, rel=1e-5), block
  assert float(got['embedding']['kernel'].ravel()[0]) == pytest.approx(
    -(0.01 * 0.125 + 0.1) if mode == 'decoupled' else -0.01 * 0.125 * 1.1, rel=1e-5
  )
  np.testing.assert_allclose(got['head']['kernel'], plain['head']['kernel'])  # Multiplier 1.
  # The final norm goes with the last block (timm): its lr part is halved, its decay is not.
  norm, plain_norm = got['Transformer']['encoder_norm'], plain['Transformer']['encoder_norm']
  assert float(norm['scale'][0]) != pytest.approx(float(plain_norm['scale'][0]))
  with pytest.raises(ValueError, match='layer_decay=1.5 must be in'):
    optim.make_optimizer(_config(**base, layer_decay=1.5))
