r"""Pretraining from scratch: AugReg (Steiner et al., 2022), the ViT paper's upstream, plain ViT.

    python -m vit_jax.main --config=pretrain:model=ViT-B_16,dataset=imagenet2012 \
        --workdir gs://bucket/vit_b16_i1k
    python -m vit_jax.main \
        --config=pretrain:model=ViT-B_16,dataset=imagenet21k,augreg=light2 --workdir ...
    python -m vit_jax.main --config=pretrain:recipe=vit,dataset=imagenet2012 \
        --workdir ...
    python -m vit_jax.main --config=pretrain:recipe=plain --workdir gs://bucket/vit_s16_plain
    python -m vit_jax.main --config=pretrain:recipe=plain,epochs=300 --workdir ...

`recipe=augreg` (default) is big_vision's `configs/vit_i1k.py` / `configs/vit_i21k.py` field by
field (each field below cites its line): Adam (mu in bfloat16), weight decay 1e-4 per step on
kernels, clipping at 1.0, batch 4096, 10k warmup steps then cosine, 300 epochs, sigmoid
cross-entropy with the head bias at -6.9 (1k) / -10 (21k), inception crop + flip + RandAugment +
mixup per `augreg` setting; evaluations on ImageNet val / v2 / ReaL and few-shot linear probes as in
the published runs. `recipe=vit` is the ViT paper's upstream ImageNet / ImageNet-21k setting
(Dosovitskiy et al., 2021, Table 3 and B.1.1). Hardware for both: TPU v3/v4-256 or similar.
Expected result (published, AugReg paper Fig. 4; not measured with this code): ViT-B/16 on
ImageNet-1k, 300 epochs, medium2, about 79-80% top-1.

`recipe=plain` is big_vision's `configs/vit_s16_i1k.py` field by field (`_plain`, each field citing
its line), "Better plain ViT baselines for ImageNet-1k" (Beyer, Zhai, Kolesnikov 2022, arXiv
2205.01580): ViT-S/16 with global average pooling, a representation layer and fixed 2-D sin-cos
position embeddings (`model.posemb='sincos2d'`), batch 1024, Adam (mu in bfloat16) at lr 1e-3 with
weight decay 1e-4 per step, clipping at 1.0, 10k warmup steps then cosine, 90 epochs, inception crop
+ flip + RandAugment(2,10) + mixup 0.2, softmax cross-entropy, `train[:99%]` with the `train[99%:]`
minival and the val / v2 / ReaL evaluators. Hardware: a TPU v3-8. Published result
(vit_s16_i1k.py:16-19 and the paper; not measured with this code): 76.5% top-1 on ImageNet-1k
after 90 epochs in 6-7 h; about 80% after 300 epochs (`epochs=300`).
Large models: `--config.model.scan_layers=True --config.model.remat_policy=full` and an FSDP mesh
(`--config.mesh.fsdp=-1 --config.mesh.data=1`) or FSDP x tensor (`--config.mesh.tensor=4`).

Weight decay: `weight_decay` is big_vision's `wd` (`weight_decay_mode='decoupled'`): each step
multiplies a kernel by `1 - weight_decay * m(t)`, m(t) the schedule's multiplier (0 -> 1 over the
warmup, then the decay), independent of `lr` (big_vision/optax.py:132-149), so big_vision's
values carry over as they are (1e-4: a decay of 1e-4 per step at the peak). The ViT paper's values
are in units of the learning rate (its optimizer multiplied the decay by the lr; big_vision
configs/proj/gsam/vit_i1k_gsam_no_aug.py:86: "paper used 0.3, effective wd=0.3*lr"), so
`recipe=vit` sets paper_wd * lr (9e-4 per step at the peak on ImageNet-1k).

Compute dtype: float32 as big_vision's `vit_i1k.py` (which sets none; its ViT's matmuls default
to float32: big_vision/models/vit.py:61 `dtype_mm: str = "float32"`).
`--config.model.dtype=bfloat16` computes in bfloat16 (params and the optimizer stay float32):
faster and lighter on GPUs, not big_vision's numerics.

Arguments: model=NAME (default ViT-B_16; ViT-S_16 for plain),
dataset=imagenet2012|imagenet21k|<any>, recipe=augreg|vit|plain,
augreg=none|light1|light2|medium1|medium2|strong1|strong2 ('': big_vision's default for the model),
do=X, sd=X (AugReg's dropout / stochastic depth: 0 or 0.1 in the paper), epochs=N, batch=N
(default 4096; 1024 for plain), runlocal.
"""

