"""Bad input and config mistakes: caught before any work, each reported as one clear line."""

import json
import os
import shlex
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_env import cpu_env

from vit_jax import config as config_lib
from vit_jax import guards, metrics, models, npz, preflight, resume, train_state
from vit_jax import main as main_lib
from vit_jax.configs import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = 'configs/quickstart.py:runlocal'


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO)  # Recipes are named by their path relative to the repository.


def _explain(*argv):
  return preflight.explain_flags_error(list(argv), ValueError('absl said something'))


# The bad-input table of docs/reliability.md: (command-line arguments, what the one line says).
FLAG_CASES = [
  (['--config.bogus=1'], ["unknown config field 'bogus'", 'valid fields of the config', 'lr,']),
  (['--config.btach_size=8'], ["did you mean 'batch_size'?"]),
  (['--config.mesh.dataa=2'], ["did you mean 'data'?", 'valid fields of mesh: data, dcn_data']),
  (['--config.batch_size=abc'], ['batch_size is an integer (now 16)', '--config.batch_size=16']),
  (['--config.lr=fast'], ['lr is a number']),
  (['--config.async_checkpoints=maybe'], ['a boolean']),
]


@pytest.mark.parametrize('extra,expected', FLAG_CASES)
def test_flag_mistakes_name_the_field_the_value_and_the_fix(extra, expected):
  line = _explain(f'--config={Q}', '--workdir=/tmp/w', *extra)
  assert '\n' not in line
  for text in expected:
    assert text in line, line


def test_recipe_mistakes():
  line = _explain('--config=configs/quickstart.py:runlocal,bogus=1')
  assert "unknown config argument 'bogus'" in line and "known: ['data_dir', 'runlocal'" in line
  line = _explain('--config=configs/quickstart.py:steps=many')
  assert "steps='many': expected an integer" in line
  line = _explain('--config=configs/nope.py')
  assert (
    "no recipe 'configs/nope.py' (not a file here, not a recipe name); recipes: finetune, " in line
  )
  assert 'unknown config argument' in _explain('--config=quickstart:bogus=1')  # By name too.


def _config(**overrides):
  config = quickstart.get_config('runlocal')
  config.unlock()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.mark.parametrize(
  'overrides,expected',
  [
    ({'model_name': 'ViT-B_61'}, "unknown model 'ViT-B_61' (--config.model_name): did you mean "),
    ({'image_size': 18}, "image_size=18 but dataset='synthetic:image_size=16,num_classes=10,"),
    ({'image_size': 18}, 'set --config.image_size=16'),
    (
      {'image_size': 18, 'dataset': 'synthetic:image_size=18'},
      'image_size=18 is not divisible by the patch size 4 of testing: use --config.image_size=16 '
      'or 20 and image_size= in --config.dataset',
    ),
    ({'batch_size': 12}, 'batch_size=12 / accum_steps=1 is not divisible by the 8 batch shards'),
    ({'batch_size': 12}, 'one of 8, 16'),
    (
      {'dataset': 'mnist', 'data_dir': '/nonexistent/tfds'},
      "data_dir '/nonexistent/tfds' does not exist (dataset 'mnist')",
    ),
  ],
)
def test_config_mistakes_are_caught_before_any_work(overrides, expected, tmp_path):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_config(**overrides), str(tmp_path))
  assert expected in str(e.value), str(e.value)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')  # A path below a file can never be created, even by root.
  with pytest.raises(config_lib.ConfigError, match=r"workdir '.*/file/w' is not writable \(Not a"):
    config_lib.validate(_config(), str(blocker / 'w'))


def test_pickled_npz_is_refused_never_unpickled(tmp_path):
  path = tmp_path / 'evil.npz'
  np.savez(path, head=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match='holds pickled objects; refusing to load it'):
    npz.load_flat(str(path))


def test_resume_compare_refuses_what_the_state_cannot_survive():
  old = json.loads(_config().to_json_best_effort())
  new = dict(old, lr=0.5, total_steps=99, seed=3, batch_size=32)
  new['model'] = dict(old['model'], param_dtype='bfloat16', dropout_rate=0.1)
  refused, stated = resume.compare(old, new)
  assert refused == ['batch_size 16 -> 32', "model.param_dtype 'float32' -> 'bfloat16'"]
  assert stated == ['lr 0.002 -> 0.5', 'model.dropout_rate 0.0 -> 0.1', 'seed 0 -> 3',
                    'total_steps 12 -> 99']  # fmt: skip


