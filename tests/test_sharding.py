"""Mesh construction, logical-axis rules, global batches, and DP == FSDP == FSDP x tensor."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import config as config_lib
from vit_jax import sharding, train


def test_make_mesh_sizes():
  assert dict(sharding.make_mesh({'data': -1}).shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 4})
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 2, 'tensor': 4}
  assert dict(sharding.make_mesh({'data': 1}, jax.devices()[:1]).shape)['data'] == 1
  with pytest.raises(ValueError, match='needs 4 devices but 8'):
    sharding.make_mesh({'data': 4})
  with pytest.raises(ValueError, match='cannot be split'):
    sharding.make_mesh({'data': -1, 'tensor': 3})
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})


def test_make_mesh_dcn_slices():
  # 2 "slices" of 4 devices along data: each slice's devices stay together on the inner axes.
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1, 'dcn_data': 2})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0]
  np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [4, 5, 6, 7]])
  with pytest.raises(ValueError, match='not divisible by its 3 DCN slices'):
    sharding.make_mesh({'data': 2, 'fsdp': 4, 'dcn_data': 3})


def test_rules_map_params_and_activations():
  rules = sharding.DEFAULT_RULES
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), rules) == P('fsdp', 'tensor')
  assert nn.logical_to_mesh_axes(('embed', 'heads', 'kv'), rules) == P('fsdp', 'tensor', None)
  # An activation never uses 'fsdp' twice: batch takes it, embed stays whole.
  act = nn.logical_to_mesh_axes(('batch', 'seq', 'embed'), rules)
  assert act == P(('data', 'fsdp'), None, None)
  # Names the rules do not know are replicated, not an error.
  assert nn.logical_to_mesh_axes(('unknown_axis', 'embed'), rules) == P(None, 'fsdp')


def test_logical_rules_from_config_are_validated():
  config = ml_collections.ConfigDict({'logical_rules': (('embed', 'tensor'),)})
  assert sharding.logical_rules(config) == (('embed', 'tensor'),)
  config = ml_collections.ConfigDict({'logical_rules': (('embed', 'model'),)})
  with pytest.raises(ValueError, match='unknown mesh axes'):
    sharding.logical_rules(config)


def test_logical_shardings_replicate_indivisible_dims():
  from vit_jax import models

  model = models.abstract_model('testing', 10, image_size=32)  # hidden 10: not divisible by 4.
  boxed = sharding.box(models.params_of(model), models.logical_axes(model))
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
  mlp = shardings['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
  assert mlp.spec == P(None, 'tensor')  # embed=10 % 4 != 0 -> replicated; mlp=10 % 2 == 0.
  query = shardings['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['query']
  assert query['kernel'].spec == P(None, 'tensor', None)  # 2 heads over tensor=2.


def test_global_batch_from_process_local_data():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  local = {
    'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
    'label': np.arange(16, dtype=np.int32),
  }
  batch = sharding.global_batch(local, mesh, sharding.DEFAULT_RULES)
  assert batch['image'].shape == (16, 3)
  assert batch['image'].sharding.spec == P(('data', 'fsdp'))
  assert len(batch['label'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])


def _tiny_config(options=None, **mesh):
  c = config_lib.base_config()
  c.model_name = 'testing'
  c.model = ml_collections.ConfigDict(
    {
      'hidden_size': 16,
      'mlp_dim': 32,
      'num_heads': 4,
      'num_layers': 2,
      'patches': (4, 4),
      'dropout_rate': 0.0,
    }
  )
  c.model.update(options or {})
  c.image_size = 16
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 5
  # SGD: Adam would turn float noise in exactly-zero gradients (the attention key bias) into
  # full-size steps of random sign, hiding real differences between layouts behind its own.
  c.optimizer = 'sgd'
  c.lr = 0.1
  c.warmup_steps = 1
  c.mesh.update(mesh)
  return c


def _run_steps(config, devices, batches):
  trainer = train.Trainer(config, num_classes=10, devices=devices)
  state = trainer.init_state(0)
  rng = jax.random.key_data(jax.random.key(0))
  losses = []
  for local in batches:
    state, metrics = trainer.train_step(state, trainer.global_batch(local, stacked=True), rng)
    losses.append(float(metrics['train/loss']))
  return trainer, losses, jax.tree.map(np.asarray, state['params'])


# Every model option of docs/models.md at once (patch dropout draws the same patches on any mesh).
_OPTIONS = {
  'posemb': 'sincos2d',
  'num_registers': 2,
  'layer_scale': 0.5,
  'qk_norm': True,
  'patch_dropout': 0.25,
}


@pytest.mark.parametrize('options', [None, _OPTIONS], ids=['released', 'options'])
def test_dp_fsdp_tensor_parallel_are_equivalent(options):
  """One device vs 8-way DP vs 8-way FSDP vs FSDP 2 x tensor 4: same losses and params."""
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.uniform(-1, 1, (1, 16, 16, 16, 3)).astype(np.float32),
    'label': rng.integers(0, 10, (1, 16)).astype(np.int32),
  }
  batches = [batch] * 5  # The same batch: the loss must fall as it is memorized.
  runs = {
    'single': ({'data': 1}, jax.devices()[:1]),
    'dp8': ({'data': 8}, None),
    'fsdp8': ({'data': 1, 'fsdp': 8}, None),
    'fsdp2_tp4': ({'data': 1, 'fsdp': 2, 'tensor': 4}, None),
  }
  results = {}
  for name, (mesh, devices) in runs.items():
    results[name] = _run_steps(_tiny_config(options, **mesh), devices, batches)
  # The parallel layouts really are different: FSDP shards kernels over fsdp, TP over tensor.
  kernel = lambda t: t.state_shardings['params']['Transformer']['encoderblock_0']['MlpBlock_3'][
    'Dense_0'
  ]['kernel'].shard_shape((16, 32))
  assert kernel(results['dp8'][0]) == (16, 32)
  assert kernel(results['fsdp8'][0]) == (2, 32)
  assert kernel(results['fsdp2_tp4'][0]) == (8, 8)
  _, ref_losses, ref_params = results['single']
  assert ref_losses[-1] < ref_losses[0]  # It trains.
  for name in ('dp8', 'fsdp8', 'fsdp2_tp4'):
    _, losses, params = results[name]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
    jax.tree.map(
      lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name),
      params,
      ref_params,
    )