from vit_jax import config

# big_vision configs/vit_i1k.py:42-60 (identical in vit_i21k.py:16-34): RandAugment (layers,
# magnitude) or None, and the mixup Beta concentration p.
AUGREG = {
  'none': (None, 0.0),
  'light1': ((2, 0), 0.0),  # vit_i1k.py:54 "Actually not nothing!": RandAugment at magnitude 0.
  'light2': ((2, 10), 0.2),
  'medium1': ((2, 15), 0.2),
  'medium2': ((2, 15), 0.5),
  'strong1': ((2, 20), 0.5),
  'strong2': ((2, 20), 0.8),
}
# Default `augreg` per variant: vit_i1k.py:77-84 and vit_i21k.py:51-58.
DEFAULT_AUG = {
  'imagenet2012': {
    'Ti/16': 'light1',
    'S/32': 'medium1',
    'S/16': 'medium2',
    'B/32': 'medium2',
    'B/16': 'medium2',
    'L/16': 'medium2',
  },
  'imagenet21k': {
    'Ti/16': 'none',
    'S/32': 'none',
    'S/16': 'light1',
    'B/32': 'light2',
    'B/16': 'light2',
    'L/16': 'medium2',
  },
}
# ViT paper Table 3 (upstream): dataset -> (epochs, base lr, decay, weight decay in units of lr,
# dropout). Batch 4096, Adam(0.9, 0.999), clipping 1, 10k warmup steps: paper B.1.1.
# The imagenet2012 row agrees with ClassyVision's paper reproduction (examples/vit/vit_b16_in.json:
# 300 epochs, lr 0.003 with cosine decay, AdamW weight decay 0.3, dropout 0.1, batch 4096).
VIT_PAPER = {
  'imagenet2012': (300, 3e-3, 'cosine', 0.3, 0.1),
  'imagenet21k': (90, 1e-3, 'linear', 0.03, 0.1),
}
# Train examples per epoch (TFDS imagenet2012; ImageNet-21k fall 2011, about 13M). Other datasets
# count epochs in ImageNet-1k examples: set --config.total_steps for them.
NUM_TRAIN = {'imagenet2012': 1_281_167, 'imagenet21k': 13_000_000}
# recipe=plain counts epochs as big_vision (@ 0127fb6) does: over its training split, `train[:99%]`
# of imagenet2012 (TFDS rounds the 99% boundary to the closest example, tensorflow_datasets
# core/splits.py `_pct_to_abs_closest`: round(0.99 * 1,281,167)), steps = round(epochs * examples /
# batch) (big_vision/utils.py:1043-1053 `steps`; train.py:168-170 and input_pipeline.py:113 pass
# the split's size).
NUM_TRAIN_99 = 1_268_355
RECIPES = ('augreg', 'vit', 'plain')
EVAL_PP = 'decode|resize_small(256,method="area")|central_crop(224)|value_range(-1,1)'


def _variant(model: str) -> str:
  """'ViT-B_16' -> 'B/16' (big_vision's names for the per-variant defaults)."""
  return model.removeprefix('ViT-').replace('_', '/')


def _vit_width(model: str) -> int | None:
  """The width of a ViT or hybrid; None for a Mixer."""
  from vit_jax import models  # Lazy: configs stay importable without JAX for parsing.

  if models.model_family(model) == 'mixer':
    return None
  return models.get_model_config(model).hidden_size


def _imagenet_evals(c, every: int, fewshot_every: int, runlocal: bool) -> None:
  """vit_i1k.py:146-164: val, v2 and ReaL (classification), few-shot linear probes."""
  one = lambda **kw: config.eval_entry(pp=EVAL_PP, every=every, **kw)
  c.evals.train = one(type='classification', split='train[:2%]')  # vit_i1k.py:156
  c.evals.minival = one(type='classification', split='train[99%:]')  # vit_i1k.py:157
  c.evals.val = one(type='classification', split='validation')  # vit_i1k.py:158
  c.evals.v2 = one(type='classification', dataset='imagenet_v2', split='test')  # :159
  c.evals.real = one(type='real', dataset='imagenet2012_real', split='validation')  # :160-161
  c.evals.fewshot = config.fewshot_entry(every=fewshot_every, runlocal=runlocal)  # :163-164