def test_checkpoint_with_missing_extra_or_misshaped_keys_is_named():
  def tree(**leaves):
    return {'params': {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in leaves.items()}}

  want = tree(kernel=(4, 4), bias=(4,))
  train_state._check_tree(want, want, '/c', 3)
  with pytest.raises(train_state.ResumeError, match=r'missing 1 keys \(e.g. params/bias\)'):
    train_state._check_tree(tree(kernel=(4, 4)), want, '/c', 3)
  with pytest.raises(train_state.ResumeError, match=r'1 unexpected keys \(e.g. params/extra\)'):
    train_state._check_tree(tree(kernel=(4, 4), bias=(4,), extra=(1,)), want, '/c', 3)
  with pytest.raises(train_state.ResumeError, match=r'params/kernel: \(4, 8\) stored, \(4, 4\)'):
    train_state._check_tree(tree(kernel=(4, 8), bias=(4,)), want, '/c', 3)


def test_fingerprint_catches_one_flipped_bit_and_ignores_the_sharding():
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 7
  state = {'params': {'w': x, 'b': x[0].astype(jnp.bfloat16)}, 'step': jnp.int32(5)}
  mesh = jax.make_mesh((8,), ('d',))
  sharded = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  sharded['params']['w'] = jax.device_put(
    x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
  )
  assert train_state.fingerprint(state) == train_state.fingerprint(sharded)
  bits = np.asarray(x).view(np.uint32).copy()
  bits[3, 5] ^= 1 << 7
  flipped = dict(state, params=dict(state['params'], w=jnp.asarray(bits.view(np.float32))))
  got, want = train_state.fingerprint(flipped), train_state.fingerprint(state)
  assert [k for k in want if got[k] != want[k]] == ['params/w']


def test_spike_guard():
  guard = guards.SpikeGuard(1000.0, min_history=3)
  for loss in (2.3, 2.2, 2.1, 2.0):
    assert guard.check({'train/loss': loss, 'train/grad_norm': 1.0}) == []
  (bad,) = guard.check({'train/loss': 4.8e11, 'train/grad_norm': 1.0})
  assert bad.startswith('train/loss=4.8e+11 spiked over 1000x its running median 2.15')
  assert guards.SpikeGuard(0).check({'train/loss': 1e30, 'train/grad_norm': 1e30}) == []


def test_workdir_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
  path = tmp_path / 'lock.json'

  def held_by(pid, host=None, lease=60.0):
    host = host or socket.gethostname()
    path.write_text(json.dumps({'host': host, 'pid': pid, 'lease_until': time.time() + lease}))

  held_by(os.getppid(), lease=-1)  # A live process on this host: its lease does not matter here.
  with pytest.raises(train_state.WorkdirLockedError) as refused:
    guards.WorkdirLock(str(tmp_path)).acquire()
  assert f'in use by pid {os.getppid()} on host {socket.gethostname()}' in str(refused.value)
  assert 'taken over as soon as that process is gone' in str(refused.value)
  held_by(os.getppid(), host='other-host')  # Another host, lease still running.
  with pytest.raises(train_state.WorkdirLockedError, match='other-host') as refused:
    guards.WorkdirLock(str(tmp_path)).acquire()
  assert 'taken over 60 s after its last renewal' in str(refused.value)
  for stale in (
    lambda: held_by(2**22 + 12345),  # No such process here: killed.
    lambda: held_by(os.getppid(), host='other-host', lease=-1),  # Expired lease.
    lambda: path.write_text('{"host": "x", "pi'),  # Damaged.
    lambda: path.write_text(''),  # Left empty by an older version killed mid-write.
  ):
    stale()
    with guards.WorkdirLock(str(tmp_path)):
      assert json.loads(path.read_text())['pid'] == os.getpid()
      with pytest.raises(train_state.WorkdirLockedError):  # A second run in this process.
        guards.WorkdirLock(str(tmp_path)).acquire()
    assert not path.exists()  # Released.


