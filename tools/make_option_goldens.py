r"""Writes tests/golden/options_*: the model options (docs/models.md) run by the implementations
that define them, for tests/test_model_options.py.

- `options_bigvision.npz`: big_vision's `posemb_sincos_2d` tables, and its ViT (`posemb='sincos2d'`,
  `pool_type='gap'`) logits on our parameters mapped to its names.
- `options_timm.npz`: timm's `VisionTransformer` logits (registers, LayerScale, QK-norm, patch
  dropout in eval, a `gap` head with registers) on our parameters mapped to its names, and
  `options_timm_layer_decay.json`: timm's `param_groups_layer_decay` lr scale of every parameter,
  under our parameter names.

Needs an environment with jax, flax, this package, torch and timm (and ml_collections), and a
checkout of big_vision (`git archive` of any commit; the one used is in tests/golden/README.md):

    python -m venv /tmp/xc && /tmp/xc/bin/pip install -e . timm ml_collections
    mkdir /tmp/bv && git -C BIG_VISION archive HEAD big_vision | tar -x -C /tmp/bv
    /tmp/xc/bin/python tools/make_option_goldens.py --big_vision /tmp/bv --out tests/golden
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
from flax import nnx

from vit_jax import models

# The small ViT every case uses: 16x16 images in 4x4 patches (a 4x4 grid), width 64, 2 blocks.
BASE = dict(
  model_name='options-golden',
  patches={'size': (4, 4)},
  hidden_size=64,
  classifier='token',
  representation_size=None,
  transformer=dict(mlp_dim=128, num_heads=4, num_layers=2, dropout_rate=0.0,
                   attention_dropout_rate=0.0),
)  # fmt: skip
IMAGE, CLASSES = 16, 10
TIMM_CASES = {
  'registers': dict(num_registers=4),
  'layer_scale': dict(layer_scale=0.1),
  'qk_norm': dict(qk_norm=True),
  'all': dict(num_registers=2, layer_scale=0.1, qk_norm=True, patch_dropout=0.5),
  'gap_registers': dict(classifier='gap', num_registers=3, layer_scale=0.1, qk_norm=True),
}
LAYER_DECAY = 0.75  # For the `all` case's lr scales.


def noisy_params(seed: int, **overrides) -> dict:
  """Our model's init plus 0.02 N(0, 1) on every array: no zero bias, no unit scale."""
  model = models.get_model(
    BASE, CLASSES, image_size=IMAGE, rngs=nnx.Rngs(seed), head_zero_init=False, **overrides
  )
  params = jax.tree.map(np.asarray, models.params_of(model))
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda x: (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32), params
  )


def flat(params: dict) -> dict:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


# --- timm ----------------------------------------------------------------------------------------


def to_timm(params: dict, options: dict) -> dict:
  """Our released-layout params -> timm VisionTransformer state dict (numpy)."""
  d = BASE['hidden_size']
  out = {
    'patch_embed.proj.weight': params['embedding']['kernel'].transpose(3, 2, 0, 1),
    'patch_embed.proj.bias': params['embedding']['bias'],
    'norm.weight': params['Transformer']['encoder_norm']['scale'],
    'norm.bias': params['Transformer']['encoder_norm']['bias'],
    'head.weight': params['head']['kernel'].T,
    'head.bias': params['head']['bias'],
  }
  token = options.get('classifier', 'token') == 'token'
  regs = options.get('num_registers', 0)
  if token:
    out['cls_token'] = params['cls']
  if regs:
    out['reg_token'] = params['registers'][0][None]
  # timm's table covers every prefix token (no_embed_class=False): zeros for the registers.
  pe = params['Transformer']['posembed_input']['pos_embedding']
  c = int(token)
  out['pos_embed'] = np.concatenate([pe[:, :c], np.zeros((1, regs, d), pe.dtype), pe[:, c:]], 1)
  for i in range(BASE['transformer']['num_layers']):
    b, t = params['Transformer'][f'encoderblock_{i}'], f'blocks.{i}.'
    att = b['MultiHeadDotProductAttention_1']
    qkv = [att[n]['kernel'].reshape(d, d).T for n in ('query', 'key', 'value')]
    out[t + 'attn.qkv.weight'] = np.concatenate(qkv, 0)
    names = ('query', 'key', 'value')
    out[t + 'attn.qkv.bias'] = np.concatenate([att[n]['bias'].reshape(d) for n in names])
    out[t + 'attn.proj.weight'] = att['out']['kernel'].reshape(d, d).T
    out[t + 'attn.proj.bias'] = att['out']['bias']
    if 'query_norm' in att:
      for ours, theirs in (('query_norm', 'q_norm'), ('key_norm', 'k_norm')):
        out[t + f'attn.{theirs}.weight'] = att[ours]['scale']
        out[t + f'attn.{theirs}.bias'] = att[ours]['bias']
    for ours, theirs in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      out[t + theirs + '.weight'], out[t + theirs + '.bias'] = b[ours]['scale'], b[ours]['bias']
    for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      out[t + f'mlp.{theirs}.weight'] = b['MlpBlock_3'][ours]['kernel'].T
      out[t + f'mlp.{theirs}.bias'] = b['MlpBlock_3'][ours]['bias']
    if 'layerscale_attention' in b:
      out[t + 'ls1.gamma'], out[t + 'ls2.gamma'] = b['layerscale_attention'], b['layerscale_mlp']
  return out


