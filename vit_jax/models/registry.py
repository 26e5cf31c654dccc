"""Named model variants as data, in the original project's config schema.

Each config has the field names of google-research/vision_transformer's `configs/models.py`:
`model_name` (the registered name), `patches.size`, `hidden_size`, `classifier`,
`representation_size`, `transformer.{mlp_dim, num_heads, num_layers, dropout_rate,
attention_dropout_rate}`, `resnet.{num_layers, width_factor}`; Mixer: `hidden_dim`, `num_blocks`,
`tokens_mlp_dim`, `channels_mlp_dim`. So configs written for that project work unchanged.
"""

from __future__ import annotations

import ml_collections

# Width, MLP width, heads, depth. Ti..H from the ViT/DeiT papers; g and G from "Scaling Vision
# Transformers" (Zhai et al., 2021), Table 2.
VIT_SIZES = {
  'Ti': (192, 768, 3, 12),
  'S': (384, 1536, 6, 12),
  'B': (768, 3072, 12, 12),
  'L': (1024, 4096, 16, 24),
  'H': (1280, 5120, 16, 32),
  'g': (1408, 6144, 16, 40),
  'G': (1664, 8192, 16, 48),
}
VIT_VARIANTS = 'Ti/16 S/16 S/32 B/8 B/16 B/32 L/16 L/32 H/14 g/14 G/14'.split()
GAP_NOREP_VARIANTS = 'S/16 S/32 B/16 B/32'.split()
# Hybrid name -> (ViT size, patch size on the ResNet feature map, ResNet stage depths).
HYBRIDS = {
  # The stem alone (no stages) downsamples 4x, so 8x8 patches give 32x32 pixels per token.
  'R+ViT-Ti_16': ('Ti', 8, ()),
  'R26+ViT-S_32': ('S', 1, (2, 2, 2, 2)),
  'R26+ViT-B_32': ('B', 1, (2, 2, 2, 2)),
  'R50+ViT-B_16': ('B', 1, (3, 4, 9)),
  'R50+ViT-L_32': ('L', 1, (3, 4, 6, 3)),
}
# Mixer name -> (hidden, blocks, tokens MLP, channels MLP, patch).
MIXERS = {
  'Mixer-B_16': (768, 12, 384, 3072, 16),
  'Mixer-B_32': (768, 12, 384, 3072, 32),
  'Mixer-L_16': (1024, 24, 512, 4096, 16),
}


# Dropout the original configs set (it matters only in training): 0.1 for L/16, H/14, the R50
# hybrids and `testing`; 0.0 elsewhere.
DROPOUT_01 = {'ViT-L_16', 'ViT-H_14', 'R50+ViT-B_16', 'R50+ViT-L_32', 'testing', 'testing-unpooled'}


def vit_config(
  size: str,
  patch: int,
  *,
  name: str,
  classifier: str = 'token',
  representation_size: int | None = None,
) -> ml_collections.ConfigDict:
  hidden, mlp, heads, layers = VIT_SIZES[size]
  return ml_collections.ConfigDict(
    {
      'model_name': name,
      'patches': {'size': (patch, patch)},
      'hidden_size': hidden,
      'transformer': {
        'mlp_dim': mlp,
        'num_heads': heads,
        'num_layers': layers,
        'attention_dropout_rate': 0.0,
        'dropout_rate': 0.1 if name in DROPOUT_01 else 0.0,
      },
      'classifier': classifier,
      'representation_size': representation_size,
    }
  )


def _build_registry() -> dict[str, ml_collections.ConfigDict]:
  configs = {}
  for variants, suffix, classifier in (
    (VIT_VARIANTS, '', 'token'),
    (GAP_NOREP_VARIANTS, '-gap-norep', 'gap'),
  ):
    for size, patch in (v.split('/') for v in variants):
      name = f'ViT-{size}_{patch}{suffix}'
      configs[name] = vit_config(size, int(patch), name=name, classifier=classifier)
  for name, (size, patch, stages) in HYBRIDS.items():
    config = vit_config(size, patch, name=name)
    config.resnet = ml_collections.ConfigDict({'num_layers': stages, 'width_factor': 1})
    configs[name] = config
  for name, (hidden, blocks, tokens_mlp, channels_mlp, patch) in MIXERS.items():
    configs[name] = ml_collections.ConfigDict(
      {
        'model_name': name,
        'patches': {'size': (patch, patch)},
        'hidden_dim': hidden,
        'num_blocks': blocks,
        'tokens_mlp_dim': tokens_mlp,
        'channels_mlp_dim': channels_mlp,
      }
    )
  testing = vit_config('Ti', 16, name='testing')
  testing.hidden_size = 10
  testing.transformer.update(mlp_dim=10, num_heads=2, num_layers=1)
  configs['testing'] = testing
  unpooled = ml_collections.ConfigDict(testing.to_dict())
  unpooled.update(model_name='testing-unpooled', classifier='unpooled')
  configs['testing-unpooled'] = unpooled
  # The quickstart's model (configs/quickstart.py): 16x16 digits in 4x4 patches, width 64, 4 layers.
  quick = vit_config('Ti', 4, name='ViT-Quick')
  quick.hidden_size = 64
  quick.transformer.update(mlp_dim=128, num_heads=4, num_layers=4)
  configs['ViT-Quick'] = quick
  return configs


MODEL_CONFIGS = _build_registry()
FAMILIES = ('vit', 'hybrid', 'mixer')


def model_family(model) -> str:
  """Which family a model is: 'vit', 'hybrid' (ResNet stem + ViT) or 'mixer'.

  The one place that tells them apart; everything else asks this.

  Args:
    model: a registered name, a model config in the original schema (a dict or ConfigDict with
      `hidden_dim` for a Mixer, `resnet` for a hybrid) or a built model (its fields are read).

  Raises:
    ValueError: an unregistered name.
  """
  if isinstance(model, str):
    if model not in MODEL_CONFIGS:
      raise ValueError(f'unknown model {model!r}; registered models: {", ".join(MODEL_CONFIGS)}')
    model = MODEL_CONFIGS[model]
  get = model.get if hasattr(model, 'get') else lambda k: getattr(model, k, None)
  if get('hidden_dim') is not None or str(get('model_name') or '').startswith('Mixer'):
    return 'mixer'
  return 'hybrid' if get('resnet') is not None else 'vit'
