"""The config schema: every field the trainer, the models, the optimizer and the evaluators read.

`base_config()` declares each field with its default; the recipes (`configs/`, installed as
`vit_jax.configs`) only set values, and the result is locked, so `--config.typo=1` is an error.
`validate(config)` is the one validation pass, run when a recipe is built (`finalize`) and again
before any data is prepared: each mistake is one `ConfigError` line naming the `--config.` flag to
change. `config.model` holds overrides for `models.get_model` (None: the registered model's value).
A recipe's `get_config(arg)` parses `arg` (`model=ViT-B_16,dataset=cifar10,runlocal`) with
`parse_arg`.

This module imports no JAX at the top: recipes stay importable for parsing and `--print_config`.
"""

from __future__ import annotations

import ast
import difflib
import logging
import math
import os
import tempfile
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A config mistake, explained in one line naming the `--config.` flag to change."""


# --- the schema ---------------------------------------------------------------------------------

# Allowed values of the enumerated fields (the modules that read them agree: tests/test_configs.py).
CHOICES = {
  'optimizer': ('sgd', 'adamw', 'adam'),
  'decay_type': ('cosine', 'linear', 'constant'),
  'wd_mask': ('kernels', 'all', 'none'),
  'weight_decay_mode': ('decoupled', 'lr_scaled'),
  'mu_dtype': ('', 'float32', 'bfloat16', 'float16'),
  'loss': ('softmax_xent', 'sigmoid_xent'),
  'model.dtype': ('float32', 'bfloat16', 'float16'),
  'model.param_dtype': ('float32', 'bfloat16', 'float16'),
  'model.classifier': ('token', 'gap', 'map', 'unpooled', 'token_unpooled'),
  'model.attention_impl': ('xla', 'cudnn'),
  'model.posemb': ('learn', 'sincos2d'),
}
_VIT = ('vit', 'hybrid')
_ALL = ('vit', 'hybrid', 'mixer')
# `config.model` fields: name -> (type, default, the model families that have it). None: the
# registered model's value. dtype/param_dtype are always passed.
MODEL_FIELDS = {
  'dtype': (str, 'float32', _ALL),
  'param_dtype': (str, 'float32', _ALL),
  'patches': (tuple, None, _ALL),  # (height, width) of a patch.
  # ViT and hybrid: the encoder's shape and training knobs.
  'hidden_size': (int, None, _VIT),
  'mlp_dim': (int, None, _VIT),
  'num_heads': (int, None, _VIT),
  'num_layers': (int, None, _VIT),
  'classifier': (str, None, _VIT),
  'representation_size': (int, None, _VIT),  # Width of the pre-logits layer (None: none).
  'head_bias_init': (float, None, _VIT),
  'head_zero_init': (bool, None, _VIT),
  'dropout_rate': (float, None, _VIT),
  'attention_dropout_rate': (float, None, _VIT),
  'droppath_rate': (float, None, _VIT),
  'scan_layers': (bool, None, _VIT),  # One nn.scan over stacked blocks: faster compilation.
  'remat_policy': (str, None, _VIT),  # 'none', 'full' or a jax.checkpoint_policies name.
  'attention_impl': (str, None, _VIT),  # 'xla', 'cudnn'; None: cuDNN on GPUs for bf16/f16.
  # Architecture options (docs/models.md): all off by default, the released architecture.
  'posemb': (str, None, _VIT),  # 'learn' (released) or 'sincos2d' (fixed, no parameter).
  'num_registers': (int, None, _VIT),  # Register tokens after the class token (Darcet et al.).
  'layer_scale': (float, None, _VIT),  # LayerScale init value (CaiT / DeiT III); None: off.
  'qk_norm': (bool, None, _VIT),  # LayerNorm on queries and keys per head (ViT-22B).
  'patch_dropout': (float, None, _VIT),  # Training only: drop this fraction of patch tokens.
  # MLP-Mixer.
  'hidden_dim': (int, None, ('mixer',)),
  'num_blocks': (int, None, ('mixer',)),
  'tokens_mlp_dim': (int, None, ('mixer',)),
  'channels_mlp_dim': (int, None, ('mixer',)),
}
# Values that mean "off": dropped for a family without the field (a recipe's dropout 0 for a Mixer).
_MODEL_OFF = {
  'dropout_rate': 0.0,
  'attention_dropout_rate': 0.0,
  'droppath_rate': 0.0,
  'scan_layers': False,
  'remat_policy': 'none',
  'posemb': 'learn',
  'num_registers': 0,
  'qk_norm': False,
  'patch_dropout': 0.0,
}
# The architecture: with `pretrained_path=WORKDIR` these come from the workdir's config.json.
ARCHITECTURE = ('patches', 'hidden_size', 'mlp_dim', 'num_heads', 'num_layers', 'classifier',
                'representation_size', 'hidden_dim', 'num_blocks', 'tokens_mlp_dim',
                'channels_mlp_dim', 'posemb', 'num_registers', 'layer_scale',
                'qk_norm')  # fmt: skip

# Resume (vit_jax.resume): fields whose change makes the saved state unusable (shapes, dtypes,
# optimizer state, data position in micro-batches). Every other field may change; it is logged.
RESUME_REFUSED = ('model_name', 'num_classes', 'image_size', 'dataset', 'optimizer', 'mu_dtype',
                  'batch_size', 'accum_steps')  # fmt: skip
# `ema_decay` may change between non-zero values (stated); turning the EMA on or off is refused:
# the checkpoint has or lacks `ema`, and an EMA started mid-run from the current params would not
# be the average its name says (vit_jax.resume.compare; docs/training.md "Weight EMA").
RESUME_EMA = 'ema_decay'
# `model.*` fields are refused too, except these, which change no parameter.
RESUME_MODEL_FREE = ('dropout_rate', 'attention_dropout_rate', 'droppath_rate', 'remat_policy',
                     'attention_impl', 'patch_dropout')  # fmt: skip


def _model_schema() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  for name, (kind, default, _) in MODEL_FIELDS.items():
    model[name] = config_dict.placeholder(kind) if default is None else default
  return model


def base_config() -> ml_collections.ConfigDict:
  """Every field the library reads, with its default. See docs/training.md for each."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Model: a registered name (`python -m vit_jax.main --list_models`) and its overrides.
  c.model_name = 'testing'
  c.model = _model_schema()
  c.num_classes = -1  # -1: the dataset's.
  # Fine-tune from an original-format .npz or one of our workdirs (whose architecture is used),
  # when the run's workdir has no checkpoint yet.
  c.pretrained_path = ''
  # Data.
  c.dataset = 'synthetic'
  c.data_dir = ''  # '': TFDS default (~/tensorflow_datasets).
  c.train_split = 'train'
  c.eval_splits = 'test'  # Comma-separated splits of `dataset`, classified every `eval_every`.
  c.image_size = 224
  c.pp_train = 'decode|resize(224)|value_range(-1,1)'
  c.pp_eval = 'decode|resize(224)|value_range(-1,1)'
  c.shuffle_buffer = 10_000
  c.cache_data = False  # Hold decoded examples in host memory (datasets that fit).
  c.mixup = ml_collections.ConfigDict({'p': 0.0, 'cutmix_p': 0.0})  # p=0: off.
  c.data_seed = 0
  # Batches and steps.
  c.batch_size = 512  # Global, all devices; split into accum_steps micro-batches.
  c.accum_steps = 1
  c.eval_batch_size = 512
  c.total_steps = 1000
  # Optimizer (vit_jax.optim).
  c.optimizer = 'sgd'
  c.lr = 0.03
  c.warmup_steps = 100
  c.decay_type = 'cosine'
  c.end_lr_factor = 0.0
  c.momentum = 0.9
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.mu_dtype = ''  # '': same as params; 'bfloat16' halves momentum memory.
  c.grad_clip_norm = 1.0  # 0: no clipping.
  # Per-step decay factor of a decayed parameter: 1 - weight_decay * m(t) ('decoupled',
  # big_vision's `wd`) or 1 - weight_decay * lr(t) ('lr_scaled', torch/optax AdamW); m(t) is the
  # schedule's multiplier (lr(t) / lr). vit_jax/optim.py make_optimizer; docs/training.md.
  c.weight_decay = 0.0
  c.weight_decay_mode = 'decoupled'
  c.wd_mask = 'kernels'  # Parameters named `kernel` (big_vision's '.*/kernel$'); 'all'; 'none'.
  c.layer_decay = 0.0  # BEiT/timm layer-wise lr decay (e.g. 0.75 when fine-tuning); 0: off.
  # Weight EMA (vit_jax.ema): state['ema'] <- d_n * ema + (1 - d_n) * params after every update;
  # evaluated beside the params (eval/<name>/ema_*), used by predict/export. 0: off.
  c.ema_decay = 0.0  # E.g. 0.9999; d_n = 0 at the first update (timm ModelEmaV3).
  c.ema_warmup = False  # timm's use_warmup: d_n = min(ema_decay, 1 - (1 + t / gamma) ** -power).
  c.ema_warmup_gamma = 1.0  # timm ModelEmaV3 warmup_gamma.
  c.ema_warmup_power = 2 / 3  # timm ModelEmaV3 warmup_power (3/4 for shorter runs).
  # Loss.
  c.loss = 'softmax_xent'
  c.label_smoothing = 0.0
  # Parallelism (vit_jax.sharding): sizes of the mesh axes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(
    {'data': -1, 'fsdp': 1, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 1}
  )
  c.logical_rules = ()  # Empty: sharding.DEFAULT_RULES.
  # Periodic work (0: never, except at the end).
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  # More evaluations, big_vision style: name -> `eval_entry(...)` / `fewshot_entry(...)`
  # (vit_jax/evaluators). Results go to `eval/<name>/...`.
  c.evals = ml_collections.ConfigDict()
  # Reliability (vit_jax.train_state, vit_jax.main; docs/reliability.md).
  c.spike_factor = 1000.0  # Stop when loss or grad norm passes this x its running median; 0: off.
  c.distributed_heartbeat_seconds = 30  # Multi-host: a lost peer stops the others within this.
  return c


