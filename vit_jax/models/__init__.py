"""Model zoo: `get_model(name_or_config, num_classes, image_size=...)` -> a Flax NNX module."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vit_jax.models.mixer import MlpMixer
from vit_jax.models.registry import FAMILIES, MODEL_CONFIGS, model_family
from vit_jax.models.vit import Encoder, VisionTransformer

__all__ = [
  'FAMILIES',
  'MODEL_CONFIGS',
  'MlpMixer',
  'VisionTransformer',
  'abstract_model',
  'count_params',
  'get_model',
  'get_model_config',
  'model_family',
  'params_of',
]


def _fields(cls, *skip) -> set[str]:
  return set(inspect.signature(cls.__init__).parameters) - {'self', 'rngs', *skip}


_VIT_KEYS = _fields(VisionTransformer, 'image_size')
_MIXER_KEYS = _fields(MlpMixer, 'image_size')
_ENCODER_KEYS = _fields(
  Encoder, 'num_tokens', 'features', 'dtype', 'param_dtype', 'grid', 'num_registers'
)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """Returns a copy of a registered model config (original project schema)."""
  if name not in MODEL_CONFIGS:
    raise ValueError(
      f'unknown model {name!r}; registered models: {", ".join(sorted(MODEL_CONFIGS))}'
    )
  return ml_collections.ConfigDict(MODEL_CONFIGS[name].to_dict())


def _as_dict(config: Any) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  if isinstance(config, Mapping):
    return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
  raise TypeError(f'expected a model name, ConfigDict or dict, got {type(config).__name__}')


def model_kwargs(name_or_config, num_classes: int, **overrides) -> tuple[type, dict]:
  """The module class and its constructor arguments (without `rngs`) for `get_model`'s inputs."""
  is_name = isinstance(name_or_config, str)
  config = _as_dict(get_model_config(name_or_config) if is_name else name_or_config)
  # As in the original project, `model_name` is the variant's name; the family follows from it
  # (or from Mixer's fields when a config has no name).
  is_mixer = model_family(config) == 'mixer'
  name = config.pop('model_name', None)
  patches = config.pop('patches', None)
  if not isinstance(patches, Mapping) or 'size' not in patches:
    raise ValueError(f'model config {name!r} needs patches.size (got patches={patches!r})')
  if set(patches) - {'size'}:
    raise ValueError(
      f'model config {name!r}: only patches.size is supported, got {sorted(patches)}'
    )
  config['patches'] = tuple(patches['size'])

  if is_mixer:
    valid, cls = _MIXER_KEYS, MlpMixer
  else:
    valid, cls = _VIT_KEYS, VisionTransformer
    config['transformer'] = dict(config.get('transformer') or {})
    if config.get('resnet') is not None:
      config['resnet'] = dict(config['resnet'])

  for key, value in overrides.items():
    if key in valid:
      config[key] = value
    elif cls is VisionTransformer and key in _ENCODER_KEYS:
      config['transformer'][key] = value
    else:
      extra = sorted(_ENCODER_KEYS) if cls is VisionTransformer else []
      raise ValueError(
        f'unknown override {key!r} for {cls.__name__} {name!r}; valid: '
        f'{sorted(valid - {"num_classes", "model_name"}) + extra}'
      )
  if isinstance(config['patches'], Mapping):  # An override in the original {'size': ...} form.
    config['patches'] = tuple(config['patches']['size'])
  unknown = set(config) - valid
  if cls is VisionTransformer:
    unknown |= {f'transformer.{k}' for k in set(config['transformer']) - _ENCODER_KEYS}
  if unknown:
    raise ValueError(
      f'model config {name!r} has unknown keys {sorted(unknown)}; valid: {sorted(valid)}'
    )
  for key in ('dtype', 'param_dtype'):
    if key in config:
      config[key] = _DTYPES.get(config[key], config[key])  # 'bfloat16' -> jnp.bfloat16.
  return cls, dict(num_classes=num_classes, model_name=name, **config)


