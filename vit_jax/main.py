r"""Command line: `python -m vit_jax.main --config configs/<recipe>.py[:args] --workdir DIR`.

    python -m vit_jax.main --config configs/quickstart.py --workdir workdirs/quickstart
    python -m vit_jax.main --config configs/finetune.py:model=ViT-B_16,dataset=cifar10 \
        --workdir gs://bucket/ft --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz

Any config field can be overridden (`--config.batch_size=256`, `--config.mesh.fsdp=8`); the config
is locked, so a misspelt field is an error. A workdir holding a checkpoint resumes from it.

Multi-host: on Cloud TPU pod slices and under SLURM (`srun`), `jax.distributed.initialize()` detects
the cluster by itself; `--coordinator_address`, `--num_processes` and `--process_id` set it
explicitly (e.g. several CPU processes on one machine). `--distributed=off` never initializes it.
Exit status: 0 on success and on preemption (SIGTERM: checkpointed), 1 on divergence (NaN/Inf).
"""

from __future__ import annotations

import logging as pylogging
import os
import shlex
import sys

# TensorFlow only feeds the input pipeline. Before it is imported: no INFO lines from its C++
# runtime (oneDNN's "custom operations are on" note), and TensorFlow's own kernels rather than
# oneDNN's (whose "DT_INT32 only with AVX-512" fallback note is logged as an error). Both can be
# overridden from the environment.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file[:args].', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.')
flags.DEFINE_enum(
  'distributed',
  'auto',
  ['auto', 'on', 'off'],
  'jax.distributed: auto = when flags or a TPU pod / SLURM job step say so.',
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-process runs).')
flags.DEFINE_integer(
  'local_device_count', None, 'CPU only: number of simulated devices in this process (for testing).'
)
flags.mark_flags_as_required(['config', 'workdir'])


def _cluster_detected() -> bool:
  """A multi-process environment that `jax.distributed.initialize()` can configure by itself."""
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_STEP_ID' in os.environ:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if ',' in hosts or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  return bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))


def initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` when asked to or when a cluster is detected."""
  import jax

  explicit = FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
  if FLAGS.distributed == 'off' or (
    FLAGS.distributed == 'auto' and not explicit and not _cluster_detected()
  ):
    return
  kwargs = {}
  if FLAGS.coordinator_address:
    kwargs['coordinator_address'] = FLAGS.coordinator_address
  if FLAGS.num_processes is not None:
    kwargs['num_processes'] = FLAGS.num_processes
  if FLAGS.process_id is not None:
    kwargs['process_id'] = FLAGS.process_id
  # Cross-process collectives between CPU devices (tests on localhost) go through gloo; this does
  # not touch accelerator backends. Set before the backend starts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)


def resume_command(argv: list[str]) -> str:
  """This run's command line with `--config.total_steps=<more steps>`: the same recipe, arguments
  (`configs/finetune.py:dataset=folder:...`) and overrides, so the run resumes as it was."""
  args, skip = [], False
  for a in argv[1:]:
    if skip or a.startswith('--config.total_steps='):
      skip = False
      continue
    if a == '--config.total_steps':
      skip = True
      continue
    args.append(shlex.quote(a))
  return ' '.join(['python -m vit_jax.main', *args, '--config.total_steps=<more steps>'])


def _summary(result: dict, workdir: str) -> str:
  lines = ['', '=' * 72]
  if result.get('preempted'):
    lines.append(
      f'Preempted: checkpointed step {result["step"]}; rerun the same command to resume.'
    )
  else:
    lines.append(f'Training finished at step {result["step"]}.')
  for key in sorted(result):
    if key.startswith('eval/') and key.endswith('/accuracy'):
      lines.append(f'  {key.split("/")[1]} accuracy: {result[key]:.2%}')
  lines.append(f'  checkpoint: {result["checkpoint_dir"]}')
  lines.append(
    f'  metrics:    {os.path.join(workdir, "metrics.jsonl")} (TensorBoard, installed with '
    f'vit_jax: tensorboard --logdir {os.path.join(workdir, "tensorboard")})'
  )
  lines += [
    'Next:',
    f'  continue training:  {resume_command(sys.argv)}',
    '  fine-tune ViT-B/16: python -m vit_jax.main --config configs/finetune.py:model=ViT-B_16,'
    'dataset=cifar10 --workdir workdirs/ft --config.pretrained_path=ViT-B_16.npz',
    '  run the tests:      make test',
    '=' * 72,
  ]
  return '\n'.join(lines)


class _QuietLibraries:
  """Drops chatter that is not ours to act on; our progress and real warnings still show.

  INFO from orbax, TensorFlow and TFDS; TFDS's deprecation warnings about its own internals
  (`TensorInfo.dtype is deprecated`, once per feature and split); JAX's probe for a TPU runtime
  on machines without one (`Unable to initialize backend 'tpu'`).
  """

  def filter(self, record) -> bool:
    path = record.pathname
    libs = ('orbax', 'tensorflow', 'tensorflow_datasets')
    noisy = any(f'{os.sep}{lib}{os.sep}' in path for lib in libs)
    if record.levelno < pylogging.WARNING:
      return not noisy and not record.getMessage().startswith('Unable to initialize backend')
    tfds = f'{os.sep}tensorflow_datasets{os.sep}' in path
    return not (tfds and 'is deprecated' in record.getMessage())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  if FLAGS.local_device_count:
    import jax

    jax.config.update('jax_num_cpu_devices', FLAGS.local_device_count)
  initialize_distributed()
  import jax

  from vit_jax import train

  config = FLAGS.config
  workdir = FLAGS.workdir
  logging.info(
    'JAX %s, process %d/%d, %d local / %d global devices (%s)',
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  try:
    result = train.train_and_evaluate(config, workdir)
  except train.TrainingDivergedError as e:
    logging.error('%s', e)
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print(_summary(result, workdir), flush=True)


if __name__ == '__main__':
  app.run(main)
