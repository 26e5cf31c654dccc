"""Export ViT params to Hugging Face transformers (PyTorch) `ViTForImageClassification`.

`save` writes a folder that `ViTForImageClassification.from_pretrained(DIR)` loads offline:
config.json (with `id2label`), model.safetensors and a preprocessor_config.json for
`ViTImageProcessor` (resize to the model's size, bilinear, then [-1, 1]).

The mapping is written against the meaning of each tensor, and accepts both the transformers 4.x
names (`encoder.layer.N.attention.attention.query`) and the 5.x names (`layers.N.attention.q_proj`),
so `save_hf` writes whatever layout the installed transformers version reads back.
Our GELU is the tanh approximation, so the exported config uses `gelu_pytorch_tanh`.
`posemb='sincos2d'` is written as HF's position table (fixed at the export's image size);
register tokens, LayerScale and QK-norm have no place in HF's ViT and are refused;
`patch_dropout` acts in training only and needs nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import flax
import numpy as np

from vit_jax import models, npz

_BLOCK = re.compile(r'^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)$')
# (hf suffixes) -> our path inside Transformer/encoderblock_{i}, and the tensor kind.
_MHA = 'MultiHeadDotProductAttention_1/'
_BLOCK_TABLE = [
  (('attention.attention.query', 'attention.q_proj'), _MHA + 'query', 'qkv'),
  (('attention.attention.key', 'attention.k_proj'), _MHA + 'key', 'qkv'),
  (('attention.attention.value', 'attention.v_proj'), _MHA + 'value', 'qkv'),
  (('attention.output.dense', 'attention.o_proj'), _MHA + 'out', 'out'),
  (('layernorm_before',), 'LayerNorm_0', 'norm'),
  (('layernorm_after',), 'LayerNorm_2', 'norm'),
  (('intermediate.dense', 'mlp.fc1'), 'MlpBlock_3/Dense_0', 'dense'),
  (('output.dense', 'mlp.fc2'), 'MlpBlock_3/Dense_1', 'dense'),
]
_TOP_TABLE = {
  'embeddings.cls_token': 'cls',
  'embeddings.position_embeddings': 'Transformer/posembed_input/pos_embedding',
  'embeddings.patch_embeddings.projection.weight': 'embedding/kernel',
  'embeddings.patch_embeddings.projection.bias': 'embedding/bias',
  'layernorm.weight': 'Transformer/encoder_norm/scale',
  'layernorm.bias': 'Transformer/encoder_norm/bias',
  'pooler.dense.weight': 'pre_logits/kernel',
  'pooler.dense.bias': 'pre_logits/bias',
  'classifier.weight': 'head/kernel',
  'classifier.bias': 'head/bias',
}


def check_plain_vit(model_config: Mapping) -> None:
  """Raises ValueError unless the model is a ViT that the Hugging Face ViT can hold (no torch)."""
  if models.model_family(model_config) != 'vit':
    raise ValueError('Hugging Face export supports plain ViT models only (not hybrids or Mixer)')
  if model_config.get('classifier', 'token') != 'token':
    raise ValueError(
      f'HF ViT reads the class token; classifier {model_config["classifier"]!r} '
      'has no HF equivalent'
    )
  ph, pw = model_config['patches']['size']
  if ph != pw:
    raise ValueError(f'HF ViT needs square patches, got {(ph, pw)}')
  t, registers = model_config.get('transformer') or {}, model_config.get('num_registers')
  for present, what in (
    (registers, f'register tokens (num_registers={registers})'),
    (t.get('layer_scale') is not None, 'LayerScale (layer_scale)'),
    (t.get('qk_norm'), 'QK-norm (qk_norm)'),
  ):
    if present:
      raise ValueError(f'HF ViT has no {what}; export this model as npz or saved_model')


def check(loaded) -> None:
  """Raises ValueError for a checkpoint the hf format cannot hold (checked before any torch)."""
  check_plain_vit(loaded.model_config)
  if 'pre_logits' in loaded.params:
    raise ValueError(
      'Hugging Face export: this checkpoint has a representation layer (pre_logits, dense + tanh) '
      'that ViTForImageClassification does not have; export it as npz or onnx instead'
    )


def hf_config(model_config: Mapping, *, num_classes: int, image_size: int):
  """The `transformers.ViTConfig` of a plain ViT model config (original schema)."""
  from transformers import ViTConfig

  check_plain_vit(model_config)
  ph, _ = model_config['patches']['size']
  t = model_config['transformer']
  return ViTConfig(
    hidden_size=model_config['hidden_size'],
    num_hidden_layers=t['num_layers'],
    num_attention_heads=t['num_heads'],
    intermediate_size=t['mlp_dim'],
    hidden_act='gelu_pytorch_tanh',
    layer_norm_eps=1e-6,
    image_size=image_size,
    patch_size=ph,
    num_channels=3,
    qkv_bias=True,
    num_labels=num_classes,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )


def _convert(kind: str, suffix: str, value: np.ndarray) -> np.ndarray:
  if suffix.endswith('bias') or kind == 'norm':
    return value.reshape(-1)
  if kind == 'qkv':  # (embed, heads, head_dim) -> torch Linear (out, in).
    return value.reshape(value.shape[0], -1).T
  if kind == 'out':  # (heads, head_dim, embed) -> (out, in).
    return value.reshape(-1, value.shape[-1]).T
  if kind == 'conv':  # (ph, pw, c, d) -> (d, c, ph, pw).
    return value.transpose(3, 2, 0, 1)
  return value.T  # 'dense'.


def _lookup(hf_key: str, flat: Mapping[str, np.ndarray]) -> np.ndarray:
  match = _BLOCK.match(hf_key)
  if match:
    index, rest = match.groups()
    for suffixes, ours, kind in _BLOCK_TABLE:
      for suffix in suffixes:
        if rest.startswith(suffix + '.'):
          leaf = rest[len(suffix) + 1 :]
          leaf = {'weight': 'kernel' if kind != 'norm' else 'scale', 'bias': 'bias'}[leaf]
          return _convert(kind, leaf, flat[f'Transformer/encoderblock_{index}/{ours}/{leaf}'])
    raise KeyError(f'no vit_jax parameter for Hugging Face key {hf_key!r}')
  ours = _TOP_TABLE.get(hf_key.removeprefix('vit.'))
  if ours is None:
    raise KeyError(f'no vit_jax parameter for Hugging Face key {hf_key!r}')
  if ours in ('cls', 'Transformer/posembed_input/pos_embedding'):
    return flat[ours]
  kind = 'conv' if ours.startswith('embedding/') else ('norm' if 'norm' in ours else 'dense')
  return _convert(kind, ours, flat[ours])


def to_hf_model(params: Mapping, model_config: Mapping, *, image_size: int):
  """Builds a PyTorch HF model holding `params`: `ViTForImageClassification`, or, when the params
  have a representation layer (`pre_logits`, which the HF classifier lacks), a `ViTModel` whose
  pooler (dense + tanh on the class token) is that layer; logits are then `pooler @ head`."""
  import torch
  from transformers import ViTForImageClassification, ViTModel

  flat = npz.to_released_layout(flax.core.unfreeze(params))
  posemb = 'Transformer/posembed_input/pos_embedding'
  if posemb not in flat and (model_config.get('transformer') or {}).get('posemb') == 'sincos2d':
    # HF's table covers the class token and the patches: a zero row for the class token (which
    # has no embedding under sincos2d), then the fixed sine-cosine table of this image size.
    from vit_jax.models import vit

    ph, _ = model_config['patches']['size']
    table = vit.posemb_sincos_2d(image_size // ph, image_size // ph, model_config['hidden_size'])
    flat[posemb] = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
  num_classes = flat['head/bias'].shape[0] if 'head/bias' in flat else 0
  config = hf_config(model_config, num_classes=num_classes, image_size=image_size)
  if 'pre_logits/kernel' in flat:
    config.pooler_output_size = flat['pre_logits/kernel'].shape[1]
    model = ViTModel(config, add_pooling_layer=True)
  else:
    model = ViTForImageClassification(config)
  state = {
    k: torch.from_numpy(np.ascontiguousarray(_lookup(k, flat), dtype=np.float32))
    for k in model.state_dict()
  }
  model.load_state_dict(state, strict=True)
  return model.eval()


def save_hf(params: Mapping, model_config: Mapping, directory: str, *, image_size: int) -> None:
  """Writes a Hugging Face model folder (config.json + safetensors) for `from_pretrained`."""
  to_hf_model(params, model_config, image_size=image_size).save_pretrained(directory)


RUNTIME = 'transformers (PyTorch)'


def save(loaded, directory: str) -> str:
  """Writes a `from_pretrained` folder for a `vit_jax.export.load.Loaded` checkpoint.

  Raises:
    ValueError: hybrids, Mixer, non-token classifiers, or a representation layer (`pre_logits`),
      which `ViTForImageClassification` does not have.
  """
  check(loaded)
  model = to_hf_model(loaded.params, loaded.model_config, image_size=loaded.image_size)
  if loaded.labels:
    model.config.id2label = dict(enumerate(loaded.labels))
    model.config.label2id = {name: i for i, name in enumerate(loaded.labels)}
  model.save_pretrained(directory, safe_serialization=True)
  write_preprocessor_config(directory, loaded.image_size)
  return directory


def write_preprocessor_config(directory: str, image_size: int) -> None:
  """`ViTImageProcessor` settings of our eval input: bilinear resize, x / 127.5 - 1."""
  config = {
    'image_processor_type': 'ViTImageProcessor',
    'do_resize': True,
    'size': {'height': image_size, 'width': image_size},
    'resample': 2,  # PIL.Image.BILINEAR.
    'do_rescale': True,
    'rescale_factor': 1 / 255,
    'do_normalize': True,
    'image_mean': [0.5, 0.5, 0.5],
    'image_std': [0.5, 0.5, 0.5],
  }
  with open(os.path.join(directory, 'preprocessor_config.json'), 'w') as f:
    json.dump(config, f, indent=2)


def run(directory: str, images: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
  """Logits of the exported folder, reloaded by transformers, for NHWC images in [-1, 1]."""
  import torch
  from transformers import ViTForImageClassification

  model = ViTForImageClassification.from_pretrained(directory, local_files_only=True).eval()
  if labels is not None and [model.config.id2label[i] for i in range(len(labels))] != list(labels):
    raise ValueError(f"{directory}: id2label does not hold the checkpoint's label names")
  with torch.no_grad():
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return model(pixel_values=pixels).logits.numpy()
