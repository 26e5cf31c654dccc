r"""Fine-tuning a published checkpoint: the ViT paper's recipe (Dosovitskiy et al., 2021, B.1.1).

    python -m vit_jax.main --config=finetune:model=ViT-B_16,dataset=cifar10 \
        --workdir workdirs/vit_b16_cifar10 \
        --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz

The original project's fine-tuning (vision_transformer vit_jax/configs/common.py, vit.py; each field
below cites its line): SGD with momentum 0.9 (bfloat16), no weight decay, global-norm clipping at
1.0, batch 512, resolution 384, linear warmup (500 steps) then cosine decay, the paper's steps per
dataset (Table 4) and learning rate 0.03 (0.01 for ViT-B/16 on CIFAR-10). Hardware: a TPU v3-8 /
8 GPUs or more (any mesh: `--config.mesh.*`). Expected result (published, not measured with this
code: no accelerator time for a full run so far): ViT-B/16 from ImageNet-21k on CIFAR-10 at 384
reaches about 99% top-1 in the original project's fine-tunes. Any registered model and dataset
work; the head is replaced with one of the dataset's classes and the position embeddings resized.

Arguments: model=NAME (registered), dataset=NAME (TFDS or digits/folder:...), steps=N, lr=X,
res=N (resolution), batch=N, runlocal (seconds on a CPU: tiny model, synthetic data).
"""

from vit_jax import config

# dataset -> (total steps, train split, eval split). Steps: ViT paper Table 4 and the original
# project's presets (vision_transformer vit_jax/configs/common.py:85-107); its held-out parts of
# the train splits (2% CIFAR, 1% ImageNet) are left out of training as there.
DATASET_PRESETS = {
  'cifar10': (10_000, 'train[:98%]', 'test'),  # common.py:87-91
  'cifar100': (10_000, 'train[:98%]', 'test'),  # common.py:94-98
  'imagenet2012': (20_000, 'train[:99%]', 'validation'),  # common.py:101-105
  'oxford_iiit_pet': (500, 'train', 'test'),  # ViT paper Table 4: 500 steps.
  'oxford_flowers102': (500, 'train+validation', 'test'),  # Table 4: 500 steps.
}


def get_config(arg: str | None = None):
  args = config.parse_arg(
    arg, model='ViT-B_16', dataset='cifar10', steps=-1, lr=-1.0, res=384, batch=512, runlocal=False
  )
  kind = args.dataset.split(':')[0]
  train_split, eval_split = config.default_splits(args.dataset)  # Any dataset: its own splits.
  steps, train_split, eval_split = DATASET_PRESETS.get(kind, (10_000, train_split, eval_split))
  # common.py:64 base_lr 0.03; vit.py:35-36 0.01 for b16 on cifar10.
  lr = 0.01 if (args.model, kind) == ('ViT-B_16', 'cifar10') else 0.03
  c = config.base_config()
  c.model_name = args.model
  c.model.update(
    dtype='float32',
    param_dtype='float32',
    dropout_rate=0.0,  # augreg.py:54 "No AugReg during fine-tuning".
    attention_dropout_rate=0.0,
    droppath_rate=0.0,
    scan_layers=False,
    remat_policy='none',
  )
  c.pretrained_path = ''  # --config.pretrained_path=.../ViT-B_16.npz or a workdir of ours.
  c.dataset = args.dataset
  c.train_split = train_split
  c.eval_splits = eval_split
  c.image_size = args.res  # common.py:91 crop 384.
  # vision_transformer input_pipeline.py:197-214: train = inception crop (area 5-100%) resized to
  # the crop size + random flip; test = resize to the crop size; both (x - 127.5) / 127.5.
  c.pp_train = f'decode_jpeg_and_inception_crop({args.res})|flip_lr|value_range(-1,1)'
  c.pp_eval = f'decode|resize({args.res})|value_range(-1,1)'
  c.batch_size = args.batch  # common.py:48
  c.eval_batch_size = args.batch  # common.py:50
  c.shuffle_buffer = 50_000  # common.py:52
  c.total_steps = args.steps if args.steps > 0 else steps
  c.optimizer = 'sgd'  # ViT paper B.1.1: SGD with momentum 0.9.
  c.momentum = 0.9
  c.mu_dtype = 'bfloat16'  # common.py:43 optim_dtype.
  c.lr = args.lr if args.lr > 0 else lr
  # common.py:68 (500); the 500-step recipes warm up for 100 steps as augreg.py:58-59.
  c.warmup_steps = min(500, max(c.total_steps // 5, 1))
  c.decay_type = 'cosine'  # common.py:66
  c.grad_clip_norm = 1.0  # common.py:41
  c.weight_decay = 0.0  # ViT paper B.1.1: no weight decay when fine-tuning.
  c.log_every = 10  # common.py:56 progress_every.
  c.eval_every = 100  # common.py:54
  c.checkpoint_every = 1000  # common.py:58
  if kind in ('digits', 'synthetic'):  # Not JPEGs and tiny: a plain resize.
    c.pp_train = f'decode|resize({args.res})|value_range(-1,1)'
  if args.runlocal:
    c.model_name = 'testing'
    c.dataset = 'synthetic:image_size=32,num_classes=10,num_examples=256'
    c.train_split, c.eval_splits = 'train', 'test'
    c.pp_train = c.pp_eval = 'value_range(-1,1)'
    c.image_size = 32
    c.batch_size = c.eval_batch_size = 16
    c.total_steps = args.steps if args.steps > 0 else 10
    c.warmup_steps = min(2, c.total_steps)
    c.log_every = 1
    c.eval_every = 5
    c.checkpoint_every = 4
    c.shuffle_buffer = 64
    c.mu_dtype = ''
  return config.finalize(c)