def timm_name_of(ours: str, options: dict) -> list[str]:
  """The timm parameter name(s) that hold our parameter `ours` (for the lr scales)."""
  del options
  parts = ours.split('/')
  top = {'cls': 'cls_token', 'registers': 'reg_token', 'head/kernel': 'head.weight',
         'head/bias': 'head.bias', 'embedding/kernel': 'patch_embed.proj.weight',
         'embedding/bias': 'patch_embed.proj.bias',
         'Transformer/posembed_input/pos_embedding': 'pos_embed',
         'Transformer/encoder_norm/scale': 'norm.weight',
         'Transformer/encoder_norm/bias': 'norm.bias'}  # fmt: skip
  if ours in top:
    return [top[ours]]
  i = int(parts[1].split('_')[1])
  rest = '/'.join(parts[2:])
  t = f'blocks.{i}.'
  wb = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight'}
  if rest.startswith('MultiHeadDotProductAttention_1/'):
    sub, leaf = parts[3], parts[-1]
    if sub in ('query', 'key', 'value'):
      return [t + f'attn.qkv.{wb[leaf]}']
    if sub == 'out':
      return [t + f'attn.proj.{wb[leaf]}']
    return [t + f'attn.{ {"query_norm": "q_norm", "key_norm": "k_norm"}[sub] }.{wb[leaf]}']
  if rest == 'layerscale_attention':
    return [t + 'ls1.gamma']
  if rest == 'layerscale_mlp':
    return [t + 'ls2.gamma']
  if rest.startswith('LayerNorm_'):
    return [t + {'LayerNorm_0': 'norm1', 'LayerNorm_2': 'norm2'}[parts[2]] + '.' + wb[parts[-1]]]
  if rest.startswith('MlpBlock_3/'):
    return [t + {'Dense_0': 'mlp.fc1', 'Dense_1': 'mlp.fc2'}[parts[3]] + '.' + wb[parts[-1]]]
  raise KeyError(ours)


def timm_model(options: dict):
  import torch
  from timm.models.vision_transformer import VisionTransformer

  token = options.get('classifier', 'token') == 'token'
  return VisionTransformer(
    img_size=IMAGE,
    patch_size=4,
    num_classes=CLASSES,
    embed_dim=BASE['hidden_size'],
    depth=BASE['transformer']['num_layers'],
    num_heads=BASE['transformer']['num_heads'],
    mlp_ratio=BASE['transformer']['mlp_dim'] / BASE['hidden_size'],
    qkv_bias=True,
    qk_norm=bool(options.get('qk_norm')),
    init_values=options.get('layer_scale'),
    class_token=token,
    reg_tokens=options.get('num_registers', 0),
    no_embed_class=False,
    global_pool='token' if token else 'avg',
    fc_norm=False,  # Ours: the final LayerNorm on every token, then the pooling.
    patch_drop_rate=options.get('patch_dropout', 0.0),
    act_layer='gelu_tanh',
    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
  ).eval()


