"""Every recipe's optimizer update against its source's update rule, written out here.

For each recipe the optimizer is the one the recipe builds (`optim.make_optimizer(config)`) over
the parameter tree of the recipe's model (a small variant: the names, which decide the mask, are
the same). Its update is compared with the source's formula at the schedule's peak and at a later
step, for a zero gradient (the decay alone) and for a random one (the whole rule).

Sources:
- big_vision (github.com/google-research/big_vision @ 0127fb6) `big_vision/optax.py:75-149`
  `make`: chain(clip_by_global_norm(grad_clip_norm) [:100-107], scale_by_adam(**optax) [:110-111],
  scale(lr) [:115], add_decayed_weights(wd, mask '.*/kernel$') [:132-138],
  scale_by_schedule(m) [:89-91], scale(-1)); so

      p <- p - m(t) * (lr * adam(clip(g)) + wd * [p is a kernel] * p)

  `big_vision/utils.py:1102-1141` the multiplier m(t) (`base=1`, optax.py:85-88):
      progress = clip((t - warmup) / (total - warmup), 0, 1)
      cosine: 0.5 * (1 + cos(pi * progress)); linear: (1 - progress) * (1 - end) + end
      times min(1, t / warmup)
- optax.scale_by_adam (which big_vision names, vit_i1k.py:129): from a zero state at count t,
      mu = (1 - b1) g, nu = (1 - b2) g^2,
      adam(g) = mu / (1 - b1^(t+1)) / (sqrt(nu / (1 - b2^(t+1))) + eps)
- The ViT paper's upstream runs (Dosovitskiy et al. 2021, Table 3) used flax.optim.Adam, whose
  decay is relative to the learning rate (flax/optim/adam.py `apply_param_gradient`:
  `new_param -= learning_rate * weight_decay * param`): p <- p - lr(t) * (adam(g) + wd_paper * p).
- The original project's fine-tuning (github.com/google-research/vision_transformer @ c6de1e5)
  `vit_jax/train.py:138-145`: chain(clip_by_global_norm(1), sgd(lr_fn, momentum=0.9,
  accumulator_dtype='bfloat16')), no weight decay; first step from a zero trace:
      p <- p - lr(t) * clip(g)
  with lr(t) of `vit_jax/utils.py:78-94` (the same warmup and cosine as big_vision's, base = lr).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import config as config_lib
from vit_jax import models, optim
from vit_jax.configs import finetune, pretrain, quickstart


def _multiplier(t: int, config) -> float:
  """big_vision/utils.py:1113-1137 with base 1 (the same as the original's utils.py:82-92)."""
  warmup, total = config.warmup_steps, config.total_steps
  progress = min(max((t - warmup) / float(total - warmup), 0.0), 1.0)
  end = config.end_lr_factor
  if config.decay_type == 'cosine':
    m = end + (1 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
  else:
    m = end + (1.0 - end) * (1.0 - progress)
  return m * min(1.0, t / warmup) if warmup else m


def _at_step(opt_state, t: int):
  """Every optax `count` (the schedule's and Adam's) set to `t`: the state of step t with zero
  moments, so the update is a closed formula."""
  has_count = lambda x: hasattr(x, '_fields') and 'count' in x._fields
  fix = lambda x: x._replace(count=jnp.asarray(t, x.count.dtype)) if has_count(x) else x
  return jax.tree.map(fix, opt_state, is_leaf=has_count)


def _params(config, *, scan: bool = False):
  """Random parameters of the recipe's model family and head (a 2-layer, width-16 ViT)."""
  overrides = config_lib.model_kwargs(config)
  overrides.update(scan_layers=scan, remat_policy='none')
  if overrides.get('representation_size'):
    overrides['representation_size'] = 8
  if overrides.get('posemb') == 'sincos2d':  # recipe=plain: a width divisible by 4.
    overrides['hidden_size'] = 16
    if not _model_accepts_posemb():  # Issue 26 item 1 (branch mopt): until the model has it,
      del overrides['posemb']  # the learned embedding (not a kernel: never decayed) stands in.
  shapes = models.params_of(models.abstract_model('testing', 5, image_size=32, **overrides))
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, leaves)


def _model_accepts_posemb() -> bool:
  try:
    models.model_kwargs('ViT-Ti_16', 10, posemb='learn')
  except ValueError:
    return False
  return True


def _random_like(params, seed: int):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


def _names(params) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]


def _kernels(params):
  """big_vision's default decay mask, its regular expression applied to the '/'-joined names."""
  import re

  names = _names(params)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [bool(re.fullmatch(r'.*/kernel', n)) for n in names])