def test_workdir_lock_is_never_held_twice_by_racing_processes():
  """4 processes race `acquire()` 200 times (a third from a stale lock); the faults suite: 2000."""
  import lock_race

  out = lock_race.race(trials=200, processes=4)
  assert out['double_holders'] == 0 and out['one_holder'] == 200, out
  assert out['locks_left'] == 0 and out['exitcodes'] == [0], out


def test_a_lock_taken_over_is_not_removed_by_its_old_holder(tmp_path):
  first = guards.WorkdirLock(str(tmp_path)).acquire()
  path = tmp_path / 'lock.json'
  record = json.loads(path.read_text())
  path.write_text(json.dumps(dict(record, pid=os.getppid(), token='another run')))
  first.release()  # Not ours any more: left in place.
  assert json.loads(path.read_text())['token'] == 'another run'


def test_metrics_drop_torn_lines_and_records_past_the_restored_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'x': s}) + '\n' for s in range(1, 9)) + '{"st')
  assert [r['step'] for r in metrics.read_jsonl(str(path))] == list(range(1, 9))
  writer = metrics.MetricWriter(str(tmp_path), enabled=True, tensorboard=False, resume_step=4)
  writer.write(5, {'x': 50})
  writer.close()
  lines = path.read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [1, 2, 3, 4, 5]  # Every line parses.


def _board_steps(directory):
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(
    str(directory), size_guidance={event_accumulator.TENSORS: 0}
  )
  accumulator.Reload()
  return [e.step for e in accumulator.Tensors('x')]


def test_tensorboard_shows_each_step_once_after_a_restart(tmp_path):
  def run(workdir, steps, resume_step=None):
    writer = metrics.MetricWriter(str(workdir), enabled=True, resume_step=resume_step)
    for step in steps:
      writer.write(step, {'x': float(step)})
    writer.close()

  run(tmp_path / 'a', range(1, 11))  # Killed after step 10; its newest checkpoint is step 4.
  run(tmp_path / 'a', range(5, 13), resume_step=4)
  assert _board_steps(tmp_path / 'a' / 'tensorboard') == list(range(1, 13))
  import tensorflow as tf

  events = sorted((tmp_path / 'a' / 'tensorboard').glob('events.out.tfevents.*'))[-1]
  os.truncate(events, os.path.getsize(events) - 10)  # Its last record torn by a kill mid-write.
  with pytest.raises(tf.errors.DataLossError):
    list(tf.data.TFRecordDataset(str(events)).as_numpy_iterator())
  run(tmp_path / 'a', range(12, 15), resume_step=11)  # Dropped on resume; the file reads again.
  list(tf.data.TFRecordDataset(str(events)).as_numpy_iterator())
  assert _board_steps(tmp_path / 'a' / 'tensorboard') == list(range(1, 15))
  # The same without dropping: TensorBoard's reader shows steps 5-10 twice.
  run(tmp_path / 'b', range(1, 11))
  run(tmp_path / 'b', range(5, 13))
  assert _board_steps(tmp_path / 'b' / 'tensorboard') == [*range(1, 11), *range(5, 13)]


def test_a_lost_peer_seen_by_two_threads_is_one_line():
  code = (
    'import threading\n'
    'from vit_jax import guards\n'
    "t = threading.Thread(target=guards.exit_lost_peer, args=('lost a peer: thread',))\n"
    't.start()\n'
    "guards.exit_lost_peer('lost a peer: main')\n"
  )
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=cpu_env(1), capture_output=True,
                        text=True, timeout=120)  # fmt: skip
  assert proc.returncode == 1
  assert [line for line in proc.stderr.splitlines() if line.startswith('ERROR: ')] in (
    ['ERROR: lost a peer: thread'],
    ['ERROR: lost a peer: main'],
  ), proc.stderr


def test_continue_command_repeats_the_users_command():
  argv = ['vit_jax/main.py', f'--config={Q}', '--workdir=w', '--config.total_steps=12', '--x=a b']
  assert main_lib.continue_command(argv, 24) == (
    f"{shlex.quote(sys.executable)} -m vit_jax.main --config={Q} --workdir=w '--x=a b' "
    '--config.total_steps=24'
  )


