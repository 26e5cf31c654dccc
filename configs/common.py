"""Shared pieces of the recipes: argument parsing and the trainer's config schema.

Every recipe is `get_config(arg)` where `arg` is a comma-separated list of `key=value` or bare
`flag` items (`model=ViT-B_16,dataset=cifar10,runlocal`). `parse_arg` checks each key against the
recipe's defaults and converts values to the default's type, so a typo is an error. `base_config`
holds every field the trainer reads, with defaults; recipes change values, never add fields, and the
result is locked so `--config.typo=1` fails.
"""

from __future__ import annotations

import ast

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
  # More evaluations, big_vision style: name -> `eval_entry(...)` / `fewshot_entry(...)`
  # (vit_jax/evaluators). Results go to `eval/<name>/...`.
  c.evals = ml_collections.ConfigDict()
  # Reliability (vit_jax.train_state, vit_jax.main; docs/reliability.md).
  c.spike_factor = 1000.0  # Stop when loss or grad norm passes this x its running median; 0: off.
  c.distributed_heartbeat_seconds = 30  # Multi-host: a lost peer stops the others within this.
  return c


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


# Ops that set the image size: name -> index of the size argument.
_SIZE_OPS = {
  'resize': 0,
  'central_crop': 0,
  'random_crop': 0,
  'inception_crop': 0,
  'decode_jpeg_and_inception_crop': 0,
  'decode_jpeg_and_central_crop': 0,
}
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


def check(config) -> None:
  """Cross-field checks of any config (a recipe's, or after command-line overrides).

  Raises:
    ValueError: naming both fields and the fix: batch_size not divisible by accum_steps;
      label_smoothing with an onehot op in pp_train (its soft labels are used as they are, so the
      smoothing would be ignored); an image_size other than the size a pp string ends with.
      label_smoothing with mixup composes: mixup mixes the smoothed targets (train.make_train_step).
  """
  batch, accum = int(config['batch_size']), int(config['accum_steps'])
  if batch % accum:
    raise ValueError(f'batch_size={batch} is not divisible by accum_steps={accum}')
  pp_train, smoothing = config['pp_train'], config['label_smoothing']
  if smoothing and 'onehot(' in pp_train.replace(' ', ''):
    raise ValueError(
      f'label_smoothing={smoothing} would be ignored with onehot(...) in pp_train={pp_train!r} '
      '(its soft labels are used as they are); set label_smoothing=0 and smooth in the pp string '
      '(onehot(n, smoothing=x))'
    )
  pps = {'pp_train': pp_train, 'pp_eval': config['pp_eval']}
  evals = config.get('evals') or {}
  pps.update({f'evals.{k}.pp': e['pp'] for k, e in evals.items() if e.get('pp')})
  for field, pp in pps.items():
    size = pp_image_size(pp)
    if size is not None and size != config['image_size']:
      raise ValueError(
        f'image_size={config["image_size"]} but {field}={pp!r} makes {size}-pixel images; '
        f'make them agree (e.g. --config.image_size={size})'
      )


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks cross-field constraints (`check`) and locks the config."""
  check(config)
  config.lock()
  return config


def model_overrides(model_name: str, **fields) -> ml_collections.ConfigDict:
  """Overrides for `get_model`, dropping encoder-only fields for Mixer models."""
  if model_name.startswith('Mixer'):
    fields = {k: v for k, v in fields.items() if k in ('dtype', 'param_dtype')}
  return ml_collections.ConfigDict(fields)
