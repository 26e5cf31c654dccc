"""Weight EMA (`config.ema_decay`, vit_jax.ema): the decay is timm's ModelEmaV3's; a run's EMA is
the EMA recomputed from its parameters after each step; resume (in-process and after SIGKILL) and
the 8-device sharded run give the same EMA; evaluators report it; predict and export pick it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import config as config_lib
from vit_jax import ema, resume, train
from vit_jax.configs import quickstart


def _timm_decay(step, decay, use_warmup, gamma=1.0, power=2 / 3):
  """pytorch-image-models timm/utils/model_ema.py:188-205 `ModelEmaV3.get_decay`, verbatim
  (update_after_step=0, min_decay=0); timm's train.py:1391-1393 passes the update count."""
  step = max(0, step - 0 - 1)
  if step <= 0:
    return 0.0
  if use_warmup:
    d = 1 - (1 + step / gamma) ** -power
    return max(min(d, decay), 0.0)
  return decay


@pytest.mark.parametrize('warmup', [False, True])
def test_decay_is_timms_model_ema_v3(warmup):
  config = {
    'ema_decay': 0.999,
    'ema_warmup': warmup,
    'ema_warmup_gamma': 1.0,
    'ema_warmup_power': 2 / 3,
  }
  counts = [1, 2, 3, 10, 1000, 31_623, 10**6]
  got = [float(ema.decay(n, config)) for n in counts]
  want = [_timm_decay(n, 0.999, warmup) for n in counts]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == 0.0  # The first update copies the params.
  if warmup:  # model_ema.py:143-144: power 2/3 reaches 0.999 at 31.6k steps.
    assert got[-2] == pytest.approx(0.999, abs=1e-6) and got[3] < 0.9
  gamma = dict(config, ema_warmup=True, ema_warmup_gamma=10.0, ema_warmup_power=0.75)
  assert float(ema.decay(50, gamma)) == pytest.approx(
    _timm_decay(50, 0.999, True, 10.0, 0.75), rel=1e-6
  )


def test_config_checks_name_the_flag():
  for field, value, match in [
    ('ema_decay', 1.0, r'ema_decay=1.0 must be in \[0, 1\).*--config.ema_decay='),
    ('ema_decay', -0.1, '--config.ema_decay='),
    ('ema_warmup', True, 'ema_warmup=True does nothing with ema_decay=0.*--config.ema_decay='),
  ]:
    c = quickstart.get_config('runlocal').unlock()
    c[field] = value
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(c, environment=False)
  c = quickstart.get_config('runlocal').unlock()
  c.ema_decay, c.ema_warmup_power = 0.99, 0.0
  with pytest.raises(config_lib.ConfigError, match='--config.ema_warmup_power='):
    config_lib.validate(c, environment=False)


def test_resume_refuses_turning_the_ema_on_or_off_and_states_a_new_decay():
  base = dict(config_lib.base_config().to_dict(), num_classes=10)
  on = dict(base, ema_decay=0.99)
  refused, _ = resume.compare(base, on)
  assert refused == ['ema_decay 0.0 -> 0.99 (turns the weight EMA on)']
  refused, _ = resume.compare(on, base)
  assert refused == ['ema_decay 0.99 -> 0.0 (turns the weight EMA off)']
  old = {k: v for k, v in base.items() if not k.startswith('ema_')}  # Before the field existed.
  assert resume.compare(old, base)[0] == []
  assert resume.compare(old, on)[0] == ["ema_decay '<absent>' -> 0.99 (turns the weight EMA on)"]
  refused, stated = resume.compare(on, dict(on, ema_decay=0.999))
  assert refused == [] and stated == ['ema_decay 0.99 -> 0.999']


def _config(**fields):
  c = config_lib.base_config()
  c.model_name = 'testing'
  c.model = ml_collections.ConfigDict({'patches': (4, 4), 'dropout_rate': 0.0})
  c.image_size = 16
  c.optimizer = 'adamw'
  c.lr = 0.01
  c.weight_decay = 1e-3
  c.warmup_steps = 2
  c.total_steps = 6
  c.batch_size = 16
  c.ema_decay = 0.9
  c.ema_warmup = True
  c.ema_warmup_power = 0.75
  c.update(fields)
  return c


