r"""Command line: `python -m vit_jax.main --config=<recipe>[:args] --workdir DIR`.

    python -m vit_jax.main --config=quickstart --workdir workdirs/quickstart
    python -m vit_jax.main --config=finetune:model=ViT-B_16,dataset=cifar10 \
        --workdir gs://bucket/ft --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz

`--config` takes an installed recipe by name (`quickstart`, `finetune`, `pretrain`, from any
directory: `vit_jax.configs`) or a path to a recipe file (`configs/quickstart.py`, `mine.py`). Any
config field can be overridden (`--config.batch_size=256`, `--config.mesh.fsdp=8`); the config
is locked, so a misspelt field is an error, and `vit_jax.config.validate` checks the values before
any data is prepared. A workdir holding a checkpoint resumes from it.

Multi-host: on Cloud TPU pod slices and under SLURM (`srun`), `jax.distributed.initialize()` detects
the cluster by itself; `--coordinator_address`, `--num_processes` and `--process_id` set it
explicitly (e.g. several CPU processes on one machine). `--distributed=off` never initializes it.
Each process of a multi-process run trains in a child of a supervising parent (`supervise.py`),
so that a lost coordinator (process 0) ends the others with one `ERROR:` line, not a C++ dump.
Exit status: 0 on success and on preemption (SIGTERM at any moment: the step reached checkpointed
if one ran since the last checkpoint, the workdir lock released), 1 on divergence (NaN/Inf,
loss spike), a failed save, a lost peer or a refused resume, 2 on a mistake in the command line or
config. Errors are one line (`ERROR: ...`); `--verbose` or VIT_JAX_VERBOSE=1 adds the traceback.

    python -m vit_jax.main --config=quickstart --print_config   # resolved config
    python -m vit_jax.main --list_models                       # names, parameter counts
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings

# TensorFlow only feeds the input pipeline. Before it is imported: no INFO lines from its C++
# runtime (oneDNN's "custom operations are on" note), and TensorFlow's own kernels rather than
# oneDNN's (whose "DT_INT32 only with AVX-512" fallback note is logged as an error). Both can be
# overridden from the environment.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Recipe name or file, [:args] (quickstart:runlocal).', lock_config=True
)
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
flags.DEFINE_bool('verbose', False, 'Show tracebacks with errors (or VIT_JAX_VERBOSE=1).')
flags.DEFINE_bool('print_config', False, 'Print the resolved config and exit.')
flags.DEFINE_bool('list_models', False, 'List the registered models with parameter counts; exit.')


def _verbose(argv=()) -> bool:
  if os.environ.get('VIT_JAX_VERBOSE', '') not in ('', '0'):
    return True
  try:
    return bool(FLAGS.verbose)
  except flags.UnparsedFlagAccessError:
    return '--verbose' in argv


def _fail(message: str, code: int, argv=()) -> None:
  """Prints `ERROR: message` as one line (after the traceback only when verbose) and exits.

  Code 2: a mistake in the command line or config; 1: a failure while running.
  """
  notes = []
  if _verbose(argv):
    traceback.print_exc()
  elif code != 2 and sys.exc_info()[0]:
    notes.append('--verbose shows the traceback')
  if _LIBRARY_ERRORS.count:
    notes.append(f'{_LIBRARY_ERRORS.count} library tracebacks in {_LIBRARY_ERRORS.path}')
  note = f' ({"; ".join(notes)})' if notes else ''
  if message.endswith('rerun the same command to resume.'):  # The command comes last.
    message = f'{message[:-1]}{note}: {rerun_command(sys.argv)}'
  else:
    message += note
  print(f'ERROR: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.exit(code)


def _preempted_before_training(signum=signal.SIGTERM, frame=None) -> None:
  """SIGTERM before the run holds its workdir, or after it is done: nothing to save; exit 0."""
  del frame
  print(
    f'Stopped by signal {signum} before training began or after it ended: nothing to checkpoint; '
    f'rerun the same command to resume: {rerun_command(sys.argv)}',
    flush=True,
  )
  raise SystemExit(0)


def _lost_peer(e: BaseException) -> None:
  """Reports a failed cross-process collective in one line and exits 1 at once."""
  from vit_jax import guards

  if _verbose():
    traceback.print_exc()
  cause = ' '.join(str(e).split())[:200]
  lost = 'the coordinator (process 0)' if guards.coordinator_lost() else 'a peer'
  guards.exit_lost_peer(
    f'lost {lost}: a collective failed ({cause}); restart every process with the same command to '
    'resume from the last checkpoint'
  )


def _runtime_error_in(e: BaseException | None) -> BaseException | None:
  """The JAX runtime error (a collective or coordination-service call) in `e`'s chain, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if type(e).__name__ in ('JaxRuntimeError', 'XlaRuntimeError'):
      return e
    e = e.__cause__ or e.__context__
  return None


