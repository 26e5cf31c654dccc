"""What `python -m vit_jax.predict` and `python -m vit_jax.export` share: quiet libraries, one-line
errors.

A user's mistake (an unknown model, a missing or mismatched checkpoint, an unreadable image, an
output folder that cannot be written, a missing extra) ends in one line on stderr,
`error: ...`, and exit status 2; `--verbose` prints the traceback too. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import shlex
import sys
import threading
import traceback
import warnings

USAGE_ERROR = 2


class UserError(Exception):
  """A mistake in the command's arguments or inputs, reported in one line."""


# Lines that TensorFlow's and XLA's C++ code writes straight to the stderr file descriptor while
# absl logging is uninitialized, whatever TF_CPP_MIN_LOG_LEVEL says: its INFO lines (the oneDNN
# notice, once per loaded library; "Compiled cluster using XLA!"; the CPU feature guard and its
# second line) and the failed CUDA probe of the `tensorflow` wheel on a machine without a GPU.
NATIVE_NOISE = re.compile(
  r'^(WARNING: All log messages before absl::InitializeLog\(\) is called'
  r'|I\d{4} [\d:. ]+\d+ [\w./-]+:\d+\] '
  r'|To enable the following instructions: .* rebuild TensorFlow'
  r'|\S+ \S+: E \S*cuda_platform\.cc:\d+\] failed call to cuInit'
  r'|E\d{4} [\d:. ]+\d+ \S*cuda_platform\.cc:\d+\] failed call to cuInit)'
)


def quiet() -> None:
  """Silences library chatter that is not ours to act on; call before TensorFlow is imported.

  A `TF_CPP_MIN_LOG_LEVEL` set by the user wins. Real warnings (UserWarning, WARNING logs of our
  code) still show. What TensorFlow writes natively before its log level applies is filtered
  line by line by `run` (NATIVE_NOISE).
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TQDM_DISABLE', '1')
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  warnings.filterwarnings('ignore', category=FutureWarning)
  warnings.filterwarnings('ignore', category=DeprecationWarning)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  for name in ('absl', 'tensorflow', 'orbax', 'tensorflow_datasets'):
    logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def filtered_stderr(pattern: re.Pattern = NATIVE_NOISE):
  """Routes file descriptor 2 through a filter that drops lines matching `pattern`.

  Native libraries write to the descriptor, not to `sys.stderr`, so only this catches them.
  Everything else (our lines, Python warnings, tracebacks) passes through unchanged.
  """
  sys.stderr.flush()
  try:
    real = os.dup(2)
    read, write = os.pipe()
  except OSError:  # No descriptor 2 to filter (embedded interpreters): leave it alone.
    yield
    return
  os.dup2(write, 2)
  os.close(write)

  sink_fd = os.dup(real)  # The pump's own copy: `real` is closed when the body ends.

  def pump():
    with os.fdopen(read, 'rb') as source, os.fdopen(sink_fd, 'wb', buffering=0) as sink:
      for line in source:
        if not pattern.match(line.decode('utf-8', 'replace')):
          sink.write(line)

  thread = threading.Thread(target=pump, name='stderr-filter', daemon=True)
  thread.start()
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(real, 2)  # Closes the pipe's last write end: the pump sees the end and finishes.
    os.close(real)
    thread.join(timeout=5)


def check_model_name(name: str | None) -> None:
  """Raises UserError for an unregistered model name, with the closest registered names."""
  if name is None:
    return
  from vit_jax import models

  known = list(models.MODEL_CONFIGS)
  if name in known:
    return
  by_lower = {k.lower(): k for k in known}
  close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)
  hint = f'did you mean {" or ".join(repr(by_lower[c]) for c in close)}? ' if close else ''
  raise UserError(
    f'unknown model {name!r}; {hint}{shlex.quote(sys.executable)} -m vit_jax.main '
    f'--list_models lists all {len(known)} registered names'
  )


def one_line(e: BaseException) -> str:
  """The user-facing line for an error: its message, multi-line reports shortened to one."""
  from vit_jax import npz

  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  if isinstance(e, npz.CheckpointMismatchError) and len(lines) > 1:
    head = lines[0].rstrip(':')
    return (  # The head names the first mismatch, both shapes and the variant that fits.
      f'{head}; is it a checkpoint of another model (--model, patch size, classifier)? '
      '--verbose lists every difference'
    )
  text = lines[0] if len(lines) == 1 else f'{lines[0]} {lines[1]}'.rstrip(':')
  if len(lines) > 2:
    text += ' ... (--verbose for the rest)'
  return text


USER_ERRORS = (ValueError, OSError, ImportError)  # Raised by loading, reading, writing.


def add_verbose(parser) -> None:
  parser.add_argument(
    '--verbose', action='store_true', help='print the traceback of an error, not just its line'
  )


def add_weights(parser) -> None:
  """--weights=ema|raw: which weights of a training workdir (default: its EMA when it kept one)."""
  parser.add_argument(
    '--weights',
    choices=('ema', 'raw'),
    default=None,
    help="a workdir's weight EMA or raw params (default: the EMA when the run kept one)",
  )


def run(main, argv: list[str] | None, *, user_errors=USER_ERRORS) -> int:
  """Runs `main(argv) -> int | None`, turning user errors into one line and exit status 2.

  `--verbose` (anywhere in argv; `main`'s parser declares it) also prints the traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = '--verbose' in argv
  from vit_jax import npz

  caught = (UserError, npz.CheckpointMismatchError, *user_errors)
  with filtered_stderr():
    try:
      return main(argv) or 0
    except caught as e:
      if verbose:
        traceback.print_exc()
      print(f'error: {one_line(e)}', file=sys.stderr)
      return USAGE_ERROR
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      return 130
