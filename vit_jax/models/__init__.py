"""Model zoo: `get_model(name_or_config, num_classes=...)` -> flax.linen Module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models.mixer import MlpMixer
from vit_jax.models.registry import FAMILIES, MODEL_CONFIGS, model_family
from vit_jax.models.vit import Encoder, VisionTransformer

__all__ = [
  'FAMILIES',
  'MODEL_CONFIGS',
  'MlpMixer',
  'VisionTransformer',
  'count_params',
  'get_model',
  'get_model_config',
  'init_params',
  'model_family',
]

_VIT_KEYS = {f.name for f in dataclasses.fields(VisionTransformer)} - {'parent', 'name'}
_MIXER_KEYS = {f.name for f in dataclasses.fields(MlpMixer)} - {'parent', 'name'}
_ENCODER_KEYS = {f.name for f in dataclasses.fields(Encoder)} - {
  'parent',
  'name',
  'dtype',
  'param_dtype',
}
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


def _dtype(value):
  return _DTYPES[value] if isinstance(value, str) and value in _DTYPES else value


def get_model(
  name_or_config: str | Mapping | ml_collections.ConfigDict, *, num_classes: int, **overrides
) -> nn.Module:
  """Builds a model from a registered name or an original-project model config.

  Args:
    name_or_config: a registered name (`'ViT-B_16'`, `'R50+ViT-B_16'`, `'Mixer-B_16'`, ...) or a
      config with the original project's fields (its `model_name` names the variant; names that
      start with 'Mixer', or configs with `hidden_dim`, build an MlpMixer).
    num_classes: size of the classification head; 0 returns pre-logits features.
    **overrides: module fields (`dtype`, `param_dtype`, `classifier`, `representation_size`, ...)
      or encoder fields (`dropout_rate`, `droppath_rate`, `scan_layers`, `remat_policy`, ...).

  Returns:
    An unbound `VisionTransformer` or `MlpMixer`.

  Raises:
    ValueError: unknown name, or a config/override key the model does not have.
  """
  if isinstance(name_or_config, str):
    config = _as_dict(get_model_config(name_or_config))
  else:
    config = _as_dict(name_or_config)
  # As in the original project, `model_name` is the variant's name; the family follows from it
  # (or from Mixer's fields when a config has no name).
  is_mixer = model_family(config) == 'mixer'
  name = config.pop('model_name', None)
  family = 'MlpMixer' if is_mixer else 'VisionTransformer'
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
        f'unknown override {key!r} for {family} {name!r}; valid: '
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
      config[key] = _dtype(config[key])
  return cls(num_classes=num_classes, model_name=name, **config)


def init_params(
  model: nn.Module, rng: jax.Array, image_size: int = 224, *, batch_size: int = 1
) -> dict:
  """Initializes and unboxes parameters for `image_size` x `image_size` RGB inputs."""
  images = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, images, train=False))(rng)
  return nn.unbox(variables['params'])


def count_params(model: nn.Module, image_size: int = 224) -> int:
  """Number of parameters, computed from shapes only (nothing is allocated)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes['params'])))