def _batches(n):
  rng = np.random.default_rng(0)
  return [
    {
      'image': rng.uniform(-1, 1, (1, 16, 16, 16, 3)).astype(np.float32),
      'label': rng.integers(0, 10, (1, 16)).astype(np.int32),
    }
    for _ in range(n)
  ]


def _run(trainer, batches):
  """Steps the trainer; returns the initial params, the params and EMA after each step."""
  state = trainer.init_state(0)
  rng = jax.random.key_data(jax.random.key(1))
  host = lambda t: jax.tree.map(lambda x: np.array(x, copy=True), t)
  init, params, emas = host(state['params']), [], []
  np.testing.assert_array_equal(  # The EMA starts as the params.
    jax.tree.leaves(init)[0], jax.tree.leaves(host(state['ema']))[0]
  )
  for local in batches:
    state, _ = trainer.train_step(state, trainer.global_batch(local, stacked=True), rng)
    params.append(host(state['params']))
    emas.append(host(state['ema']))
  return init, params, emas


def test_ema_is_the_ema_of_the_logged_params():
  config = _config()
  trainer = train.Trainer(config, num_classes=10, devices=jax.devices()[:1])
  init, params, emas = _run(trainer, _batches(6))
  want = jax.tree.map(lambda x: x.astype(np.float32), init)
  for n, (p, got) in enumerate(zip(params, emas), start=1):
    d = np.float32(_timm_decay(n, 0.9, True, 1.0, 0.75))
    want = jax.tree.map(lambda e, x, d=d: d * e + (np.float32(1) - d) * x, want, p)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
  # Not the params themselves: after the first step (a copy) the EMA lags them.
  assert np.array_equal(jax.tree.leaves(emas[0])[0], jax.tree.leaves(params[0])[0])
  assert not np.allclose(emas[-1]['head']['bias'], params[-1]['head']['bias'])


def test_pretrained_params_start_the_ema_in_float32():
  config = _config()
  config.model.param_dtype = 'bfloat16'
  trainer = train.Trainer(config, num_classes=10, devices=jax.devices()[:1])
  state = trainer.init_state(0)
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {np.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state['ema'])} == {np.dtype(np.float32)}
  new = jax.tree.map(lambda x: np.asarray(x) + 1.0, trainer.host_params(state))
  state = trainer.with_params(state, new)
  jax.tree.map(np.testing.assert_array_equal, trainer.host_params({'params': state['ema']}), new)


def test_sharded_ema_equals_one_device():
  """FSDP 2 x tensor 4 over 8 devices (tests/test_sharding.py's layouts): the EMA is sharded as
  the params and equals the one-device run's (SGD: Adam would turn float noise in exactly-zero
  gradients into full-size steps, see test_sharding.py)."""
  batches = _batches(3)
  tiny = dict(
    model=ml_collections.ConfigDict(
      {'hidden_size': 16, 'mlp_dim': 32, 'num_heads': 4, 'num_layers': 2, 'patches': (4, 4),
       'dropout_rate': 0.0}
    ),
    optimizer='sgd', lr=0.1, weight_decay=0.0,
  )  # fmt: skip
  one = train.Trainer(_config(**tiny), num_classes=10, devices=jax.devices()[:1])
  config = _config(**tiny)
  config.mesh.update(data=1, fsdp=2, tensor=4)
  eight = train.Trainer(config, num_classes=10)
  assert eight.state_shardings['ema'] == eight.state_shardings['params']  # Sharded alike.
  kernel = eight.state_shardings['ema']['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']
  assert kernel['kernel'].shard_shape((16, 32)) == (8, 8)
  _, params1, ema1 = _run(one, batches)
  _, params8, ema8 = _run(eight, batches)
  for a, b in zip(jax.tree.leaves(ema1[-1]), jax.tree.leaves(ema8[-1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not np.allclose(ema8[-1]['head']['kernel'], params8[-1]['head']['kernel'])