EVAL_TYPES = ('classification', 'real', 'fewshot')


def eval_entry(
  *, type: str, split: str, dataset: str = '', pp: str = '', every: int = 0, batch_size: int = 0
) -> ml_collections.ConfigDict:
  """One `config.evals` entry of type 'classification' or 'real'.

  Args:
    type: 'classification' (top-1, top-5, loss) or 'real' (ImageNet ReaL top-1).
    split: split of `dataset`.
    dataset: '' for the training dataset, else any dataset name `vit_jax.data` accepts.
    pp: preprocessing string; '' for `pp_eval`.
    every: steps between runs (0: only at the end; -1: never).
    batch_size: 0 for `eval_batch_size`.
  """
  return ml_collections.ConfigDict(
    dict(type=type, dataset=dataset, split=split, pp=pp, every=every, batch_size=batch_size)
  )


# big_vision configs/common_fewshot.py:35-47: the few-shot datasets (name, train split, test split).
FEWSHOT_DATASETS = {
  'caltech': ('caltech101', 'train', 'test'),
  'cars': ('cars196:2.1.0', 'train', 'test'),
  'cifar100': ('cifar100', 'train', 'test'),
  'dtd': ('dtd', 'train', 'test'),
  'pets': ('oxford_iiit_pet', 'train', 'test'),
  'uc_merced': ('uc_merced', 'train[:1000]', 'train[1000:]'),
}