def _adam(g, t, config):
  b1, b2, eps = config.b1, config.b2, config.eps
  mu, nu = (1 - b1) * g, (1 - b2) * g * g
  return mu / (1 - b1 ** (t + 1)) / (jnp.sqrt(nu / (1 - b2 ** (t + 1))) + eps)


def _clip(grads, norm):
  total = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  return jax.tree.map(lambda g: g * jnp.minimum(1.0, norm / total), grads)


def _big_vision_update(params, grads, t, config, wd):
  """big_vision/optax.py:143-149 (see the module docstring)."""
  m = _multiplier(t, config)
  grads = _clip(grads, config.grad_clip_norm)
  return jax.tree.map(
    lambda p, g, k: -m * (config.lr * _adam(g, t, config) + (wd * p if k else 0.0)),
    params,
    grads,
    _kernels(params),
  )


def _flax_adam_update(params, grads, t, config, paper_wd):
  """flax/optim/adam.py (the ViT paper's optimizer): the decay relative to the lr."""
  lr_t = config.lr * _multiplier(t, config)
  grads = _clip(grads, config.grad_clip_norm)
  return jax.tree.map(
    lambda p, g, k: -lr_t * (_adam(g, t, config) + (paper_wd * p if k else 0.0)),
    params,
    grads,
    _kernels(params),
  )


def _ours(config, params, grads, t):
  tx, schedule = optim.make_optimizer(config)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])
  return update(grads, _at_step(tx.init(params), t), params), schedule


def _assert_trees_close(got, want, rtol=2e-5, atol=1e-9):
  for name, g, w in zip(_names(got), jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=name)


def _steps(config):
  """The peak (end of warmup) and a later step, 70% of the way through the decay."""
  return config.warmup_steps, config.warmup_steps + int(
    0.7 * (config.total_steps - config.warmup_steps)
  )


PRETRAIN = [
  'model=ViT-B_16,dataset=imagenet2012',
  'model=ViT-B_16,dataset=imagenet21k',
  'recipe=plain',  # big_vision configs/vit_s16_i1k.py:78-84: the same rule, wd 1e-4 (:83).
]


@pytest.mark.parametrize('arg', PRETRAIN)
def test_augreg_decay_per_step_is_big_visions(arg):
  """A zero gradient leaves the decay alone: each kernel shrinks by 1 - wd * m(t) (1e-4 at the
  peak, vit_i1k.py:140 / vit_i21k.py:96), nothing else moves."""
  config = pretrain.get_config(arg)
  params = _params(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for t in _steps(config):
    updates, _ = _ours(config, params, zeros, t)
    want = _big_vision_update(params, zeros, t, config, wd=1e-4)
    _assert_trees_close(updates, want)
    for name, u, p, k in zip(
      _names(params),
      jax.tree.leaves(updates),
      jax.tree.leaves(params),
      jax.tree.leaves(_kernels(params)),
    ):
      factor = 1 + np.asarray(u) / np.asarray(p)
      expected = 1 - 1e-4 * _multiplier(t, config) if k else 1.0
      np.testing.assert_allclose(factor, expected, rtol=0, atol=1e-7, err_msg=name)
  assert _multiplier(_steps(config)[0], config) == 1.0  # The peak: 1e-4 exactly.


@pytest.mark.parametrize('arg', PRETRAIN)
def test_augreg_update_for_a_gradient_is_big_visions(arg):
  config = pretrain.get_config(arg)
  params = _params(config)
  grads = _random_like(params, seed=2)
  for t in _steps(config):
    updates, schedule = _ours(config, params, grads, t)
    _assert_trees_close(updates, _big_vision_update(params, grads, t, config, wd=1e-4))
    assert float(schedule(t)) == pytest.approx(config.lr * _multiplier(t, config), rel=1e-5)


@pytest.mark.parametrize('arg', ['recipe=plain', 'model=ViT-B_16,dataset=imagenet2012'])
def test_adam_mu_is_stored_in_bfloat16_as_big_visions(arg):
  """vit_s16_i1k.py:80 (vit_i1k.py:130) `optax=dict(mu_dtype='bfloat16')`: scale_by_adam keeps its
  first moment in bfloat16 between steps. Two updates from step t: the second reads back the
  bfloat16 mu of the first,

      mu_2 = bf16(b1) * bf16((1 - b1) c_1) + (1 - b1) c_2,
      nu_2 = b2 (1 - b2) c_1^2 + (1 - b2) c_2^2,
      p <- p - m(t+1) * (lr * mu_2 / (1 - b1^(t+2)) / (sqrt(nu_2 / (1 - b2^(t+2))) + eps) + wd p)

  with c_i the clipped gradients. optax.tree.update_moment multiplies the stored bfloat16 mu by the
  Python float b1, which becomes a bfloat16 constant (0.8984375); under jit (big_vision's train step
  and ours) XLA on CPU, where this runs, computes that product in float32 (the bf16 -> f32
  conversion pair is folded away), so neither a float32 mu nor an eagerly rounded bfloat16
  product is what runs."""
  config = pretrain.get_config(arg)
  assert config.mu_dtype == 'bfloat16'
  params = _params(config)
  g1, g2 = _random_like(params, seed=4), _random_like(params, seed=5)
  tx, _ = optim.make_optimizer(config)
  t = config.warmup_steps
  step = jax.jit(tx.update)
  _, state1 = step(g1, _at_step(tx.init(params), t), params)
  mus = [x.mu for x in jax.tree.leaves(state1, is_leaf=lambda x: hasattr(x, 'mu'))
         if hasattr(x, 'mu')]  # fmt: skip
  assert mus and {x.dtype for x in jax.tree.leaves(mus)} == {jnp.dtype(jnp.bfloat16)}
  got, _ = step(g2, state1, params)
  b1, b2, eps = config.b1, config.b2, config.eps
  c1, c2 = _clip(g1, config.grad_clip_norm), _clip(g2, config.grad_clip_norm)
  m = _multiplier(t + 1, config)

  def want(mu_dtype):
    def one(p, a, b, k):
      stored = ((1 - b1) * a).astype(mu_dtype).astype(jnp.float32)  # Step 1's mu, stored.
      b1_ = float(jnp.asarray(b1, mu_dtype))  # b1 as a constant of the stored mu's dtype.
      mu = b1_ * stored + (1 - b1) * b
      nu = b2 * (1 - b2) * a * a + (1 - b2) * b * b
      adam = mu / (1 - b1 ** (t + 2)) / (jnp.sqrt(nu / (1 - b2 ** (t + 2))) + eps)
      return -m * (config.lr * adam + (config.weight_decay * p if k else 0.0))

    return jax.tree.map(one, params, c1, c2, _kernels(params))

  _assert_trees_close(got, want(jnp.bfloat16), rtol=1e-4, atol=1e-8)
  f32 = want(jnp.float32)
  assert not all(
    np.allclose(g, w, rtol=1e-4, atol=1e-8)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(f32))
  )