def test_the_hint_after_a_preemption_is_the_same_command_never_fewer_steps():
  argv = ['vit_jax/main.py', f'--config={Q}', '--workdir=w', '--config.total_steps=40']
  preempted = {'preempted': True, 'step': 17, 'checkpoint_dir': 'w/checkpoints/17'}
  text = main_lib._summary(preempted, 'w', argv)
  assert (
    f'resume (the same command): {sys.executable} -m vit_jax.main --config={Q} --workdir=w '
    '--config.total_steps=40\n'
  ) in text
  assert 'total_steps=34' not in text and 'train longer' not in text  # 2 x 17 would end it early.
  finished = main_lib._summary(dict(preempted, preempted=False, step=40), 'w', argv)
  assert 'train longer (a new schedule over 80 steps): ' in finished
  assert finished.count('--config.total_steps=') == 1 and '--config.total_steps=80' in finished


def test_tensorstore_errors_are_one_line_without_the_spec():
  e = ValueError(
    'DATA_LOSS: Error decoding manifest: CRC-32C checksum verification failed '
    '[tensorstore_spec=\'{"context": {"cache_pool": {}},\n "driver": "zarr"}\'] '
    "[source locations='tensorstore/kvstore/ocdbt/format/manifest.cc:120']"
  )
  assert train_state._one_line(e) == (
    'DATA_LOSS: Error decoding manifest: CRC-32C checksum verification failed'
  )


def _cli(*args, timeout=120):
  return _run(REPO, *args, timeout=timeout, devices=2)


def test_command_line_mistakes_end_in_one_line_and_exit_2(tmp_path):
  for args, expected in (
    ([f'--config={Q}', '--workdir=w', '--config.bogus=1'], "unknown config field 'bogus'"),
    ([f'--config={Q}', '--workdir=w', '--config.batch_size=abc'], 'batch_size is an integer'),
    (['--config=configs/quickstart.py:bogus', '--workdir=w'], "unknown config argument 'bogus'"),
    ([f'--config={Q}', f'--workdir={tmp_path}', '--config.model_name=B/16'], 'unknown model'),
  ):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith('ERROR: ') and proc.stderr.count('\n') == 1, proc.stderr
    assert expected in proc.stderr and 'Traceback' not in proc.stderr
  verbose = _cli(f'--config={Q}', '--workdir=w', '--config.bogus=1', '--verbose')
  assert 'Traceback' in verbose.stderr and verbose.returncode == 2


def test_print_config_and_list_models():
  proc = _cli(f'--config={Q}', '--print_config', '--config.lr=0.25')
  assert (
    proc.returncode == 0 and 'lr: 0.25\n' in proc.stdout and 'model_name: testing' in proc.stdout
  )
  proc = _cli('--list_models', timeout=300)  # Counts every model: slow on a loaded machine.
  assert proc.returncode == 0, proc.stderr
  assert ' 86,567,656\n' in proc.stdout and 'ViT-B_16 ' in proc.stdout  # The published count.
  assert len(proc.stdout.splitlines()) == 1 + len(models.MODEL_CONFIGS)


# --- the command line as a user types it, from another directory --------------------------------