def fewshot_entry(
  *, every: int, runlocal: bool = False, datasets: dict | None = None, pp: str = ''
) -> ml_collections.ConfigDict:
  """A `config.evals` entry of type 'fewshot': linear probes on frozen pre-logits features.

  Defaults are big_vision's configs/common_fewshot.py:20-56: shots 1/5/10/25, l2_reg 2**10,
  3 seeds, `decode|resize(256)|central_crop(224)|value_range(-1,1)`, pets only for runlocal.
  """
  if datasets is None:
    datasets = {'pets': FEWSHOT_DATASETS['pets']} if runlocal else FEWSHOT_DATASETS
  return ml_collections.ConfigDict(
    dict(
      type='fewshot',
      datasets={k: tuple(v) for k, v in datasets.items()},
      shots=(1, 5, 10, 25),
      l2_reg=2.0**10,
      num_seeds=3,
      pp=pp or 'decode|resize(256)|central_crop(224)|value_range(-1,1)',
      every=every,
      batch_size=0,
    )
  )


# Splits per dataset kind (train, eval): TFDS datasets mostly have train/test; folder datasets
# have the train/ and validation/ folders (vit_jax.data.builders.ImageFolder).
_SPLITS = {
  'folder': ('train', 'validation'),
  'imagenet2012': ('train', 'validation'),
  'oxford_flowers102': ('train+validation', 'test'),
  'imagenet21k': ('full[102400:]', 'full[:102400]'),
}