@pytest.mark.parametrize('dataset,paper_wd', [('imagenet2012', 0.3), ('imagenet21k', 0.03)])
def test_vit_paper_recipe_decays_as_the_papers_optimizer(dataset, paper_wd):
  """Table 3's weight decay is relative to the lr (flax.optim.Adam): per step 1 - wd * lr(t)."""
  config = pretrain.get_config(f'recipe=vit,dataset={dataset}')
  params = _params(config)
  grads = _random_like(params, seed=3)
  for t in _steps(config):
    updates, _ = _ours(config, params, grads, t)
    _assert_trees_close(updates, _flax_adam_update(params, grads, t, config, paper_wd))


@pytest.mark.parametrize('arg', ['model=ViT-B_16,dataset=cifar10', 'runlocal'])
def test_finetune_update_is_the_original_projects(arg):
  """vision_transformer train.py:138-145: clipped SGD, no decay; first step lr(t) * clip(g)."""
  config = finetune.get_config(arg)
  params = _params(config)
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params)  # Norm > 1: clipped.
  for t in _steps(config):
    updates, _ = _ours(config, params, grads, t)
    lr_t = config.lr * _multiplier(t, config)
    want = jax.tree.map(lambda g, lr_t=lr_t: -lr_t * g, _clip(grads, 1.0))
    # The trace is stored in bfloat16 (train.py:143), the first update reads it back.
    rtol = 1e-2 if config.mu_dtype == 'bfloat16' else 1e-5
    _assert_trees_close(updates, want, rtol=rtol)


