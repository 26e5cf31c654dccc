r"""Pretraining from scratch: ViT paper (upstream) and AugReg (Steiner et al., 2022) settings.

    python -m vit_jax.main --config configs/pretrain.py:model=ViT-B_16,dataset=imagenet2012 \
        --workdir gs://bucket/vit_b16_i1k
    python -m vit_jax.main \
        --config configs/pretrain.py:model=ViT-B_16,dataset=imagenet21k,augreg=light1

AdamW (b1 0.9, b2 0.999), decoupled weight decay on kernels only (`wd_mask='kernels'`), global-norm
clipping at 1.0, batch 4096, linear warmup (10k steps) then cosine (ImageNet-1k) or linear
(ImageNet-21k) decay, resolution 224, sigmoid cross-entropy for the multi-label-ish 21k. Hardware:
TPU v3/v4-256 or similar. Expected result: ViT-B/16 on ImageNet-1k for 300 epochs with AugReg
`medium2` reaches about 79-80% top-1 per the AugReg paper; not re-measured with this code yet (no
accelerator time for a full run so far).
Large models: `--config.model.scan_layers=True --config.model.remat_policy=full` and an FSDP mesh
(`--config.mesh.fsdp=-1 --config.mesh.data=1`) or FSDP x tensor (`--config.mesh.tensor=4`).

Arguments: model=NAME, dataset=imagenet2012|imagenet21k|..., augreg=none|light1|medium1|medium2|
strong1 (RandAugment magnitude, mixup, dropout, stochastic depth), epochs=N, batch=N, runlocal.
"""

from configs import common

# AugReg settings: (randaug (layers, magnitude) or None, mixup p, dropout, stochastic depth).
AUGREG = {
  'none': (None, 0.0, 0.0, 0.0),
  'light0': (None, 0.0, 0.1, 0.1),
  'light1': ((2, 10), 0.0, 0.0, 0.0),
  'light2': ((2, 10), 0.2, 0.0, 0.0),
  'medium1': ((2, 15), 0.2, 0.0, 0.0),
  'medium2': ((2, 15), 0.5, 0.0, 0.0),
  'strong1': ((2, 20), 0.5, 0.0, 0.0),
  'strong2': ((2, 20), 0.8, 0.0, 0.0),
}
# dataset -> (train examples, train split, eval splits, lr, weight decay, decay type, loss).
DATASETS = {
  'imagenet2012': (
    1_281_167,
    'train[:99%]',
    'train[99%:],validation',
    1e-3,
    0.1,
    'cosine',
    'softmax_xent',
  ),
  'imagenet21k': (
    13_000_000,
    'full[102400:]',
    'full[:102400]',
    1e-3,
    0.03,
    'linear',
    'sigmoid_xent',
  ),
}


def _width(model: str) -> int | None:
  from vit_jax import models  # Lazy: configs stay importable without JAX for parsing.

  return models.get_model_config(model).get('hidden_size')


def get_config(arg: str | None = None):
  args = common.parse_arg(
    arg,
    model='ViT-B_16',
    dataset='imagenet2012',
    augreg='none',
    epochs=300,
    batch=4096,
    runlocal=False,
  )
  if args.augreg not in AUGREG:
    raise ValueError(f'unknown augreg={args.augreg!r}; expected one of {sorted(AUGREG)}')
  randaug, mix, dropout, droppath = AUGREG[args.augreg]
  n, train_split, eval_splits, lr, wd, decay, loss = DATASETS.get(
    args.dataset, (1_281_167, 'train', 'validation', 1e-3, 0.1, 'cosine', 'softmax_xent')
  )
  c = common.base_config()
  c.model_name = args.model
  c.model = common.model_overrides(
    args.model,
    dtype='bfloat16',
    param_dtype='float32',
    dropout_rate=dropout,
    attention_dropout_rate=0.0,
    droppath_rate=droppath,
    scan_layers=False,
    remat_policy='none',
    classifier='token',
    # The original upstream models have a pre-logits layer as wide as the model; AugReg drops it.
    representation_size=None if args.augreg != 'none' else _width(args.model),
  )
  c.dataset = args.dataset
  c.train_split = train_split
  c.eval_splits = eval_splits
  c.image_size = 224
  aug = f'|randaug({randaug[0]},{randaug[1]})' if randaug else ''
  c.pp_train = f'decode_jpeg_and_inception_crop(224)|flip_lr{aug}|value_range(-1,1)'
  c.pp_eval = 'decode|resize_small(256)|central_crop(224)|value_range(-1,1)'
  c.mixup.p = mix
  c.batch_size = args.batch
  c.eval_batch_size = 1024
  c.total_steps = args.epochs * n // args.batch
  c.optimizer = 'adamw'
  c.b1, c.b2 = 0.9, 0.999
  c.lr = lr
  c.warmup_steps = min(10_000, c.total_steps // 5)
  c.decay_type = decay
  c.end_lr_factor = 0.01 if decay == 'linear' else 0.0
  c.weight_decay = wd
  c.wd_mask = 'kernels'
  c.grad_clip_norm = 1.0
  c.loss = loss
  c.label_smoothing = 0.0
  c.mu_dtype = 'bfloat16'
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.shuffle_buffer = 250_000

  if args.runlocal:
    c.model_name = 'testing'
    c.model = common.model_overrides(
      'testing',
      dtype='float32',
      param_dtype='float32',
      dropout_rate=dropout,
      droppath_rate=droppath,
      scan_layers=True,
      remat_policy='full',
    )
    c.dataset = 'synthetic:image_size=32,num_classes=10,num_examples=256'
    c.train_split, c.eval_splits = 'train', 'test'
    c.pp_train = f'decode{aug}|value_range(-1,1)'
    c.pp_eval = 'value_range(-1,1)'
    c.image_size = 32
    c.batch_size = c.eval_batch_size = 16
    c.total_steps = 10
    c.warmup_steps = 2
    c.log_every = 1
    c.eval_every = 5
    c.checkpoint_every = 4
    c.shuffle_buffer = 64
    c.mu_dtype = ''
  return common.finalize(c)