def default_splits(dataset: str) -> tuple[str, str]:
  """(train split, eval split) that `dataset` has ('folder:/x' -> train, validation)."""
  return _SPLITS.get(dataset.split(':')[0], ('train', 'test'))


# --- recipes ------------------------------------------------------------------------------------

_TRUE = ('1', 'true', 'yes', 'on', '')
_FALSE = ('0', 'false', 'no', 'off')


def _convert(key: str, value: str, default):
  if isinstance(default, bool):
    if value.lower() in _TRUE + _FALSE:
      return value.lower() in _TRUE
    raise ValueError(f'config argument {key}={value!r}: expected a boolean (true/false)')
  for kind, words in ((int, 'an integer'), (float, 'a number')):
    if isinstance(default, kind):
      try:
        return kind(value)
      except ValueError:
        raise ValueError(f'config argument {key}={value!r}: expected {words}') from None
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=x,flag' against `defaults` (which fix the keys and types).

  A bare key sets a boolean to True. `model=` values may contain '/' (`B/16`); values cannot
  contain commas.

  Raises:
    ValueError: an unknown key (listing the known ones) or a value of the wrong type.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or '').split(','))):
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}')
    if not sep and not isinstance(defaults[key], bool):
      raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
    out[key] = _convert(key, value.strip(), defaults[key])
  return ml_collections.ConfigDict(out)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A recipe's last step: the field checks of `validate` (nothing that reads files), then lock."""
  validate(config, environment=False)
  config.lock()
  return config


# --- model overrides ----------------------------------------------------------------------------


def _family(config: Mapping) -> str | None:
  from vit_jax import models  # Lazy: the models import JAX.

  name = config['model_name']
  return models.model_family(name) if name in models.MODEL_CONFIGS else None


def model_kwargs(config: Mapping, family: str | None = None) -> dict:
  """The `config.model` overrides to pass to `models.get_model`: only the fields that are set.

  Fields of another family (`scan_layers` for a Mixer) are dropped when off and refused otherwise.

  Raises:
    ConfigError: a field set that the model's family does not have.
  """
  family = family or _family(config)
  out = {}
  for key, value in dict(config['model']).items():
    if value is None:
      continue
    families = MODEL_FIELDS[key][2] if key in MODEL_FIELDS else _ALL
    if family is not None and family not in families:
      if _MODEL_OFF.get(key, object()) == value:
        continue
      raise ConfigError(
        f'model.{key}={value!r} does not apply to {config["model_name"]} (a {family} model): '
        f'remove --config.model.{key}'
      )
    out[key] = tuple(value) if isinstance(value, list) else value
  return out


# --- validation ---------------------------------------------------------------------------------

# Ops whose first argument (or `size=`) is the image size they make.
_SIZE_OPS = (
  'resize',
  'central_crop',
  'random_crop',
  'inception_crop',
  'decode_jpeg_and_inception_crop',
  'decode_jpeg_and_central_crop',
)
_SHAPE_OPS = ('resize_small', 'resize_long')  # Keep the aspect ratio: size unknown after them.


def pp_image_size(pp: str) -> int | tuple | None:
  """The image size a preprocessing string ends with, or None where it does not say."""
  size = None
  for spec in filter(None, (s.strip() for s in pp.split('|'))):
    name = spec.split('(')[0].strip()
    if name in _SHAPE_OPS:
      size = None
    if name not in _SIZE_OPS:
      continue
    try:
      call = ast.parse(spec if '(' in spec else spec + '()', mode='eval').body
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, AttributeError):
      continue  # The pipeline reports malformed ops itself.
    value = args[0] if args else kwargs.get('size')
    if value is not None:
      size = tuple(value) if isinstance(value, list | tuple) else int(value)
  if isinstance(size, tuple) and len(size) == 2 and size[0] == size[1]:
    size = size[0]
  return size


