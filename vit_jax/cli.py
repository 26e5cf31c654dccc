"""What `python -m vit_jax.predict` and `python -m vit_jax.export` share: quiet libraries, one-line
errors.

A user's mistake (an unknown model, a missing or mismatched checkpoint, an unreadable image, an
output folder that cannot be written, a missing extra) ends in one line on stderr,
`error: ...`, and exit status 2; `--verbose` prints the traceback too. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import shlex
import sys
import traceback
import warnings

USAGE_ERROR = 2


class UserError(Exception):
  """A mistake in the command's arguments or inputs, reported in one line."""


def quiet() -> None:
  """Silences library chatter that is not ours to act on; call before TensorFlow is imported.

  TensorFlow's C++ INFO lines (the oneDNN notice, printed once per loaded library, and the CPU
  feature guard; `TF_CPP_MIN_LOG_LEVEL` and `TF_ENABLE_ONEDNN_OPTS` set by the user win), progress
  bars, JAX's probe for a TPU runtime, and Python warnings about libraries' own internals
  (FutureWarning, DeprecationWarning). Real warnings (UserWarning, WARNING logs) still show.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # The oneDNN notice is logged while TensorFlow loads, before its log level applies; only turning
  # its oneDNN custom ops off (float round-off level differences) silences it.
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  os.environ.setdefault('TQDM_DISABLE', '1')
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  warnings.filterwarnings('ignore', category=FutureWarning)
  warnings.filterwarnings('ignore', category=DeprecationWarning)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  for name in ('absl', 'tensorflow', 'orbax', 'tensorflow_datasets'):
    logging.getLogger(name).setLevel(logging.ERROR)


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
    return (
      f'{head}, e.g. {lines[1]}; is it a checkpoint of another model (--model, patch size, '
      'classifier)? --verbose lists every difference'
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


def run(main, argv: list[str] | None, *, user_errors=USER_ERRORS) -> int:
  """Runs `main(argv) -> int | None`, turning user errors into one line and exit status 2.

  `--verbose` (anywhere in argv; `main`'s parser declares it) also prints the traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = '--verbose' in argv
  from vit_jax import npz

  caught = (UserError, npz.CheckpointMismatchError, *user_errors)
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
