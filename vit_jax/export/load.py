"""Load params + model from an original-format `.npz` or a training workdir, for export/predict.

A workdir (what `python -m vit_jax.main --workdir W` writes) holds `config.json` (the run's config:
`model_name`, `model` overrides, `num_classes`, `dataset`, `image_size`, `pp_eval`) and
`checkpoints/<step>/`; the architecture, image size, eval preprocessing and label names all come
from it. A bare `.npz` needs `model_name`; its class count comes from the head, and whether it has
a representation layer from `pre_logits`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx

from vit_jax import config as config_lib
from vit_jax import labels as labels_lib
from vit_jax import models, npz, train_state

DEFAULT_PP = 'decode|resize({size})|value_range(-1,1)'  # The published ViT evaluation.


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready for inference: float32, unscanned model and released-layout params."""

  model: Any  # An abstract NNX module (nnx.eval_shape): graph and hyperparameters, no arrays.
  params: dict
  model_config: dict  # Original-project schema, overrides applied (what `hf.hf_config` reads).
  num_classes: int
  image_size: int
  pp_eval: str
  labels: list[str] | None
  source: str
  weights: str = 'raw'  # A workdir's 'ema' (vit_jax.ema) or 'raw' params; 'raw' for an .npz.

  @functools.cached_property
  def fn(self):
    """The model's pure function `fn(params, images, **kwargs)` (`models.functional`)."""
    return models.functional(self.model)

  def apply(self, images: np.ndarray, **kwargs):
    return self.fn(self.params, images, **kwargs)


def _open(path: str, mode: str = 'r'):
  """`open` (UTF-8) for a local path, TensorFlow's gfile for a remote one (gs://...)."""
  if '://' in path:
    import tensorflow as tf

    return tf.io.gfile.GFile(path, mode)
  return open(path, mode, encoding='utf-8')


def _exists(path: str) -> bool:
  if '://' in path:
    import tensorflow as tf

    return tf.io.gfile.exists(path)
  return os.path.isfile(path)


def is_workdir(path: str) -> bool:
  """Whether `path` is a training workdir (has config.json), local or remote."""
  path = str(path)
  return not path.endswith('.npz') and _exists(os.path.join(path, 'config.json'))


def read_config(workdir: str) -> dict:
  """The run's config.json as a dict."""
  with _open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)


def workdir_params(workdir: str, step: int | None = None, *, weights: str = 'raw') -> dict:
  """A workdir's params (latest step, or `step`) as host numpy, released (unscanned) layout;
  `weights='ema'` reads its weight EMA instead (`train_state.restore_params`)."""
  directory = os.path.join(workdir, 'checkpoints')
  if step is not None:
    import tensorflow as tf  # gfile: local or remote workdirs.

    names = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
    steps = sorted(int(n.strip('/')) for n in names if n.strip('/').isdigit())
    if step not in steps:
      raise FileNotFoundError(f'{workdir!r} has no checkpoint at step {step}; it has {steps}')
  try:
    params = train_state.restore_params(directory, step, weights=weights)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'workdir {workdir!r} has no checkpoint: {e}') from e
  return jax.tree.map(np.asarray, npz.unscan_params(flax.core.unfreeze(params)))


def model_config_of(model) -> dict:
  """The original-schema config of a built model (registered fields plus overrides)."""
  if models.model_family(model) == 'mixer':
    fields = ('num_blocks', 'hidden_dim', 'tokens_mlp_dim', 'channels_mlp_dim')
    out = {k: getattr(model, k) for k in fields if hasattr(model, k)}
  else:
    out = {
      'hidden_size': model.hidden_size,
      'transformer': dict(model.transformer),
      'classifier': model.classifier,
      'representation_size': model.representation_size,
      'resnet': dict(model.resnet) if model.resnet is not None else None,
    }
    if getattr(model, 'num_registers', 0):
      out['num_registers'] = model.num_registers
  out.update(model_name=model.model_name, patches={'size': tuple(model.patches)})
  return out