def _nearest(value: int, multiple: int) -> list[int]:
  low = (value // multiple) * multiple
  return [s for s in (low, low + multiple) if s > 0]


def _closest(name: str, choices) -> str:
  """'did you mean X? ' for the closest of `choices`, or ''."""
  match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
  return f'did you mean {match[0]!r}? ' if match else ''


def get_field(config: Mapping, dotted: str):
  """`config['a']['b']` for 'a.b'; None where a key is missing."""
  for key in dotted.split('.'):
    if key not in config:
      return None
    config = config[key]
  return config


def _check_fields(config: Mapping) -> None:
  """Checks of the values alone: choices, ranges, and fields that must agree with each other."""
  for field, allowed in CHOICES.items():
    value = get_field(config, field)
    if value is not None and value not in allowed:
      raise ConfigError(
        f'{field}={value!r} is not one of {", ".join(map(repr, allowed))}: '
        f'{_closest(str(value), allowed)}set --config.{field}= one of them'
      )
  if config['weight_decay'] and config['optimizer'] == 'adam':
    raise ConfigError(
      f'weight_decay={config["weight_decay"]} with optimizer=adam is ambiguous: use '
      '--config.optimizer=adamw (decoupled) or --config.weight_decay=0'
    )
  if not 0.0 <= float(config['layer_decay'] or 0.0) <= 1.0:
    raise ConfigError(
      f'layer_decay={config["layer_decay"]} must be in (0, 1] (0: off; BEiT and timm fine-tune '
      'with 0.65-0.75): set --config.layer_decay='
    )
  _check_ema(config)
  for field in ('batch_size', 'accum_steps', 'eval_batch_size', 'total_steps'):
    if int(config[field]) < 1:
      raise ConfigError(f'{field}={config[field]} must be at least 1: set --config.{field}=')
  batch, accum = int(config['batch_size']), int(config['accum_steps'])
  if batch % accum:
    raise ConfigError(
      f'batch_size={batch} is not divisible by accum_steps={accum}: use --config.batch_size= '
      f'one of {", ".join(map(str, _nearest(batch, accum)))} or another --config.accum_steps'
    )
  warmup, total = int(config['warmup_steps']), int(config['total_steps'])
  if not 0 <= warmup <= total:
    raise ConfigError(
      f'warmup_steps={warmup} must be in [0, total_steps={total}]: set '
      f'--config.warmup_steps={min(max(warmup, 0), total)} (or more --config.total_steps)'
    )
  pp_train, smoothing = config['pp_train'], config['label_smoothing']
  if smoothing and 'onehot(' in pp_train.replace(' ', ''):
    raise ConfigError(
      f'label_smoothing={smoothing} would be ignored with onehot(...) in pp_train={pp_train!r} '
      '(its soft labels are used as they are); set --config.label_smoothing=0 and smooth in the '
      'pp string (onehot(n, smoothing=x))'
    )
  for name, entry in dict(config.get('evals') or {}).items():
    if entry.get('type') not in EVAL_TYPES:
      raise ConfigError(
        f'evals.{name}.type={entry.get("type")!r} is not one of {", ".join(EVAL_TYPES)}: set '
        f'--config.evals.{name}.type='
      )
  _check_image_size(config)


def _check_ema(config: Mapping) -> None:
  ema = float(config.get('ema_decay') or 0.0)
  if not 0.0 <= ema < 1.0:
    raise ConfigError(
      f'ema_decay={config["ema_decay"]} must be in [0, 1) (0: off; timm uses 0.9998-0.9999): set '
      '--config.ema_decay='
    )
  if config.get('ema_warmup') and not ema:
    raise ConfigError(
      'ema_warmup=True does nothing with ema_decay=0 (no EMA): set --config.ema_decay= (e.g. '
      '0.9999) or --config.ema_warmup=False'
    )
  for field in ('ema_warmup_gamma', 'ema_warmup_power'):
    if field in config and not float(config[field]) > 0.0:
      raise ConfigError(f'{field}={config[field]} must be positive: set --config.{field}=')


def _check_image_size(config: Mapping) -> None:
  """image_size agrees with the pp strings first, then with the patch size (the hint fits both)."""
  size = int(config['image_size'])
  pps = {'pp_train': config['pp_train'], 'pp_eval': config['pp_eval']}
  evals = config.get('evals') or {}
  pps.update({f'evals.{k}.pp': e['pp'] for k, e in evals.items() if e.get('pp')})
  for field, pp in pps.items():
    made = pp_image_size(pp)
    if made is not None and made != size:
      raise ConfigError(
        f'image_size={size} but {field}={pp!r} makes {made}-pixel images; make them agree '
        f'(e.g. --config.image_size={made})'
      )
  dataset = str(config['dataset'])
  if dataset.startswith('synthetic') and pp_image_size(config['pp_train']) is None:
    made = _synthetic_size(dataset)
    if made != size:
      raise ConfigError(
        f'image_size={size} but dataset={dataset!r} makes {made}-pixel images and pp_train '
        f'resizes nothing: set --config.image_size={made} (or image_size= in --config.dataset)'
      )
  patch = _patch_size(config)
  if patch is None or _family(config) == 'hybrid':
    return
  if size % patch[0] or size % patch[1]:
    near = ' or '.join(map(str, _nearest(size, math.lcm(*patch))))
    also = ''  # The hinted size must pass the checks above too.
    if any(pp_image_size(pp) is not None for pp in pps.values()):
      also = ' and make --config.pp_train / --config.pp_eval end at that size'
    elif dataset.startswith('synthetic'):
      also = ' and image_size= in --config.dataset'
    raise ConfigError(
      f'image_size={size} is not divisible by the patch size {patch[0]} of '
      f'{config["model_name"]}: use --config.image_size={near}{also}'
    )


def _synthetic_size(dataset: str) -> int:
  for item in dataset.partition(':')[2].split(','):
    key, _, value = item.partition('=')
    if key.strip() == 'image_size':
      return int(value)
  return 224  # vit_jax.data.builders.SYNTHETIC_DEFAULTS.


def _patch_size(config: Mapping) -> tuple[int, int] | None:
  from vit_jax import models

  patches = config['model'].get('patches')
  if patches is None:
    name = config['model_name']
    if name not in models.MODEL_CONFIGS:
      return None
    patches = models.get_model_config(name).patches.size
  if isinstance(patches, Mapping):
    patches = patches['size']
  return tuple(int(p) for p in patches)


def _check_model(config: Mapping) -> None:
  from vit_jax import models

  name = config['model_name']
  if name not in models.MODEL_CONFIGS:
    raise ConfigError(
      f'unknown model {name!r} (--config.model_name): {_closest(name, models.MODEL_CONFIGS)}'
      'list them with: python -m vit_jax.main --list_models'
    )
  model_kwargs(config)
  remat = config['model'].get('remat_policy')
  if remat not in (None, 'none', 'full'):
    import jax

    if not hasattr(jax.checkpoint_policies, remat):
      raise ConfigError(
        f"model.remat_policy={remat!r} is not 'none', 'full' or a jax.checkpoint_policies name: "
        f'set --config.model.remat_policy=full'
      )


def validate(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  devices=None,
  environment: bool = True,
) -> None:
  """The one validation pass: every config mistake, before any data is prepared.

  With `environment` (the default) it also looks outside the config: the mesh over `devices`
  (default: all), `data_dir`, the size and splits of a folder or synthetic dataset,
  `pretrained_path` and the workdir. Two things are filled in, each with one info line, and only
  once: a folder dataset without the default eval split `test` evaluates on the split it has, and
  `pretrained_path=WORKDIR` takes that run's architecture (`model_name` and `ARCHITECTURE`
  fields) from its config.json.

  Raises:
    ConfigError: one line naming the value, the `--config.` flag to change and how.
  """
  if environment and config['pretrained_path']:
    from vit_jax import pretrained

    pretrained.adopt_workdir_architecture(config)
  _check_model(config)
  _check_fields(config)
  if not environment:
    return
  _check_mesh(config, devices)
  _check_data(config)
  if config['pretrained_path']:
    from vit_jax import pretrained

    pretrained.check_fits(config)
  if workdir:
    _check_workdir(workdir)


def _check_mesh(config: Mapping, devices) -> None:
  import jax

  from vit_jax import sharding

  try:
    mesh = sharding.make_mesh(config['mesh'], devices)
  except ValueError as e:
    raise ConfigError(f'{" ".join(str(e).split())} (--config.mesh.*)') from None
  shards = sharding.num_batch_shards(mesh, sharding.logical_rules(config))
  step = math.lcm(shards, jax.process_count())
  batch, accum = int(config['batch_size']), int(config['accum_steps'])
  where = (
    f'the {shards} batch shards of mesh {sharding.describe(mesh)} ({mesh.size} devices, '
    f'{jax.process_count()} processes)'
  )
  if (batch // accum) % step:
    raise ConfigError(
      f'batch_size={batch} / accum_steps={accum} is not divisible by {where}: use '
      f'--config.batch_size= one of {", ".join(map(str, _nearest(batch, step * accum)))}'
    )
  size = int(config['eval_batch_size'])
  if size % step:
    raise ConfigError(
      f'eval_batch_size={size} is not divisible by {where}: use --config.eval_batch_size= one '
      f'of {", ".join(map(str, _nearest(size, step)))}'
    )


def _known_splits(dataset: str) -> dict[str, int] | None:
  """{split: examples} of a dataset whose splits are known without preparing it, else None."""
  kind = dataset.split(':')[0]
  if kind not in ('synthetic', 'folder'):
    return None
  from vit_jax.data import builders

  if kind == 'synthetic':
    return builders.synthetic(dataset)[2]
  try:
    return builders.folder_split_sizes(dataset[len('folder:') :])
  except (OSError, ValueError) as e:
    raise ConfigError(f'{" ".join(str(e).split())} Fix --config.dataset') from None


def _check_data(config: ml_collections.ConfigDict) -> None:
  data_dir = config['data_dir']
  dataset = config['dataset']
  prepared_here = dataset.split(':')[0] in ('synthetic', 'digits', 'folder')  # Made on first use.
  if data_dir and '://' not in data_dir and not prepared_here:
    if not os.path.isdir(os.path.expanduser(data_dir)):
      raise ConfigError(
        f'data_dir {data_dir!r} does not exist (dataset {dataset!r}): fix --config.data_dir, '
        "or leave it empty for TFDS's default ~/tensorflow_datasets"
      )
  sizes = _known_splits(dataset)
  if sizes is None:
    return
  splits = [s.strip() for s in config['eval_splits'].split(',') if s.strip()]
  missing = [s for s in splits if s not in sizes]
  if dataset.startswith('folder:') and missing == ['test'] and splits == ['test']:
    have = 'validation' if 'validation' in sizes else 'train'
    logging.info(
      'dataset %r has no test split: evaluating on %r (set --config.eval_splits to change)',
      dataset,
      have,
    )
    config.eval_splits = have
  elif missing:
    raise ConfigError(
      f'eval_splits={config["eval_splits"]!r}: dataset {dataset!r} has no split {missing[0]!r}; '
      f'it has {", ".join(sorted(sizes))}: set --config.eval_splits='
    )
  train = config['train_split']
  micro = int(config['batch_size']) // int(config['accum_steps'])
  if train in sizes and sizes[train] < micro:
    raise ConfigError(
      f'batch_size={config["batch_size"]} (accum_steps={config["accum_steps"]}) is larger '
      f'than split {train!r} of dataset {dataset!r} ({sizes[train]} examples): use a smaller '
      '--config.batch_size (or more --config.accum_steps), or a larger dataset'
    )
  if train not in sizes and '[' not in train and '+' not in train:
    raise ConfigError(
      f'train_split={train!r}: dataset {dataset!r} has no such split; it has '
      f'{", ".join(sorted(sizes))}: set --config.train_split='
    )


def _check_workdir(workdir: str) -> None:
  import jax

  if '://' in workdir or jax.process_index() != 0:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(
      f'workdir {workdir!r} is not writable ({e.strerror}): choose another --workdir or fix '
      'its permissions'
    ) from e
