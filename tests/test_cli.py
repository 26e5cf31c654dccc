"""predict, export and a training run's closing hints, driven as a user drives them: subprocesses,
real files, a read-only folder. Mistakes end in one line on stderr with exit status 2; a clean run
prints none of the library noise in tools/smoke_install.py's NOISE."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from optional import have
from PIL import Image

from vit_jax import models, npz

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))
from smoke_install import NOISE  # noqa: E402

sys.path.pop(0)


ONNX = ('torch', 'transformers', 'onnx', 'onnxruntime', 'onnxscript')


def _env():
  """The user's environment: no log-level variables set (the commands set their own)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TF_CPP', 'TF_ENABLE_ONEDNN'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  env.pop('XLA_FLAGS', None)
  return env


def _run(args, cwd, prefix=(), timeout=600):
  return subprocess.run(
    [*prefix, sys.executable, *args],
    cwd=cwd,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _noise(stderr):
  return [line for line in stderr.splitlines() if any(re.search(p, line) for p in NOISE)]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A tiny random 1000-class ViT (ImageNet's class count) as .npz, photos and a bad image."""
  tmp = tmp_path_factory.mktemp('cli')
  model = models.get_model(
    'testing', 1000, image_size=32, representation_size=None, head_zero_init=False
  )
  npz.save(model, str(tmp / 'tiny.npz'))
  (tmp / 'photos').mkdir()
  rng = np.random.RandomState(0)
  Image.fromarray(rng.randint(0, 255, (40, 50, 3), np.uint8)).save(tmp / 'photos' / 'a.png')
  Image.fromarray(rng.randint(0, 255, (30, 30, 3), np.uint8)).save(tmp / 'photos' / 'b.webp')
  (tmp / 'photos' / 'notes.txt').write_text('not an image')
  (tmp / 'bad.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
  return tmp


PREDICT = ['-m', 'vit_jax.predict', '--checkpoint', 'tiny.npz']
EXPORT = ['-m', 'vit_jax.export', '--checkpoint', 'tiny.npz']


@pytest.mark.parametrize(
  'args, expected',
  [
    (
      [*PREDICT, '--model', 'vit-b16', 'photos/a.png'],
      r"^error: unknown model 'vit-b16'; did you mean 'ViT-B_16'.*--list_models",
    ),
    (
      [*PREDICT, '--model', 'ViT-B_16', 'photos/a.png'],
      r"^error: checkpoint 'tiny.npz' does not match model 'ViT-B_16': shape mismatch: "
      r'\S+: checkpoint \(\d+,?.*\) vs model \(.*\); the checkpoint fits testing '
      r'\(\d+ problems\); .*--verbose lists every difference$',
    ),
    (
      [*EXPORT, '--model', 'ViT-S_16', '--format', 'npz', '--out', 'out/npz'],
      r"^error: checkpoint 'tiny.npz' does not match model 'ViT-S_16'",
    ),
  ],
  ids=['unknown-model', 'mismatched-checkpoint', 'export'],
)
def test_mistakes_end_in_one_line(files, args, expected):
  proc = _run(args, files)
  assert proc.returncode == 2, proc.stderr
  assert len(proc.stderr.splitlines()) == 1 and re.search(expected, proc.stderr), proc.stderr
  assert not (files / 'out').exists()  # Nothing half-written.


@pytest.mark.parametrize(
  'args, expected',
  [
    (
      ['--checkpoint', 'nope.npz', '--model', 'testing', 'photos/a.png'],
      "checkpoint 'nope.npz' not",
    ),
    (['--checkpoint', 'tiny.npz', '--model', 'testing', 'bad.jpg'], "cannot read image 'bad.jpg'"),
    (['--checkpoint', 'tiny.npz', '--model', 'testing', 'nothere/'], "image 'nothere/' does not"),
  ],
)
def test_more_mistakes_in_one_line(files, capsys, monkeypatch, args, expected):
  """The same path in-process (the command's own main), for the cases that fail before loading."""
  from vit_jax import predict

  monkeypatch.chdir(files)
  assert predict.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {expected}') and len(err.splitlines()) == 1, err


def test_verbose_adds_the_traceback(files, capsys, monkeypatch):
  from vit_jax import predict

  monkeypatch.chdir(files)
  assert (
    predict.main(['--checkpoint', 'tiny.npz', '--model', 'ViT-B_16', '--verbose', 'photos']) == 2
  )
  err = capsys.readouterr().err
  assert 'Traceback (most recent call last)' in err and 'shape mismatch' in err
  assert err.splitlines()[-1].startswith('error: ')


def _read_only(folder: pathlib.Path):
  """A command prefix under which `folder` cannot be written, root included."""
  if os.geteuid() != 0:
    folder.chmod(0o555)
    return ()
  if shutil.which('unshare') is None:
    pytest.skip('running as root without unshare: no way to make a folder read-only')
  probe = subprocess.run(['unshare', '-m', 'true'], capture_output=True)
  if probe.returncode != 0:
    pytest.skip(f'unshare -m is not permitted here: {probe.stderr.decode().strip()}')
  script = f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec "$@"'
  return ('unshare', '-m', 'sh', '-c', script, 'sh')


@pytest.mark.parametrize('tool', ['predict', 'export'])
def test_read_only_output_is_one_line_and_leaves_nothing(files, tmp_path, tool):
  folder = tmp_path / 'read-only'
  folder.mkdir()
  target = folder / 'out'
  if tool == 'predict':
    args = [*PREDICT, '--model', 'testing', '--attention', str(target), 'photos/a.png']
  else:
    args = [*EXPORT, '--model', 'testing', '--format', 'npz', '--out', str(target)]
  proc = _run(args, files, prefix=_read_only(folder))
  folder.chmod(0o755)
  assert proc.returncode == 2, proc.stderr
  assert len(proc.stderr.splitlines()) == 1, proc.stderr
  where = re.escape(str(target))
  assert re.match(rf"^error: cannot write '{where}': (Permission denied|Read-only)", proc.stderr)
  assert os.listdir(folder) == []


def test_predict_is_quiet_and_prints_readable_imagenet_names(files):
  proc = _run([*PREDICT, '--model', 'testing', '--top_k', '3', 'photos'], files)
  assert proc.returncode == 0, proc.stderr
  assert not _noise(proc.stderr), proc.stderr
  # Only our line about the skipped file; nothing else.
  assert proc.stderr.strip() == 'skipped 1 file that is not an image: 1 .txt'
  out = proc.stdout.splitlines()
  assert out[0] == 'photos/a.png' and out[4] == 'photos/b.webp' and len(out) == 8
  names = [line.split('%', 1)[1].strip() for line in out if '%' in line]
  assert not any(re.fullmatch(r'n\d{8}', n) for n in names)
  labels = (REPO / 'vit_jax' / 'labels' / 'imagenet2012.txt').read_text().splitlines()
  assert all(n in labels for n in names)


@pytest.mark.parametrize(
  'fmt',
  [
    'npz',
    pytest.param(
      'onnx',
      marks=[
        pytest.mark.torch,
        pytest.mark.skipif(not have(*ONNX), reason='the export extra is not installed'),
      ],
    ),
  ],
)
def test_export_is_quiet(files, tmp_path, fmt):
  proc = _run([*EXPORT, '--model', 'testing', '--format', fmt, '--out', str(tmp_path / fmt)], files)
  assert proc.returncode == 0, proc.stderr
  assert not _noise(proc.stderr) and proc.stderr == '', proc.stderr
  assert (tmp_path / fmt / 'labels.txt').read_text().startswith('tench, Tinca tinca\n')
  assert sorted(p.name for p in tmp_path.iterdir()) == [fmt]  # No staging folder left beside.


def test_a_run_keeps_its_labels_and_its_hints_work(tmp_path):
  """Train on a folder, move the folder away, then run the predict/export lines the run printed."""
  photos = tmp_path / 'photos'
  rng = np.random.RandomState(0)
  for name in ('cat', 'dog'):
    (photos / name).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.randint(0, 255, (16, 16, 3), np.uint8)).save(photos / name / f'{i}.png')
  workdir = tmp_path / 'run'
  (tmp_path / 'tfds').mkdir()
  proc = _run(
    [
      '-m', 'vit_jax.main', '--config=configs/quickstart.py:runlocal,steps=1',
      f'--workdir={workdir}', f'--config.dataset=folder:{photos}',
      f'--config.data_dir={tmp_path / "tfds"}', '--config.eval_every=0', '--config.batch_size=4',
      '--config.eval_splits=validation', '--config.pp_train=decode|value_range(-1,1)',
      '--config.pp_eval=decode|value_range(-1,1)',
    ],
    REPO,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / 'labels.txt').read_text() == 'cat\ndog\n'
  for noise in ('Downloading and preparing dataset', 'Generating splits', '\x1b['):  # Local data.
    assert noise not in proc.stdout + proc.stderr
  hints = {
    line.split(':', 1)[0].strip(): line.split(':', 1)[1].strip()
    for line in proc.stdout.splitlines()
    if line.startswith('  ') and ':' in line
  }
  predict = shlex.split(hints['classify images'].replace('IMAGE_OR_FOLDER', 'photos2'))
  assert predict[:3] == [sys.executable, '-m', 'vit_jax.predict']
  longer = next(v for k, v in hints.items() if k.startswith('train longer'))
  assert shlex.split(longer)[0] == sys.executable
  shutil.move(photos, tmp_path / 'photos2')  # The dataset folder is gone from where it was.
  shutil.rmtree(tmp_path / 'tfds')
  proc = _run(predict[1:], tmp_path)
  assert proc.returncode == 0, proc.stderr
  names = {line.split('%', 1)[1].strip() for line in proc.stdout.splitlines() if '%' in line}
  assert names == {'cat', 'dog'}
  export = shlex.split(hints['export (onnx, hf, saved_model, npz)'])
  assert export[:3] == [sys.executable, '-m', 'vit_jax.export']
  export[export.index('--format') + 1] = 'npz'  # onnx from a workdir: tests/test_export.py.
  proc = _run(export[1:], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert (workdir / 'export' / 'onnx' / 'labels.txt').read_text() == 'cat\ndog\n'


def test_list_models_prints_no_backend_probe(tmp_path):
  proc = _run(['-m', 'vit_jax.main', '--list_models'], REPO)
  assert proc.returncode == 0 and 'ViT-B_16' in proc.stdout
  assert not _noise(proc.stderr), proc.stderr