def _run(cwd, *args, timeout=300, devices=1):
  """`python -m vit_jax.main ARGS` run from `cwd` (not the repository)."""
  return subprocess.run(
    [sys.executable, '-m', 'vit_jax.main', *args],
    cwd=cwd,
    env=cpu_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _refused(proc, workdir, *expected):
  """Exit 2, one ERROR line with each expected piece, and nothing written to the workdir."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('ERROR: ')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  for text in expected:
    assert text in errors[0], errors[0]
  assert not os.path.exists(os.path.join(workdir, 'config.json'))
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  return errors[0]


def test_config_by_name_or_path_from_any_directory(tmp_path):
  proc = _run(tmp_path, '--config=quickstart:runlocal', '--print_config', '--config.lr=0.5')
  assert proc.returncode == 0, proc.stderr
  assert 'lr: 0.5\n' in proc.stdout and '!!python' not in proc.stdout
  assert '  patches: [4, 4]\n' in proc.stdout  # Tuples print as plain lists.
  path = os.path.join(REPO, 'configs', 'finetune.py')
  proc = _run(tmp_path, f'--config={path}:runlocal', '--print_config')
  assert proc.returncode == 0 and 'model_name: testing' in proc.stdout, proc.stderr
  # The repository's relative path names the installed recipe where there is no such file here.
  proc = _run(tmp_path, '--config=configs/pretrain.py:runlocal', '--print_config')
  assert proc.returncode == 0 and 'remat_policy: full' in proc.stdout, proc.stderr
  _refused(_run(tmp_path, '--config=quikstart', '--workdir=w'), tmp_path / 'w',
           "no recipe 'quikstart'", 'recipes: finetune, pretrain, quickstart')  # fmt: skip


def test_config_mistakes_exit_2_before_any_data_naming_the_flag(tmp_path):
  from data_fixtures import make_indexed_folder

  work = str(tmp_path / 'w')
  # A warmup longer than the run (quickstart warms up 100 steps).
  proc = _run(tmp_path, '--config=quickstart', f'--workdir={work}', '--config.total_steps=4')
  _refused(proc, work, 'warmup_steps=100 must be in [0, total_steps=4]', '--config.warmup_steps=4')
  # A batch larger than a folder dataset: the folder is listed, never prepared.
  make_indexed_folder(str(tmp_path / 'images'), classes=2, per_class=5)
  folder = f'--config.dataset=folder:{tmp_path / "images"}'
  line = _refused(_run(tmp_path, '--config=quickstart', f'--workdir={work}', folder), work,
                  "batch_size=128 (accum_steps=1) is larger than split 'train'", '(8 examples)',
                  '--config.batch_size')  # fmt: skip
  assert not os.path.exists(os.path.expanduser('~/tensorflow_datasets/vit_jax_image_folder/images'))
  assert len(line) < 300
  # A wrong size, then the size the hint gives passes every check.
  proc = _run(tmp_path, '--config=quickstart', f'--workdir={work}', '--config.image_size=20')
  line = _refused(proc, work, "image_size=20 but pp_train='decode|resize(18)|random_crop(16)")
  assert line.endswith('(e.g. --config.image_size=16)')
  config = quickstart.get_config()
  config.image_size = 16
  config_lib.validate(config, environment=False)
  config.model.patches = (5, 5)
  with pytest.raises(config_lib.ConfigError, match='use --config.image_size=15 or 20 and make --'):
    config_lib.validate(config, environment=False)


def test_a_folder_dataset_evaluates_on_the_split_it_has(tmp_path):
  from data_fixtures import make_indexed_folder

  make_indexed_folder(str(tmp_path / 'images'), classes=2, per_class=10)
  proc = _run(
    tmp_path,
    '--config=quickstart:steps=1',
    f'--workdir={tmp_path / "w"}',
    f'--config.dataset=folder:{tmp_path / "images"}',
    f'--config.data_dir={tmp_path / "tfds"}',
    '--config.batch_size=8',
    '--config.eval_batch_size=8',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "has no test split: evaluating on 'validation'" in proc.stderr
  assert 'validation accuracy:' in proc.stdout


def test_fine_tuning_from_a_workdir_takes_its_architecture_and_a_misfit_is_one_line(tmp_path):
  first = str(tmp_path / 'first')
  proc = _run(tmp_path, '--config=quickstart:runlocal,steps=1', f'--workdir={first}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # finetune's runlocal model is 'testing' with 16x16 patches; the workdir's has 4x4 patches.
  second = str(tmp_path / 'second')
  proc = _run(tmp_path, '--config=finetune:runlocal,steps=1', f'--workdir={second}',
              f'--config.pretrained_path={first}')  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'its architecture, model.patches=(4, 4)' in proc.stderr
  with open(os.path.join(second, 'config.json')) as f:
    assert json.load(f)['model']['patches'] == [4, 4]
  # An .npz of another width: one short line with both shapes and the model that fits.
  path = str(tmp_path / 'ti16.npz')
  npz.save(models.get_model('ViT-Ti_16', 10, image_size=32), path)
  third = str(tmp_path / 'third')
  line = _refused(
    _run(
      tmp_path,
      '--config=finetune:runlocal',
      f'--workdir={third}',
      f'--config.pretrained_path={path}',
    ),  # fmt: skip
    third,
    'pretrained_path ti16.npz does not fit testing:',
    'is (192,) in the checkpoint, (10,) in the model',
    '--config.model_name=ViT-Ti_16',
  )
  assert len(line) <= 300, len(line)