def _parse_flags(argv):
  """absl's parsing, with each mistake explained in one line (unknown field, wrong type...)."""
  from vit_jax import preflight

  try:
    args = FLAGS(preflight.recipe_argv(argv))  # A recipe by name: the installed file.
    if FLAGS.config is not None:
      FLAGS.config.get('model_name')  # A recipe that failed to load raises only when first used.
    return args
  except Exception as e:  # flags.Error, errors of the recipe's get_config, an unknown recipe.
    _fail(preflight.explain_flags_error(argv[1:], e), 2, argv)


def initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` when asked to or when a cluster is detected."""
  import jax

  from vit_jax import supervise

  explicit = FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
  if FLAGS.distributed == 'off' or (
    FLAGS.distributed == 'auto' and not explicit and not supervise.cluster_detected()
  ):
    return
  # `guards.PeerWatchdog` notices a lost peer within the config's heartbeat and exits in one
  # line; JAX's own heartbeat (it aborts with a C++ dump) is the backstop at four times that, far
  # enough behind that the watchdog reports first.
  heartbeat = int(FLAGS.config.get('distributed_heartbeat_seconds', 50))
  # Cross-process collectives between CPU devices (tests on localhost) go through gloo; this does
  # not touch accelerator backends. Set before the backend starts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=FLAGS.coordinator_address or None,
    num_processes=FLAGS.num_processes,
    process_id=FLAGS.process_id,
    heartbeat_timeout_seconds=4 * heartbeat,
  )


def _summary(result: dict, workdir: str, argv=None) -> str:
  """The end-of-run box: where things are, and what to run next.

  After a preemption the next command is the same command: a changed `total_steps` would end the
  run early and change its learning-rate schedule. Only a finished run is offered more steps.
  """
  argv = sys.argv if argv is None else argv
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
  if _LIBRARY_ERRORS.count:
    lines.append(f'  library tracebacks (orbax, TensorStore): {_LIBRARY_ERRORS.path}')
  python = shlex.quote(sys.executable)  # The interpreter that ran this: its venv has vit_jax.
  run = shlex.quote(workdir)
  lines.append('Next:')
  if result.get('preempted'):
    lines.append(f'  resume (the same command): {rerun_command(argv)}')
  else:
    lines += [
      f'  classify images:    {python} -m vit_jax.predict --checkpoint {run} IMAGE_OR_FOLDER',
      f'  export (onnx, hf, saved_model, npz): {python} -m vit_jax.export --checkpoint {run} '
      f'--format onnx --out {shlex.quote(os.path.join(workdir, "export", "onnx"))}',
      f'  train longer (a new schedule over {2 * result["step"]} steps): '
      f'{continue_command(argv, 2 * result["step"])}',
    ]
  lines += [
    f'  fine-tune ViT-B/16: {python} -m vit_jax.main --config=finetune:model=ViT-B_16,'
    'dataset=cifar10 --workdir workdirs/ft --config.pretrained_path=ViT-B_16.npz',
    '=' * 72,
  ]
  return '\n'.join(lines)


def rerun_command(argv) -> str:
  """The user's own command line, with this interpreter (to resume after a stop)."""
  return shlex.join([sys.executable, '-m', 'vit_jax.main', *argv[1:]])


def continue_command(argv, total_steps: int) -> str:
  """The user's own command line with `--config.total_steps` set to `total_steps`."""
  flag = '--config.total_steps'  # `--flag=N`, or `--flag N` (the value follows).
  args = [
    arg
    for before, arg in zip(['', *argv[1:]], argv[1:])
    if flag not in (before, arg) and not arg.startswith(f'{flag}=')
  ]
  return rerun_command(['', *args, f'{flag}={total_steps}'])


def list_models() -> str:
  """Registered model names with parameter counts (1000 classes, 224x224)."""
  from vit_jax import models

  lines = [f'{"model":<22} {"parameters":>15}']
  for name in models.MODEL_CONFIGS:
    # Scanned: one block traced instead of `depth` (the same parameters, stacked).
    scan = {} if 'hidden_dim' in models.MODEL_CONFIGS[name] else {'scan_layers': True}
    count = models.count_params(models.abstract_model(name, 1000, **scan))
    lines.append(f'{name:<22} {count:>15,}')
  return '\n'.join(lines)


class _QuietLibraries:
  """Drops chatter that is not ours to act on (INFO of orbax, TensorFlow and TFDS, TFDS's
  deprecation warnings about its own internals, JAX's probe for a TPU runtime); our progress and
  real warnings still show."""

  def filter(self, record) -> bool:
    path = record.pathname
    libs = ('orbax', 'tensorflow', 'tensorflow_datasets')
    noisy = any(f'{os.sep}{lib}{os.sep}' in path for lib in libs)
    if record.levelno < pylogging.WARNING:
      return not noisy and not record.getMessage().startswith('Unable to initialize backend')
    tfds = f'{os.sep}tensorflow_datasets{os.sep}' in path
    if tfds and 'is deprecated' in record.getMessage():
      return False
    # Orbax looks for a step-level file in every item of a healthy checkpoint: not damage.
    return not (noisy and record.getMessage().startswith('Metadata file does not exist'))


class _LibraryErrors:
  """Tracebacks of libraries' background work go to a file that the run's last line names.

  After a failed save or while reading a damaged checkpoint, orbax's asyncio tasks and
  TensorStore's callbacks on a closed event loop report hundreds of lines; the run's own one-line
  message names the cause. The file is `library-errors-<time>.log` in the workdir, or in the
  temporary directory when the workdir is remote or cannot be written (a full disk).
  """

  def __init__(self):
    self.workdir = None
    self.path = None
    self.count = 0
    self._file = None
    self._lock = threading.RLock()  # A finalizer may report an unraisable while we write.

  def install(self, workdir: str, handler) -> None:
    self.workdir = workdir
    sys.unraisablehook = self._unraisable
    threading.excepthook = self._thread_exception
    self._showwarning = warnings.showwarning
    warnings.showwarning = self._warning
    handler.addFilter(self)

  def _write(self, text: str) -> None:
    with self._lock:
      self.count += 1
      name = f'library-errors-{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}.log'
      places = [tempfile.gettempdir()]
      if self.workdir and '://' not in self.workdir:
        places.insert(0, self.workdir)
      while True:
        if self._file is None:
          if not places:
            return
          try:
            self.path = os.path.join(places.pop(0), name)
            self._file = open(self.path, 'a')  # noqa: SIM115 (open for the run)
          except OSError:
            continue
        try:
          self._file.write(text.rstrip('\n') + '\n')
          self._file.flush()
          return
        except OSError:  # A full disk: the next place.
          self._file = None

  def _unraisable(self, unraisable) -> None:
    text = ''.join(
      traceback.format_exception(
        unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback
      )
    )
    self._write(f'{unraisable.err_msg or "Exception ignored in"}: {unraisable.object!r}\n{text}')

  def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
    # Orbax's write coroutines left behind by a failed save, reported at exit.
    if issubclass(category, RuntimeWarning) and 'was never awaited' in str(message):
      self._write(warnings.formatwarning(message, category, filename, lineno, line))
    else:
      self._showwarning(message, category, filename, lineno, file, line)

  def _thread_exception(self, args) -> None:
    if args.thread is not None and args.thread.name in _OUR_THREADS:
      threading.__excepthook__(args)  # A bug of ours: on the console.
      return
    if args.exc_type is SystemExit:
      return
    text = ''.join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    name = args.thread.name if args.thread else '?'
    self._write(f'Exception in thread {name}:\n{text}')

  def filter(self, record) -> bool:
    ours = f'{os.sep}vit_jax{os.sep}' in record.pathname
    if ours or record.levelno < pylogging.ERROR:
      return True
    if record.exc_info or record.exc_text or '\n' in record.getMessage():
      self._write(pylogging.Formatter().format(record))
      return False
    return True


_LIBRARY_ERRORS = _LibraryErrors()
_OUR_THREADS = ('workdir-lock', 'peer-watchdog', 'coordinator-probe')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}: every option is --name=value', 2)
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())  # Before JAX starts.
  if FLAGS.list_models:
    print(list_models())
    return
  if FLAGS.config is None:
    _fail('--config is required, e.g. --config=quickstart', 2)
  from vit_jax import config as config_lib
  from vit_jax import preflight

  if FLAGS.print_config:
    print(preflight.to_yaml(FLAGS.config))
    return
  if not FLAGS.workdir:
    _fail('--workdir is required (a local directory or gs:// path; it resumes if it holds one)', 2)
  _LIBRARY_ERRORS.install(FLAGS.workdir, logging.get_absl_handler().python_handler)
  if FLAGS.local_device_count:
    import jax

    jax.config.update('jax_num_cpu_devices', FLAGS.local_device_count)
  initialize_distributed()
  import jax

  from vit_jax import guards, train, train_state

  config = FLAGS.config
  workdir = FLAGS.workdir
  try:
    config_lib.validate(config, workdir)  # Every config mistake, before any data is prepared.
  except config_lib.ConfigError as e:
    _fail(str(e), 2)
  watchdog = guards.PeerWatchdog(
    float(config.get('distributed_heartbeat_seconds', 0)), workdir
  ).start()
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
  except train_state.Preempted:
    print(
      'Preempted during start-up, before the first step: nothing new to checkpoint; rerun the '
      f'same command to resume: {rerun_command(sys.argv)}',
      flush=True,
    )
    # The lock is released and nothing is being written: exit without the interpreter's
    # finalization, which can abort (SIGABRT) while native threads of a restore cut short by the
    # signal are still running.
    logging.flush()
    sys.stderr.flush()
    os._exit(0)
  except Exception as e:
    if jax.process_count() > 1 and (lost := _runtime_error_in(e)) is not None:
      # A collective (or a checkpoint barrier) whose peer is gone fails before the watchdog sees.
      _lost_peer(lost)
    if isinstance(e, config_lib.ConfigError):
      _fail(str(e), 2)
    if isinstance(
      e, (train.TrainingDivergedError, train_state.CheckpointError, preflight.UserError)
    ):
      _fail(str(e), 1)  # Once: not logged as well.
    if isinstance(e, (ValueError, TypeError, OSError)):  # Bad input met while running: data, files.
      _fail(f'{type(e).__name__}: {e}', 1)
    if not _is_input_error(e):
      raise
    _fail(_input_error_message(e, config), 1)
  watchdog.stop()  # Peers that finish first stop answering: that is no longer a loss.
  if jax.process_index() == 0:
    print(_summary(result, workdir), flush=True)


def _input_error_message(e: Exception, config) -> str:
  """A data error raised by TensorFlow while training, with the dataset named and the fix."""
  text = re.sub(r'\{\{function_node [^}]*\}\}|\[Op:\w+\]( name: \S*)?', '', str(e))
  where = config.get('data_dir') or '~/tensorflow_datasets'
  return (
    f'reading dataset {config.get("dataset")!r} failed: {type(e).__name__}: {text.strip()}. A '
    f'record or image in its prepared files (under {where}) is damaged: prepare the dataset '
    'again (delete its directory there first) or restore the files, then rerun to resume'
  )


def _is_input_error(e: Exception) -> bool:
  """TensorFlow's errors about the data (a corrupt image, a truncated record)."""
  return type(e).__module__.startswith('tensorflow') and type(e).__name__ in (
    'InvalidArgumentError',
    'DataLossError',
  )


if __name__ == '__main__':
  from vit_jax import supervise

  # One process of several runs under a supervising parent (vit_jax/supervise.py), which turns
  # JAX's abort on a lost coordinator into one line; the child trains.
  if supervise.wanted(sys.argv[1:]):
    sys.exit(supervise.run(sys.argv[1:]))
  supervise.exit_when_orphaned()
  # SIGTERM before the training loop holds the workdir (imports, distributed set-up, checks):
  # nothing to save, exit 0. `train.train_and_evaluate` installs its own handler while it runs.
  signal.signal(signal.SIGTERM, _preempted_before_training)
  app.run(main, flags_parser=_parse_flags)
