"""Recipes: argument parsing, locking, per-dataset presets, runlocal, and every field is read."""

import ml_collections
import pytest

from configs import common, finetune, pretrain, quickstart
from vit_jax import models, optim


@pytest.mark.parametrize(
  'module,arg',
  [
    (quickstart, None),
    (quickstart, 'runlocal'),
    (finetune, 'model=ViT-B_16,dataset=cifar10'),
    (finetune, 'runlocal'),
    (pretrain, 'model=ViT-B_16,dataset=imagenet2012'),
    (pretrain, 'model=ViT-L_16,dataset=imagenet21k,augreg=medium2'),
    (pretrain, 'runlocal'),
    (finetune, 'model=Mixer-B_16,dataset=oxford_iiit_pet'),
  ],
)
def test_recipes_build_locked_valid_configs(module, arg):
  config = module.get_config(arg)
  assert config.is_locked
  assert set(config) == set(common.base_config())  # Same schema everywhere.
  with pytest.raises(AttributeError):
    config.batchsize = 3  # A typo is an error, not a new field.
  models.get_model(config.model_name, num_classes=10, **config.model)  # Overrides are valid.
  optim.make_optimizer(config)
  assert config.batch_size % config.accum_steps == 0


def test_finetune_matches_the_paper_recipe():
  c = finetune.get_config('model=ViT-B_16,dataset=cifar10')
  assert (c.optimizer, c.momentum, c.grad_clip_norm, c.batch_size, c.image_size) == (
    'sgd',
    0.9,
    1.0,
    512,
    384,
  )
  assert (c.total_steps, c.lr, c.decay_type, c.weight_decay) == (10_000, 0.03, 'cosine', 0.0)
  assert finetune.get_config('dataset=oxford_iiit_pet').total_steps == 500
  assert finetune.get_config('dataset=imagenet2012').total_steps == 20_000
  assert finetune.get_config('dataset=cifar10,steps=7,lr=0.01').total_steps == 7


def test_pretrain_recipe():
  c = pretrain.get_config('model=ViT-B_16,dataset=imagenet2012,augreg=medium2')
  assert (c.optimizer, c.batch_size, c.wd_mask, c.grad_clip_norm) == ('adamw', 4096, 'kernels', 1.0)
  assert c.total_steps == 300 * 1_281_167 // 4096 and c.warmup_steps == 10_000
  assert c.mixup.p == 0.5 and 'randaug(2,15)' in c.pp_train
  assert pretrain.get_config('dataset=imagenet21k').loss == 'sigmoid_xent'
  with pytest.raises(ValueError, match='unknown augreg'):
    pretrain.get_config('augreg=extreme')


def test_parse_arg_checks_keys_and_types():
  args = common.parse_arg('model=B/16,steps=5,runlocal', model='x', steps=0, runlocal=False)
  assert (args.model, args.steps, args.runlocal) == ('B/16', 5, True)
  with pytest.raises(ValueError, match="unknown config argument 'stpes'"):
    common.parse_arg('stpes=5', steps=0)
  with pytest.raises(ValueError, match='expected an integer'):
    common.parse_arg('steps=five', steps=0)
  with pytest.raises(ValueError, match='needs a value'):
    common.parse_arg('steps', steps=0)


def test_accumulation_must_divide_the_batch():
  c = common.base_config()
  c.batch_size, c.accum_steps = 10, 4
  with pytest.raises(ValueError, match='not divisible by accum_steps=4'):
    common.finalize(c)


def test_runlocal_is_small():
  for module in (quickstart, finetune, pretrain):
    c = module.get_config('runlocal')
    assert c.model_name == 'testing' and c.total_steps <= 12 and c.log_every == 1
    assert c.dataset.startswith('synthetic') and 0 < c.checkpoint_every < c.total_steps
    assert isinstance(c.mesh, ml_collections.ConfigDict)