def test_quickstart_decay_per_step():
  """Our own recipe, in our units: each kernel shrinks by 1 - weight_decay * m(t) per step
  (1e-4 at the peak: 0.05 x lr 2e-3, the torch/optax AdamW value it was tuned with)."""
  config = quickstart.get_config()
  params = _params(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for t in _steps(config):
    updates, _ = _ours(config, params, zeros, t)
    _assert_trees_close(updates, _big_vision_update(params, zeros, t, config, wd=1e-4))
  assert config.weight_decay == pytest.approx(0.05 * config.lr)


def test_lr_scaled_mode_is_torch_adamw():
  """`weight_decay_mode='lr_scaled'`: torch.optim.AdamW / optax.adamw, p -= lr(t) * wd * p."""
  config = quickstart.get_config().unlock()
  config.weight_decay, config.weight_decay_mode = 0.05, 'lr_scaled'
  params = _params(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  t = config.warmup_steps + 50
  updates, _ = _ours(config, params, zeros, t)
  lr_t = config.lr * _multiplier(t, config)
  want = jax.tree.map(lambda p, k: -lr_t * 0.05 * p if k else 0.0 * p, params, _kernels(params))
  _assert_trees_close(updates, want)


@pytest.mark.parametrize('arg', PRETRAIN + ['recipe=vit,dataset=imagenet2012'])
def test_decay_mask_is_kernels_by_name_scanned_or_not(arg):
  """big_vision's '.*/kernel$' (optax.py:133): every kernel (3-D attention, 4-D patch embedding,
  head) and no bias (the 2-D Q/K/V biases included), norm, position embedding or class token."""
  config = pretrain.get_config(arg)
  for scan in (False, True):
    params = _params(config, scan=scan)
    mask = optim.weight_decay_mask(params, config.wd_mask)
    got = dict(zip(_names(params), jax.tree.leaves(mask)))
    want = dict(zip(_names(params), jax.tree.leaves(_kernels(params))))
    assert got == want
    shapes = dict(zip(_names(params), (x.shape for x in jax.tree.leaves(params))))
    assert any(
      n.endswith('query/bias') and len(shapes[n]) == 2 + scan for n in got
    )  # Decayed before.
    assert not any(v for n, v in got.items() if n.endswith('bias'))
    assert got['embedding/kernel'] and got['head/kernel']


# --- the other "as published" semantics, each against its source's formula ----------------------


def test_sigmoid_xent_is_big_visions():
  """big_vision/utils.py:236-242: nll = -sum_c(y log s(x) + (1 - y) log s(-x)); mean over the
  batch (summed over classes, not averaged)."""
  from vit_jax import losses

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 7)).astype(np.float32) * 3
  labels = (rng.uniform(size=(4, 7)) < 0.3).astype(np.float32)
  log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  want = np.mean(-np.sum(labels * log_p + (1 - labels) * log_not_p, axis=-1))
  got = jnp.mean(losses.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), 'sigmoid_xent'))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  softmax = jnp.mean(
    losses.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), 'softmax_xent')
  )
  want = np.mean(-np.sum(labels * jax.nn.log_softmax(logits), axis=-1))  # utils.py:276-281
  np.testing.assert_allclose(softmax, want, rtol=1e-6)


def test_label_smoothing_is_szegedys():
  """Szegedy et al. 2016 (Inception v3) sec. 7, as optax.smooth_labels: (1 - s) * onehot + s / K."""
  from vit_jax import losses

  batch = {'label': jnp.asarray([0, 3, 2])}
  got = losses.targets(batch, 5, 0.1)
  want = 0.9 * np.eye(5)[[0, 3, 2]] + 0.1 / 5
  np.testing.assert_allclose(got, want, rtol=1e-6)
  import optax

  np.testing.assert_allclose(optax.smooth_labels(jnp.eye(5)[jnp.asarray([0, 3, 2])], 0.1), want)


def test_head_init_is_big_visions():
  """big_vision train.py:201-203 fills the head bias with `init_head_bias` (vit_i1k.py:72: -6.9);
  big_vision models/vit.py head_zeroinit=True: the head kernel starts at zero."""
  config = pretrain.get_config('model=ViT-B_16,dataset=imagenet2012')
  overrides = {**config_lib.model_kwargs(config), 'representation_size': 8}
  params = models.params_of(models.get_model('testing', 5, image_size=32, **overrides))
  np.testing.assert_array_equal(params['head']['bias'], np.full((5,), -6.9, np.float32))
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)


def test_mixup_is_big_visions():
  """big_vision utils.py:1146-1155 `get_mixup`: a ~ Beta(p, p), a = max(a, 1 - a), every array
  mixed as a * x + (1 - a) * roll(x, 1, axis=0): images and labels with the same a."""
  from vit_jax.data import device

  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
  labels = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
  for seed in range(5):
    key = jax.random.key(seed)
    got_images, got_labels = device.mixup(key, images, labels, p=0.5)
    # Our draw (data/device.py mixup_params): the salted key's first split feeds the Beta.
    r = float(
      jax.random.beta(jax.random.split(jax.random.fold_in(key, device._MIXUP_SALT), 4)[0], 0.5, 0.5)
    )
    a = max(r, 1.0 - r)
    np.testing.assert_allclose(got_images, a * images + (1 - a) * np.roll(images, 1, 0), atol=1e-6)
    np.testing.assert_allclose(got_labels, a * labels + (1 - a) * np.roll(labels, 1, 0), atol=1e-6)