def _infer_image_size(params: Mapping, model) -> int | None:
  """Side of the square images a plain ViT's position embeddings were trained for."""
  posemb = params.get('Transformer', {}).get('posembed_input', {}).get('pos_embedding')
  if posemb is None or getattr(model, 'resnet', None) is not None:
    return None
  tokens = posemb.shape[1] - (1 if model.classifier in ('token', 'token_unpooled') else 0)
  grid = int(round(np.sqrt(tokens)))
  return grid * model.patches[0] if grid * grid == tokens else None


_INFERENCE = dict(dtype='float32', param_dtype='float32')
_NO_DROPOUT = dict.fromkeys(('dropout_rate', 'attention_dropout_rate', 'droppath_rate'), 0.0)
_ENCODER_INFERENCE = dict(scan_layers=False, remat_policy='none', **_NO_DROPOUT)


def npz_options(params: Mapping) -> dict:
  """The model options (docs/models.md) a ViT `.npz` was saved with, read from its names:
  `registers`, `layerscale_*`, `query_norm`, and no `posembed_input` (sincos2d)."""
  encoder = params.get('Transformer', {})
  block = encoder.get('encoderblock_0', {})
  out = {}
  if 'registers' in params:
    out['num_registers'] = int(np.shape(params['registers'])[1])
  if 'layerscale_attention' in block:
    out['layer_scale'] = 1.0  # Its value is the init only; the checkpoint's scales are loaded.
  if 'query_norm' in block.get('MultiHeadDotProductAttention_1', {}):
    out['qk_norm'] = True
  if encoder and 'posembed_input' not in encoder:
    out['posemb'] = 'sincos2d'
  return out


def _build(name_or_config, num_classes: int, overrides: Mapping, image_size: int = 224):
  family = models.model_family(name_or_config)
  # A workdir's `model` fields left unset (None) are the registered model's values.
  overrides = config_lib.model_kwargs({'model_name': name_or_config, 'model': overrides}, family)
  overrides.update(_INFERENCE)
  if family != 'mixer':
    overrides.update(_ENCODER_INFERENCE)
  return nnx.eval_shape(
    lambda: models.get_model(
      name_or_config, num_classes=num_classes, image_size=image_size, **overrides
    )
  )


LABELS_FILE = 'labels.txt'  # In a workdir: the run's label names, one per line, class order.


def read_labels(path: str) -> list[str]:
  """Label names from a text file, one per line (local or remote)."""
  with _open(path) as f:
    return [line.strip() for line in f.read().splitlines() if line.strip()]


def write_labels(names: list[str], workdir: str) -> None:
  """Writes a workdir's label names (`labels.txt`), so they travel with its checkpoints."""
  with _open(os.path.join(workdir, LABELS_FILE), 'w') as f:
    f.write('\n'.join(names) + '\n')


def label_names(dataset: str | None, num_classes: int, data_dir: str | None = None):
  """Label names of a TFDS dataset name, `synthetic:...` or a text file; None when unknown.

  WordNet ids (ImageNet's TFDS names, `n01440764`) become readable names (`vit_jax.labels`).
  """
  if not dataset:
    return None
  if os.path.isfile(dataset) or '://' in dataset:
    names = read_labels(dataset)
  else:
    from vit_jax import data

    try:
      names = list(data.get_dataset_info(dataset, data_dir)[1])
    except Exception as e:
      try:  # Unprepared (e.g. ImageNet): TFDS ships the label names of many datasets.
        import tensorflow_datasets as tfds

        names = list(tfds.builder(dataset).info.features['label'].names)
      except Exception:
        logging.warning('no label names for %r (%s): printing class indices', dataset, e)
        return None
  if len(names) != num_classes:
    raise ValueError(f'{dataset!r} has {len(names)} labels but the checkpoint has {num_classes}')
  return labels_lib.readable(names)


def default_labels(num_classes: int) -> str | None:
  """The names file of a released checkpoint of this class count (ImageNet-1k or -21k)."""
  return labels_lib.path(num_classes)