def get_model(
  name_or_config: str | Mapping | ml_collections.ConfigDict,
  num_classes: int,
  *,
  image_size: int | tuple[int, int] = 224,
  rngs: nnx.Rngs | None = None,
  **overrides,
) -> nnx.Module:
  """Builds a model from a registered name or an original-project model config.

  Args:
    name_or_config: a registered name (`'ViT-B_16'`, `'R50+ViT-B_16'`, `'Mixer-B_16'`, ...) or a
      config with the original project's fields (its `model_name` names the variant; names that
      start with 'Mixer', or configs with `hidden_dim`, build an MlpMixer).
    num_classes: size of the classification head; 0 returns pre-logits features.
    image_size: input resolution (int or (height, width)); sets the position-embedding grid.
    rngs: parameter (and dropout) randomness; `nnx.Rngs(0)` when None.
    **overrides: model fields (`dtype`, `param_dtype`, `classifier`, `representation_size`,
      `num_registers`, ...) or encoder fields (`dropout_rate`, `droppath_rate`, `scan_layers`,
      `remat_policy`, `posemb`, `layer_scale`, `qk_norm`, `patch_dropout`, ...).

  Returns:
    An initialized `VisionTransformer` or `MlpMixer` in evaluation mode (`model.train()` for
    dropout and stochastic depth).

  Raises:
    ValueError: unknown name, or a config/override key the model does not have.
  """
  cls, kwargs = model_kwargs(name_or_config, num_classes, **overrides)
  model = cls(**kwargs, image_size=image_size, rngs=nnx.Rngs(0) if rngs is None else rngs)
  model.eval()
  return model


def abstract_model(name_or_config, num_classes: int, *, image_size=224, **overrides) -> nnx.Module:
  """`get_model`'s module with `jax.ShapeDtypeStruct`s for arrays (`nnx.eval_shape`): shapes,
  dtypes and logical axis names, nothing allocated.
  """  # fmt: skip
  return nnx.eval_shape(
    lambda: get_model(name_or_config, num_classes, image_size=image_size, **overrides)
  )


def params_of(model: nnx.Module) -> dict:
  """The model's parameters as the released nested tree of arrays (`{'Transformer': ...}`)."""
  return nnx.state(model, nnx.Param).to_pure_dict()


def count_params(model_or_state) -> int:
  """Number of parameters of a model or a (possibly abstract) state."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model_or_state))


def logical_axes(model: nnx.Module) -> dict:
  """Each parameter's logical axis names (`('embed', 'mlp')`, ...), as the params tree."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  axes = {tuple(map(str, path)): v.get_metadata('logical_axes') for path, v in flat}
  return flax.traverse_util.unflatten_dict(axes)


def _concrete(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
  return jnp.zeros(x.shape, x.dtype)


def functional(model: nnx.Module):
  """Splits `model` (concrete or from `nnx.eval_shape`) once into graph and state; returns the
  pure function `apply(params, images, *, train=False, rng=None, attention=False,
  pre_logits=False)` of the released params tree (`params_of`), for `jax.jit`.

  `train`: dropout and stochastic depth drawn from `rng`. `attention`: returns (logits, the
  encoder blocks' attention weights [batch, heads, q, k] in depth order; unscanned ViTs).
  `pre_logits`: returns the head's input instead of the logits.
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  rest = jax.tree.map(_concrete, rest.to_pure_dict())  # Dropout rng streams; `rng` replaces them.

  def apply(params, images, *, train=False, rng=None, attention=False, pre_logits=False):
    module = nnx.merge(graphdef, params, rest)
    module.train() if train else module.eval()
    if pre_logits and hasattr(module, 'head'):
      del module.head
    if not attention:
      return module(images, rng=rng)
    module.set_attributes(sow_weights=True)
    logits = module(images, rng=rng)
    sown = nnx.pop(module, nnx.Intermediate).to_pure_dict()['Transformer']
    depth = module.Transformer.num_layers
    blocks = [sown[f'encoderblock_{i}']['MultiHeadDotProductAttention_1'] for i in range(depth)]
    return logits, [b['attention_weights'][0] for b in blocks]

  return apply