def get_config(arg: str | None = None):
  args = config.parse_arg(
    arg,
    model='',
    dataset='imagenet2012',
    recipe='augreg',
    augreg='',
    do=0.0,
    sd=0.0,
    epochs=-1,
    batch=0,
    runlocal=False,
  )
  if args.recipe not in RECIPES:
    raise ValueError(f'unknown recipe={args.recipe!r}; expected one of {", ".join(RECIPES)}')
  if args.recipe == 'plain':
    return _plain(args)
  args.model = args.model or 'ViT-B_16'
  args.batch = args.batch or 4096
  i21k = args.dataset == 'imagenet21k'
  aug = args.augreg or DEFAULT_AUG['imagenet21k' if i21k else 'imagenet2012'].get(
    _variant(args.model), 'none'
  )
  if args.recipe == 'vit':
    aug = args.augreg or 'none'
  if aug not in AUGREG:
    raise ValueError(f'unknown augreg={aug!r}; expected one of {sorted(AUGREG)}')
  randaug, mix = AUGREG[aug]
  c = config.base_config()
  c.dataset = args.dataset
  c.image_size = 224
  ra = f'|randaug({randaug[0]},{randaug[1]})' if randaug else ''
  c.pp_train = f'decode_jpeg_and_inception_crop(224)|flip_lr{ra}|value_range(-1,1)'  # i1k.py:101
  # vit_i1k.py:105, with resize_small's default method 'area' (pp/ops_image.py:108) written out;
  # ours has the same default and casts back to uint8 as big_vision's (ops_image.py:103).
  c.pp_eval = EVAL_PP
  c.mixup.p = mix  # vit_i1k.py:143
  c.batch_size = args.batch  # vit_i1k.py:91
  c.eval_batch_size = 1024
  c.optimizer = 'adamw'  # scale_by_adam + wd: vit_i1k.py:129,140; big_vision/optax.py:110-149.
  c.weight_decay_mode = 'decoupled'  # big_vision's wd: not scaled by lr (optax.py:136,143-149).
  c.b1, c.b2 = 0.9, 0.999  # optax.scale_by_adam defaults (big_vision passes none).
  c.mu_dtype = 'bfloat16'  # vit_i1k.py:130
  c.grad_clip_norm = 1.0  # vit_i1k.py:128
  c.wd_mask = 'kernels'  # big_vision/optax.py:133 default wd_mults: '.*/kernel$'.
  c.warmup_steps = 10_000  # vit_i1k.py:141
  c.log_every = 50  # vit_i1k.py:116
  c.checkpoint_every = 1000  # vit_i1k.py:117
  c.keep_checkpoints = 3
  c.shuffle_buffer = 250_000  # vit_i1k.py:93
  c.eval_splits = ''  # Evaluations are the `evals` below.
  if args.recipe == 'augreg':
    epochs = 300  # vit_i1k.py:69, vit_i21k.py:43
    c.lr = 1e-3  # vit_i1k.py:139, vit_i21k.py:95
    c.weight_decay = 1e-4  # vit_i1k.py:140, vit_i21k.py:96 (per-step decay at the peak)
    c.decay_type = 'cosine'  # vit_i1k.py:141, vit_i21k.py:97
    c.loss = 'sigmoid_xent'  # vit_i1k.py:71, vit_i21k.py:46
    dropout, droppath = args.do, args.sd  # Off in big_vision (vit_i1k.py:18); AugReg sweeps 0/0.1.
  else:
    epochs, c.lr, c.decay_type, paper_wd, dropout = VIT_PAPER.get(
      args.dataset, VIT_PAPER['imagenet2012']
    )
    c.weight_decay = paper_wd * c.lr  # The paper's decay was x lr: gsam_no_aug.py:86.
    droppath = args.sd
    # Not stated in the paper: softmax on single-label ImageNet-1k, sigmoid on multi-label 21k.
    c.loss = 'sigmoid_xent' if i21k else 'softmax_xent'
  c.end_lr_factor = 0.0
  if i21k:
    c.num_classes = 21843  # vit_i21k.py:44
    c.train_split = 'full[51200:]'  # vit_i21k.py:63
    every = 1000  # vit_i21k.py:108
    c.evals.test = config.eval_entry(type='classification', split='full[:25600]', every=every)
    c.evals.val = config.eval_entry(type='classification', split='full[25600:51200]', every=every)
    c.evals.train = config.eval_entry(
      type='classification', split='full[51200:76800]', every=every
    )  # vit_i21k.py:111-113
    c.evals.fewshot = config.fewshot_entry(every=25_000, runlocal=args.runlocal)  # :116-117
  elif args.dataset == 'imagenet2012':
    c.train_split = 'train[:99%]'  # vit_i1k.py:89
    _imagenet_evals(c, every=2500, fewshot_every=10_000, runlocal=args.runlocal)  # :152, :164
  else:  # Any other dataset: its own splits, classification on its eval split.
    c.train_split, c.eval_splits = config.default_splits(args.dataset)
  c.total_steps = (
    (args.epochs if args.epochs > 0 else epochs)
    * NUM_TRAIN.get(args.dataset, NUM_TRAIN['imagenet2012'])
    // args.batch
  )
  c.warmup_steps = min(c.warmup_steps, c.total_steps // 5)
  c.eval_every = 2500
  c.model_name = args.model
  augreg = args.recipe == 'augreg'
  c.model.update(
    dtype='float32',  # big_vision models/vit.py:61 dtype_mm='float32'; vit_i1k.py sets none.
    param_dtype='float32',
    dropout_rate=dropout,
    attention_dropout_rate=0.0,
    droppath_rate=droppath,
    scan_layers=False,
    remat_policy='none',
  )
  width = _vit_width(args.model)
  if width is not None:  # A ViT (Mixer has no classifier choice, pre-logits or head bias init).
    c.model.update(
      # AugReg: 'tok' with a pre-logits layer on 1k (vit_i1k.py:123-124); global average pooling
      # and none on 21k (vit_i21k.py:88). ViT paper: class token and pre-logits (paper sec. 3.1).
      classifier='gap' if augreg and i21k else 'token',
      representation_size=None if augreg and i21k else width,
      # Sigmoid losses start from a prior of 1/num_classes: vit_i1k.py:72 (-6.9), vit_i21k.py:45.
      # (recipe=vit: the paper states neither loss nor bias; we use big_vision's with sigmoid.)
      head_bias_init=(-10.0 if i21k else -6.9) if c.loss == 'sigmoid_xent' else 0.0,
    )

  if args.runlocal:
    _runlocal(c, dropout, droppath, ra)
  return config.finalize(c)


def _runlocal(c, dropout: float, droppath: float, ra: str) -> None:
  """The seconds-long smoke run of any recipe: 'testing' model, synthetic data, 10 steps."""
  c.model_name = 'testing'
  c.model = config.base_config().model
  c.model.update(
    dtype='float32',
    param_dtype='float32',
    dropout_rate=dropout,
    droppath_rate=droppath,
    scan_layers=True,
    remat_policy='full',
  )
  c.dataset = 'synthetic:image_size=32,num_classes=10,num_examples=256'
  c.num_classes = -1
  c.train_split, c.eval_splits = 'train', 'test'
  c.evals = config.base_config().evals
  c.pp_train = f'decode{ra}|value_range(-1,1)'
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


def _plain(args):
  """big_vision configs/vit_s16_i1k.py (cited by line below): see the module docstring."""
  c = config.base_config()
  c.seed = 0  # vit_s16_i1k.py:37
  epochs = args.epochs if args.epochs > 0 else 90  # :38 total_epochs=90 (:27: 300 for the long run)
  c.num_classes = -1  # :39 1000: the dataset's (imagenet2012).
  c.loss = 'softmax_xent'  # :40
  c.dataset = args.dataset  # :44
  c.train_split = 'train[:99%]'  # :45
  c.batch_size = args.batch or 1024  # :47
  c.cache_data = True  # :48 cache_raw (the encoded JPEGs: its "up to 120GB of RAM")
  c.shuffle_buffer = 250_000  # :49
  c.image_size = 224
  # :56-59 with :52; the label ops of :53-54 are ours implicitly (vit_jax/losses.py `targets`).
  ra = '|randaug(2,10)'
  c.pp_train = f'decode_jpeg_and_inception_crop(224)|flip_lr{ra}|value_range(-1,1)'
  # :60, with resize_small's default method 'area' (big_vision pp/ops_image.py:108) written out.
  c.pp_eval = EVAL_PP
  c.log_every = 50  # :65
  c.checkpoint_every = 1000  # :66
  c.keep_checkpoints = 3
  c.model_name = args.model or 'ViT-S_16'  # :69-71 vit, variant='S/16'
  width = _vit_width(c.model_name)
  c.model.update(
    dtype='float32',  # big_vision models/vit.py:61 dtype_mm='float32'; vit_s16_i1k.py sets none.
    param_dtype='float32',
    classifier='gap',  # :73 pool_type='gap'
    representation_size=width,  # :72 rep_size=True: a pre-logits layer of the width (vit.py:260)
    posemb='sincos2d',  # :74
    dropout_rate=args.do,  # big_vision ViT dropout=0.0 (models/vit.py), the config sets none.
    attention_dropout_rate=0.0,
    droppath_rate=args.sd,
    head_bias_init=0.0,  # No init_head_bias in the config; head kernel zero (vit.py:199, :271).
    scan_layers=False,
    remat_policy='none',
  )
  c.grad_clip_norm = 1.0  # :78
  c.optimizer = 'adamw'  # :79 scale_by_adam, with :83 wd: big_vision/optax.py:110-149.
  c.weight_decay_mode = 'decoupled'  # big_vision's wd: not scaled by lr (optax.py:136,143-149).
  c.b1, c.b2 = 0.9, 0.999  # optax.scale_by_adam defaults (:80 passes only mu_dtype).
  c.mu_dtype = 'bfloat16'  # :80
  c.wd_mask = 'kernels'  # big_vision/optax.py:133 default wd_mults: '.*/kernel$'.
  c.lr = 0.001  # :82 (not scaled by the batch: big_vision uses config.lr as it is)
  c.weight_decay = 0.0001  # :83 (per step at the peak; test_recipe_updates.py shows the update)
  c.warmup_steps = 10_000  # :84
  c.decay_type = 'cosine'  # :84
  c.end_lr_factor = 0.0  # big_vision/utils.py create_learning_rate_schedule: linear_end=0.
  c.mixup.p = 0.2  # :86 (fold_in=None: one mixing ratio for the whole batch, as ours)
  c.eval_batch_size = 1024
  c.eval_splits = ''  # Evaluations are the `evals` below.
  c.eval_every = 2500
  if args.dataset == 'imagenet2012':
    c.total_steps = round(epochs * NUM_TRAIN_99 / c.batch_size)  # :38 over :45's examples.
    one = lambda **kw: config.eval_entry(pp=EVAL_PP, every=2500, **kw)  # :93 pp_fn, :95 log_steps
    c.evals.train = one(type='classification', split='train[:2%]')  # :98
    c.evals.minival = one(type='classification', split='train[99%:]')  # :99
    c.evals.val = one(type='classification', split='validation')  # :100
    c.evals.v2 = one(type='classification', dataset='imagenet_v2', split='test')  # :101
    c.evals.real = one(type='real', dataset='imagenet2012_real', split='validation')  # :102-103
  else:  # Any other dataset: its own splits, classification on its eval split.
    c.train_split, c.eval_splits = config.default_splits(args.dataset)
    c.total_steps = epochs * NUM_TRAIN['imagenet2012'] // c.batch_size
  c.warmup_steps = min(c.warmup_steps, c.total_steps // 5)
  if args.runlocal:
    _runlocal(c, args.do, args.sd, ra)
    # The plain model's options on the 'testing' encoder (sincos2d needs a width divisible by 4).
    c.model.update(classifier='gap', hidden_size=16, representation_size=16, posemb='sincos2d')
  return config.finalize(c)