def load(
  path: str,
  *,
  model_name: str | None = None,
  step: int | None = None,
  image_size: int | None = None,
  labels: str | None = None,
  weights: str | None = None,
) -> Loaded:
  """Loads an `.npz` (local or gs://) or a training workdir for inference.

  Args:
    path: `.npz` checkpoint or workdir (a folder with config.json and checkpoints/).
    model_name: registered model name; required for an `.npz`, ignored for a workdir.
    step: a workdir's checkpoint step (default: latest).
    image_size: input side (default: the workdir's, or inferred from the position embeddings).
    labels: TFDS dataset name or labels text file (default: the workdir's dataset; ImageNet's
      names for 1000/21843-class checkpoints).
    weights: a workdir's 'ema' (its weight EMA) or 'raw' params; None: the EMA when the run kept
      one (`config.ema_decay`), else the params. An `.npz` holds one set ('raw').

  Raises:
    ValueError: no model name for an `.npz`, or a checkpoint that does not fit the model.
  """
  if is_workdir(path):
    config = read_config(path)
    weights = weights or ('ema' if float(config.get('ema_decay') or 0.0) > 0 else 'raw')
    params = workdir_params(path, step, weights=weights)
    name = config['model_name']
    num_classes = int(params['head']['bias'].shape[0]) if 'head' in params else 0
    image_size = image_size or int(config['image_size'])
    model = _build(name, num_classes, config.get('model') or {}, image_size)
    pp_eval = config.get('pp_eval') or DEFAULT_PP.format(size=image_size)
    if not labels:  # The names the run stored; older workdirs: its dataset's, if still there.
      stored = os.path.join(path, LABELS_FILE)
      labels = stored if _exists(stored) else config.get('dataset')
    data_dir = config.get('data_dir') or None
  else:
    if weights == 'ema':
      raise ValueError(f'{path!r} is an .npz, which holds one set of weights: drop --weights=ema')
    weights = 'raw'
    if not model_name:
      raise ValueError(
        f'{path!r} is not a workdir (no config.json), so --model is needed to read it as an .npz'
      )
    params = npz.load(path)
    num_classes = int(params['head']['bias'].shape[0]) if 'head' in params else 0
    overrides = {}
    if models.model_family(model_name) != 'mixer':  # Whether there is a representation layer.
      pre_logits = params.get('pre_logits')
      overrides['representation_size'] = pre_logits and int(pre_logits['bias'].shape[0])
      overrides.update(npz_options(params))
    image_size = image_size or _infer_image_size(params, _build(model_name, num_classes, overrides))
    image_size = image_size or 224
    model = _build(model_name, num_classes, overrides, image_size)
    pp_eval = DEFAULT_PP.format(size=image_size)
    labels = labels or default_labels(num_classes)
    data_dir = None
  name = model.model_name
  expected = models.params_of(model)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  npz.check_tree(params, expected, path=path, model_name=name)
  return Loaded(
    model=model,
    params=params,
    model_config=model_config_of(model),
    num_classes=num_classes,
    image_size=image_size,
    pp_eval=pp_eval,
    labels=label_names(labels, num_classes, data_dir) if num_classes else None,
    source=path,
    weights=weights,
  )


def load_pretrained(pretrained_path: str, init_params: Mapping, *, model_name=None, step=None):
  """`npz.pretrained_params` of an `.npz` or of a training workdir (its latest step's params,
  or `step`'s): both sources get the same head re-init and resizing.
  """  # fmt: skip
  if not is_workdir(pretrained_path):
    return npz.pretrained_params(pretrained_path, init_params, model_name=model_name)
  params = workdir_params(pretrained_path, step)
  return npz.pretrained_params(params, init_params, model_name=model_name, source=pretrained_path)


def load_from_args(args) -> Loaded:
  """`load` with the --checkpoint, --model, --step, --image_size, --labels and --weights flags
  that `vit_jax.predict` and `vit_jax.export` share."""
  return load(
    args.checkpoint,
    model_name=args.model,
    step=args.step,
    image_size=args.image_size,
    labels=args.labels,
    weights=getattr(args, 'weights', None),
  )