def timm_cases(images: np.ndarray) -> tuple[dict, dict]:
  import torch
  from timm.optim import param_groups_layer_decay

  out, scales = {'images': images}, {}
  for k, (case, options) in enumerate(TIMM_CASES.items()):
    params = noisy_params(k + 1, **options)
    model = timm_model(options)
    state = {
      n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in to_timm(params, options).items()
    }
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
      logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    out[f'{case}/logits'] = logits
    out.update({f'{case}/params/{n}': v for n, v in flat(params).items()})
    if case == 'all':
      groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=LAYER_DECAY)
      by_name = {}
      for group in groups:
        for p in group['params']:
          by_name[id(p)] = group['lr_scale']
      timm_scale = {n: by_name[id(p)] for n, p in model.named_parameters()}
      for ours in flat(params):
        (name,) = timm_name_of(ours, options)
        scales[ours] = timm_scale[name]
  return out, scales


# --- big_vision ----------------------------------------------------------------------------------


def bigvision_cases(images: np.ndarray, big_vision: str) -> dict:
  sys.path.insert(0, big_vision)
  from big_vision.models import vit as bv

  out = {}
  for h, w, width in ((14, 14, 384), (12, 20, 128)):
    out[f'sincos_{h}x{w}x{width}'] = np.asarray(bv.posemb_sincos_2d(h, w, width))
  options = dict(posemb='sincos2d', classifier='gap')
  params = noisy_params(100, **options)
  t = BASE['transformer']
  model = bv.Model(num_classes=CLASSES, patch_size=(4, 4), width=BASE['hidden_size'],
                   depth=t['num_layers'], mlp_dim=t['mlp_dim'], num_heads=t['num_heads'],
                   posemb='sincos2d', pool_type='gap', rep_size=False)  # fmt: skip
  init = model.init(jax.random.key(0), images)['params']
  mapped = {
    'embedding': params['embedding'],
    'head': params['head'],
    'Transformer': {'encoder_norm': params['Transformer']['encoder_norm']},
  }
  for i in range(t['num_layers']):
    b = params['Transformer'][f'encoderblock_{i}']
    mapped['Transformer'][f'encoderblock_{i}'] = {
      'LayerNorm_0': b['LayerNorm_0'],
      'MultiHeadDotProductAttention_0': b['MultiHeadDotProductAttention_1'],
      'LayerNorm_1': b['LayerNorm_2'],
      'MlpBlock_0': b['MlpBlock_3'],
    }
  shapes = lambda tree: jax.tree.map(np.shape, flax.core.unfreeze(tree))
  assert shapes(init) == shapes(mapped), (shapes(init), shapes(mapped))
  logits, _ = model.apply({'params': mapped}, images)
  out['sincos2d_gap/logits'] = np.asarray(logits)
  out.update({f'sincos2d_gap/params/{n}': v for n, v in flat(params).items()})
  out['images'] = images
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--big_vision', help='folder holding big_vision/ (the big_vision part)')
  parser.add_argument('--out', default='tests/golden')
  parser.add_argument('--part', choices=('big_vision', 'timm', 'both'), default='both')
  args = parser.parse_args()
  if args.part == 'both':  # big_vision imports TensorFlow, which crashes beside torch: two runs.
    for part in ('big_vision', 'timm'):
      argv = [sys.executable, __file__, '--part', part, '--out', args.out]
      subprocess.run(argv + ['--big_vision', args.big_vision or ''], check=True)
    return
  images = np.random.RandomState(0).uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32)
  if args.part == 'big_vision':
    out = bigvision_cases(images, args.big_vision)
    np.savez(os.path.join(args.out, 'options_bigvision.npz'), **out)
    return
  timm_out, scales = timm_cases(images)
  np.savez(os.path.join(args.out, 'options_timm.npz'), **timm_out)
  with open(os.path.join(args.out, 'options_timm_layer_decay.json'), 'w') as f:
    json.dump({'layer_decay': LAYER_DECAY, 'lr_scale': scales}, f, indent=1, sort_keys=True)
    f.write('\n')


if __name__ == '__main__':
  main()
