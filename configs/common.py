"""Shared pieces of the recipes: argument parsing and the trainer's config schema.

Every recipe is `get_config(arg)` where `arg` is a comma-separated list of `key=value` or bare
`flag` items (`model=ViT-B_16,dataset=cifar10,runlocal`). `parse_arg` checks each key against the
recipe's defaults and converts values to the default's type, so a typo is an error. `base_config`
holds every field the trainer reads, with defaults; recipes change values, never add fields, and the
result is locked so `--config.typo=1` fails.
"""

from __future__ import annotations

import ml_collections

_TRUE = ('1', 'true', 'yes', 'on', '')
_FALSE = ('0', 'false', 'no', 'off')


def _convert(key: str, value: str, default):
  if isinstance(default, bool):
    low = value.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f'config argument {key}={value!r}: expected a boolean (true/false)')
  if isinstance(default, int):
    try:
      return int(value)
    except ValueError:
      raise ValueError(f'config argument {key}={value!r}: expected an integer') from None
  if isinstance(default, float):
    try:
      return float(value)
    except ValueError:
      raise ValueError(f'config argument {key}={value!r}: expected a number') from None
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


def base_config() -> ml_collections.ConfigDict:
  """All fields the trainer reads, with neutral defaults. See docs/training.md for each."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Model: a registered name; `model` holds overrides passed verbatim to `get_model`.
  c.model_name = 'testing'
  c.model = ml_collections.ConfigDict({'dtype': 'float32', 'param_dtype': 'float32'})
  c.num_classes = -1  # -1: the dataset's.
  c.pretrained_path = ''  # Original-format .npz: fine-tune from it (when not resuming).
  # Data.
  c.dataset = 'synthetic'
  c.data_dir = ''  # '': TFDS default (~/tensorflow_datasets).
  c.train_split = 'train'
  c.eval_splits = 'test'  # Comma-separated; '' disables evaluation.
  c.image_size = 224
  c.pp_train = 'decode|resize(224)|value_range(-1,1)'
  c.pp_eval = 'decode|resize(224)|value_range(-1,1)'
  c.shuffle_buffer = 10_000
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
  c.weight_decay = 0.0
  c.wd_mask = 'kernels'
  # Loss.
  c.loss = 'softmax_xent'  # Or 'sigmoid_xent'.
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
  # Reliability (vit_jax.train_state, vit_jax.main; docs/reliability.md).
  c.spike_factor = 1000.0  # Stop when loss or grad norm passes this x its running median; 0: off.
  c.distributed_heartbeat_seconds = 30  # Multi-host: a lost peer stops the others within this.
  return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks cross-field constraints and locks the config."""
  if config.batch_size % config.accum_steps:
    raise ValueError(
      f'batch_size={config.batch_size} is not divisible by accum_steps={config.accum_steps}'
    )
  config.lock()
  return config


def model_overrides(model_name: str, **fields) -> ml_collections.ConfigDict:
  """Overrides for `get_model`, dropping encoder-only fields for Mixer models."""
  if model_name.startswith('Mixer'):
    fields = {k: v for k, v in fields.items() if k in ('dtype', 'param_dtype')}
  return ml_collections.ConfigDict(fields)
