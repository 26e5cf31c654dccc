"""Model zoo (Flax NNX): published parameter counts, config compatibility, layouts and numerics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vit_jax import models, npz

# Published counts (1000 classes, 224x224), from the original project's model tables.
# ViT-g/14 and ViT-G/14 (Zhai et al. 2021) are computed here, see docs/models.md: the paper's 1011M
# and 1843M round the same architecture (token classifier, no representation layer).
PINNED_COUNTS = {
  'ViT-Ti_16': 5_717_416,
  'ViT-S_16': 22_050_664,
  'ViT-S_32': 22_878_952,
  'ViT-B_16': 86_567_656,
  'ViT-B_32': 88_224_232,
  'ViT-B_8': 86_576_872,
  'ViT-L_16': 304_326_632,
  'ViT-L_32': 306_535_400,
  'ViT-H_14': 632_045_800,
  'ViT-g_14': 1_012_611_432,
  'ViT-G_14': 1_844_440_680,
  'ViT-S_16-gap-norep': 22_049_896,
  'ViT-S_32-gap-norep': 22_878_184,
  'ViT-B_16-gap-norep': 86_566_120,
  'ViT-B_32-gap-norep': 88_222_696,
  'R+ViT-Ti_16': 6_337_704,
  'R26+ViT-S_32': 36_431_912,
  'R26+ViT-B_32': 101_383_976,
  'R50+ViT-B_16': 98_659_112,
  'R50+ViT-L_32': 328_994_856,
  'Mixer-B_16': 59_880_472,
  'Mixer-B_32': 60_293_428,
  'Mixer-L_16': 208_196_168,
  'testing': 21_390,
  'testing-unpooled': 21_370,
  # Not published: the quickstart's model, counted by hand. Patch embedding 4*4*3*64 + 64 = 3,136;
  # class token 64; 56*56 + 1 position embeddings of 64: 200,768; per block 2 LayerNorms 256 +
  # Q/K/V/out 4*(64*64 + 64) 16,640 + MLP (64*128 + 128) + (128*64 + 64) 16,576 = 33,472, x4 =
  # 133,888; final LayerNorm 128; head 64*1000 + 1000 = 65,000.
  'ViT-Quick': 402_984,
}


def test_every_registered_model_has_a_pinned_count():
  assert set(models.MODEL_CONFIGS) == set(PINNED_COUNTS), (
    'pin the parameter count of every registered model in PINNED_COUNTS'
  )


@pytest.mark.parametrize('name', sorted(PINNED_COUNTS))
def test_published_parameter_count(name):
  assert models.count_params(models.abstract_model(name, 1000)) == PINNED_COUNTS[name]


def test_scaling_paper_counts_round_to_published_millions():
  # "Scaling Vision Transformers", Table 2: ViT-g/14 1011M, ViT-G/14 1843M (head excluded there:
  # our counts include a 1000-class head, 1.4M/1.7M parameters).
  for name, millions in (('ViT-g_14', 1011), ('ViT-G_14', 1843)):
    body = models.count_params(models.abstract_model(name, 0))
    assert round(body / 1e6) == millions


def _original_schema_b16():
  # A config exactly as the original project writes it (configs/models.py there).
  config = ml_collections.ConfigDict()
  config.model_name = 'ViT-B_16'
  config.patches = ml_collections.ConfigDict({'size': (16, 16)})
  config.hidden_size = 768
  config.transformer = ml_collections.ConfigDict()
  config.transformer.mlp_dim = 3072
  config.transformer.num_heads = 12
  config.transformer.num_layers = 12
  config.transformer.attention_dropout_rate = 0.0
  config.transformer.dropout_rate = 0.0
  config.classifier = 'token'
  config.representation_size = None
  return config


def test_original_schema_config_builds_same_model():
  from_config = models.abstract_model(_original_schema_b16(), 1000)
  assert models.count_params(from_config) == PINNED_COUNTS['ViT-B_16']
  as_dict = models.abstract_model(_original_schema_b16().to_dict(), 1000)
  assert nnx.graphdef(as_dict) == nnx.graphdef(from_config)
  assert models.get_model_config('ViT-B_16').to_dict() == _original_schema_b16().to_dict()


def test_registry_follows_the_original_schema():
  for name, config in models.MODEL_CONFIGS.items():
    assert config.model_name == name
    assert 'name' not in config
  # The original project's dropout defaults (training only).
  assert models.get_model_config('ViT-L_16').transformer.dropout_rate == 0.1
  assert models.get_model_config('ViT-L_32').transformer.dropout_rate == 0.0
  assert models.get_model_config('testing').transformer.dropout_rate == 0.1
  mixer = models.get_model_config('Mixer-B_16').to_dict()
  assert mixer == {
    'model_name': 'Mixer-B_16',
    'patches': {'size': (16, 16)},
    'hidden_dim': 768,
    'num_blocks': 12,
    'tokens_mlp_dim': 384,
    'channels_mlp_dim': 3072,
  }
  assert isinstance(models.abstract_model(mixer, 10), models.MlpMixer)
  hybrid = models.abstract_model(models.get_model_config('R50+ViT-B_16'), 10)
  assert hybrid.model_name == 'R50+ViT-B_16' and hybrid.resnet['num_layers'] == (3, 4, 9)


def test_public_api_builds_an_initialized_module_in_eval_mode():
  model = models.get_model('testing', num_classes=3)
  assert isinstance(model, nnx.Module) and model.deterministic
  x = jnp.zeros((2, 224, 224, 3))
  assert model(x).shape == (2, 3) and model(x).dtype == jnp.float32
  same = models.get_model('testing', num_classes=3)  # nnx.Rngs(0) when rngs is None.
  jax.tree.map(np.testing.assert_array_equal, models.params_of(model), models.params_of(same))
  other = models.get_model('testing', num_classes=3, rngs=nnx.Rngs(1))
  assert not np.array_equal(other.embedding.kernel[...], model.embedding.kernel[...])
  small = models.get_model('testing', num_classes=3, image_size=32)
  assert small.Transformer.posembed_input.pos_embedding.shape == (1, 5, 10)
  model.train()
  assert not model.deterministic
  with pytest.raises(ValueError, match='built for'):
    small(x)


def test_bad_names_and_keys_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown model 'ViT-X_16'.*ViT-B_16"):
    models.get_model('ViT-X_16', num_classes=10)
  config = _original_schema_b16()
  config.transformer.mlp_dimm = 5
  with pytest.raises(ValueError, match=r'transformer\.mlp_dimm'):
    models.get_model(config, num_classes=10)
  with pytest.raises(ValueError, match="unknown override 'dropout'"):
    models.get_model('testing', num_classes=10, dropout=0.1)
  with pytest.raises(ValueError, match='unknown classifier'):
    models.get_model('testing', num_classes=10, classifier='cls', image_size=32)
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    models.get_model('testing', num_classes=10, image_size=30)


@pytest.mark.parametrize(
  'classifier,shape',
  [
    ('token', (2, 7)),
    ('gap', (2, 7)),
    ('map', (2, 7)),
    ('unpooled', (2, 4, 7)),
    ('token_unpooled', (2, 5, 7)),
  ],
)
def test_classifiers(classifier, shape):
  model = models.get_model(
    'testing', num_classes=7, classifier=classifier, head_zero_init=False, image_size=32
  )
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  logits = model(x)
  assert logits.shape == shape and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.std(logits) > 0


def test_every_family_runs_and_names_parameters_like_the_release():
  x = jnp.zeros((1, 64, 64, 3))
  hybrid = models.get_model(
    'R26+ViT-S_32',
    num_classes=3,
    image_size=64,
    hidden_size=32,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=1),
  )
  keys = set(npz.to_released_layout(hybrid))
  # Names of the released R26+ViT/R50+ViT files (original project's models_resnet.py).
  for key in (
    'conv_root/kernel',
    'gn_root/scale',
    'gn_root/bias',
    'block1/unit1/conv_proj/kernel',
    'block1/unit1/gn_proj/scale',
    'block1/unit2/conv3/kernel',
    'block4/unit2/gn3/bias',
    'embedding/kernel',
    'cls',
    'Transformer/posembed_input/pos_embedding',
    'head/kernel',
  ):
    assert key in keys, key
  assert nnx.jit(lambda m, x: m(x))(hybrid, x).shape == (1, 3)
  mixer = models.get_model(
    'Mixer-B_32',
    num_classes=3,
    image_size=64,
    hidden_dim=16,
    num_blocks=2,
    tokens_mlp_dim=8,
    channels_mlp_dim=8,
  )
  params = models.params_of(mixer)
  assert {'stem', 'MixerBlock_0', 'MixerBlock_1', 'pre_head_layer_norm', 'head'} == set(params)
  assert set(params['MixerBlock_0']) == {
    'LayerNorm_0',
    'token_mixing',
    'LayerNorm_1',
    'channel_mixing',
  }
  assert mixer(x).shape == (1, 3)


def _small(**overrides):
  return models.get_model(
    'testing',
    num_classes=5,
    image_size=32,
    hidden_size=16,
    head_zero_init=False,
    transformer=dict(mlp_dim=24, num_heads=2, num_layers=3),
    **overrides,
  )


def test_scan_and_remat_match_the_unrolled_model():
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  base = _small()
  apply, params = models.functional(base), models.params_of(base)
  ref = apply(params, x)
  ref_grads = jax.jit(jax.grad(lambda p: apply(p, x).sum()))(params)
  for overrides in (
    {'scan_layers': True},
    {'remat_policy': 'full'},
    {'scan_layers': True, 'remat_policy': 'dots_with_no_batch_dims_saveable'},
  ):
    model = _small(**overrides)
    npz.load_into(model, params)  # Stacks the blocks for the scanned model.
    p = models.params_of(model)
    want_p = npz.scan_params(params) if overrides.get('scan_layers') else params
    jax.tree.map(np.testing.assert_array_equal, p, want_p)
    f = models.functional(model)
    np.testing.assert_allclose(
      jax.jit(f)(p, x),
      ref,
      atol=1e-5,  # float32 noise between the jitted and eager programs (seen 1.1e-6).
    )
    grads = jax.jit(jax.grad(lambda p, f=f: f(p, x).sum()))(p)
    want = npz.scan_params(ref_grads) if overrides.get('scan_layers') else ref_grads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, want)
  assert npz.unscan_params(npz.scan_params(params)).keys() == params.keys()


def test_dropout_and_stochastic_depth_only_in_training():
  model = _small(dropout_rate=0.1, attention_dropout_rate=0.1, droppath_rate=0.2)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  f, params = models.functional(model), models.params_of(model)
  apply = jax.jit(
    lambda train, seed: f(params, x, train=train, rng=jax.random.key(seed)), static_argnums=0
  )
  run = lambda train, seed: np.asarray(apply(train, seed))
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  np.testing.assert_array_equal(run(True, 0), run(True, 0))
  assert not np.allclose(run(True, 0), run(True, 1))
  assert not np.allclose(run(True, 0), run(False, 0))
  # The module API: model.train() draws from its own rngs, model.eval() is deterministic.
  model.train()
  assert not np.allclose(model(x), model(x))
  model.eval()
  np.testing.assert_allclose(model(x), run(False, 0), atol=1e-5)  # Eager vs jitted: float noise.


def test_scanned_stochastic_depth_uses_the_unscanned_per_layer_rates(monkeypatch):
  """scan_layers is a memory knob: the drop-path rate of each layer must not change with it."""
  from vit_jax.models import vit

  seen = []
  drop_path = vit.drop_path

  def recording(x, rate, rng):  # Rates as the blocks apply them (traced inside the scan).
    if rng is not None:
      jax.debug.callback(lambda r: seen.append(round(float(r), 6)), rate)
    return drop_path(x, rate, rng)

  monkeypatch.setattr(vit, 'drop_path', recording)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  rates = {}
  for overrides in ({}, {'scan_layers': True}, {'scan_layers': True, 'remat_policy': 'full'}):
    model = _small(droppath_rate=0.4, **overrides)
    seen.clear()
    out = models.functional(model)(models.params_of(model), x, train=True, rng=jax.random.key(2))
    jax.block_until_ready(out)
    jax.effects_barrier()
    # Two branches (attention, MLP) per block; rate 0 drops nothing, whether applied or skipped.
    rates[str(overrides)] = sorted(r for r in seen if r > 0)
  assert rates['{}'] == [0.2, 0.2, 0.4, 0.4]  # Linear in depth: 0, 0.2, 0.4 over 3 layers.
  assert all(r == rates['{}'] for r in rates.values()), rates


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _small(dtype='bfloat16')
  params = models.params_of(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  low = model(x)
  high = models.functional(_small())(params, x)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, atol=0.05, rtol=0.05)


def test_parameters_and_activations_carry_logical_axis_names():
  axes = models.logical_axes(models.abstract_model('testing', 5, image_size=32))
  block = axes['Transformer']['encoderblock_0']
  assert block['MultiHeadDotProductAttention_1']['query']['kernel'] == ('embed', 'heads', 'kv')
  assert block['MultiHeadDotProductAttention_1']['out']['kernel'] == ('heads', 'kv', 'embed')
  assert block['MlpBlock_3']['Dense_0']['kernel'] == ('embed', 'mlp')
  assert axes['head']['kernel'] == ('embed', 'classes')
  scanned = models.logical_axes(
    models.abstract_model('testing', 5, image_size=32, scan_layers=True)
  )
  stacked = scanned['Transformer']['encoderblock']
  assert stacked['MlpBlock_3']['Dense_0']['kernel'] == ('layers', 'embed', 'mlp')
  params = models.params_of(models.abstract_model('testing', 5, image_size=32))
  assert jax.tree.structure(params) == jax.tree.structure(
    jax.tree.map(lambda x: 0, axes, is_leaf=lambda x: isinstance(x, tuple))
  )


def test_no_model_module_looks_at_the_backend():
  import pathlib

  import vit_jax.models as package

  for path in pathlib.Path(package.__file__).parent.glob('*.py'):
    text = path.read_text()
    assert 'default_backend' not in text and 'platform' not in text, path


def test_fused_attention_padding_equals_unpadded_values_and_grads():
  """The padding used for cuDNN (197 tokens -> 256, masked by sequence lengths) changes nothing."""
  from vit_jax.models.vit import fused_attention

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 197, 3, 16)), jnp.float32) for _ in range(3))
  plain = lambda q, k, v: fused_attention(q, k, v, 'xla')
  padded = lambda q, k, v: fused_attention(q, k, v, 'xla', pad_to=64)
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for a, b in zip(
    jax.grad(loss(padded), (0, 1, 2))(q, k, v), jax.grad(loss(plain), (0, 1, 2))(q, k, v)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_class_token_head_computes_only_the_first_token_in_the_last_block():
  """Under a class-token head the last block computes only the first token's output: the same
  logits and gradients (parameters and images) as the encoder run over all tokens, to float
  noise; fewer matmul FLOPs. Sowing attention weights runs all tokens.
  """  # fmt: skip
  model = _small()
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  f, params = models.functional(model), models.params_of(model)
  all_tokens = models.functional(_small(classifier='token_unpooled'))

  def run(apply):
    loss = lambda p, x: jnp.sum(jnp.sin(apply(p, x)))
    grads = jax.grad(loss, (0, 1))(params, x)
    flops = jax.jit(apply).lower(params, x).compile().cost_analysis()['flops']
    return apply(params, x), grads, flops

  logits, grads, flops = run(f)
  ref_logits, ref_grads, ref_flops = run(lambda p, x, **kw: all_tokens(p, x, **kw)[:, 0])
  assert flops < 0.95 * ref_flops  # The last block's other 4 tokens are not computed.
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)
  ):
    scale = float(jnp.abs(b).max())
    if "'key']['bias']" in jax.tree_util.keystr(path):  # Zero in exact arithmetic.
      assert float(jnp.abs(a).max()) < 1e-5 and scale < 1e-5
    else:
      assert scale > 0, jax.tree_util.keystr(path)
      np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)
      )
  # Attention weights asked for: all tokens run, the last layer's attention covers every query.
  _, weights = f(params, x, attention=True)
  assert len(weights) == 3 and weights[-1].shape == (2, 2, 5, 5)  # 4 patches and the class token.
