"""Launch scripts: their dry runs print the exact commands; hostile arguments are refused first."""

import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('launch/tpu_vm.sh', 'launch/gke_xpk.sh', 'launch/slurm.sbatch')
PP = '--config.pp_train=decode|inception_crop(224)|flip_lr|value_range(-1,1)'
CONFIG = 'configs/pretrain.py:model=ViT-B_16,dataset=imagenet21k'


def _bash(*args, path=None):
  env = dict(os.environ, TMPDIR='/tmp')
  env.pop('REMOTE_DIR', None)
  env.pop('TPU_RUNTIME', None)
  if path:
    env['PATH'] = f'{path}:{env["PATH"]}'
  return subprocess.run(
    ['bash', *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
  )


def _dry(*args) -> list[list[str]]:
  proc = _bash(args[0], '--dry-run', *args[1:])
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ''
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def _command_flag(argv: list[str]) -> str:
  (command,) = [a for a in argv if a.startswith('--command=')]
  return command[len('--command=') :]


def test_tpu_vm_create_install_stop_delete():
  zone = 'us-central2-b'
  assert _dry('launch/tpu_vm.sh', 'create', 'vit-v4', zone, 'v4-64', '--spot') == [
    'gcloud compute tpus queued-resources create vit-v4 --node-id=vit-v4 --zone=us-central2-b '
    '--accelerator-type=v4-64 --runtime-version=tpu-ubuntu2204-base --spot'.split(),
    'gcloud compute tpus queued-resources describe vit-v4 --zone=us-central2-b'.split()
    + ['--format=value(state.state)'],
  ]
  install = _dry('launch/tpu_vm.sh', 'install', 'vit-v4', zone)
  assert install[0] == 'git archive --format=tar.gz -o /tmp/vit_jax-src.tar.gz HEAD'.split()
  assert (
    install[1]
    == (
      'gcloud compute tpus tpu-vm scp /tmp/vit_jax-src.tar.gz vit-v4:vit_jax-src.tar.gz '
      '--zone=us-central2-b --worker=all'
    ).split()
  )
  assert install[2][:8] == 'gcloud compute tpus tpu-vm ssh vit-v4 --zone=us-central2-b'.split() + [
    '--worker=all'
  ]
  assert shlex.split(_command_flag(install[2]))[-6:] == [
    '.venv/bin/pip',
    'install',
    '-q',
    '-e',
    '.',
    'jax[tpu]',
  ]
  (stop,) = _dry('launch/tpu_vm.sh', 'stop', 'vit-v4', zone)
  assert _command_flag(stop) == 'kill -TERM $(cat vit_jax/run.pid)'
  assert _dry('launch/tpu_vm.sh', 'delete', 'vit-v4', zone) == [
    'gcloud compute tpus queued-resources delete vit-v4 --zone=us-central2-b'.split()
    + ['--force', '--quiet']
  ]


def test_tpu_vm_run_passes_a_preprocessing_override_intact_to_every_worker():
  start, logs = _dry(
    'launch/tpu_vm.sh', 'run', 'vit-v4', 'us-central2-b', CONFIG, 'gs://bucket/vitb16', PP
  )
  ssh = 'gcloud compute tpus tpu-vm ssh vit-v4 --zone=us-central2-b --worker=all'
  assert start[:8] == ssh.split()
  remote = shlex.split(_command_flag(start))  # What the remote shell parses.
  python = remote[remote.index('nohup') + 1 : remote.index('>>')]
  assert python == [
    '.venv/bin/python',
    '-m',
    'vit_jax.main',
    f'--config={CONFIG}',
    '--workdir=gs://bucket/vitb16',
    PP,
  ]
  assert remote[:3] == ['cd', 'vit_jax', '&&']
  assert logs[-2:] == ['--worker=0', '--command=tail -n +1 -F vit_jax/run.log']


def test_gke_xpk_workload_command():
  (argv,) = _dry(
    'launch/gke_xpk.sh',
    'my-cluster',
    'vitb16-i21k',
    'v5litepod-256',
    '2',
    'gcr.io/proj/vit_jax:latest',
    CONFIG,
    'gs://bucket/vitb16',
    '--config.mesh.dcn_data=2',
    PP,
  )
  assert argv[:-1] == [
    'xpk',
    'workload',
    'create',
    '--cluster=my-cluster',
    '--workload=vitb16-i21k',
    '--tpu-type=v5litepod-256',
    '--num-slices=2',
    '--docker-image=gcr.io/proj/vit_jax:latest',
    '--max-restarts=3',
  ]
  assert shlex.split(_command_flag(argv)) == [
    'cd',
    '/app',
    '&&',
    'python',
    '-m',
    'vit_jax.main',
    f'--config={CONFIG}',
    '--workdir=gs://bucket/vitb16',
    '--config.mesh.dcn_data=2',
    PP,
  ]


def test_slurm_srun_command():
  (argv,) = _dry('launch/slurm.sbatch', 'configs/finetune.py:model=ViT-L_16', '/shared/run', PP)
  assert argv == [
    'srun',
    '--kill-on-bad-exit=1',
    '.venv/bin/python',
    '-m',
    'vit_jax.main',
    '--config=configs/finetune.py:model=ViT-L_16',
    '--workdir=/shared/run',
    PP,
  ]


@pytest.mark.parametrize('config', ['quickstart', 'finetune:model=ViT-L_16', 'pretrain'])
def test_a_recipe_by_name_reaches_main_unchanged(config):
  """`--config` of vit_jax.main takes a recipe by name from any directory; so do the scripts."""
  (argv,) = _dry('launch/slurm.sbatch', config, '/shared/run')
  assert f'--config={config}' in argv
  (argv,) = _dry('launch/gke_xpk.sh', 'c', 'w', 'v4-64', '1', 'img:1', config, 'gs://b/w')
  assert any(f'--config={config}' in a for a in argv)


HOSTILE = ['x;reboot', 'x$(id)', 'x`id`', 'x\nid', "x'y", 'x y', 'x&&id', 'x>f']


def _invocations(script, bad_override='', bad_workdir='gs://b/w', bad_config=CONFIG):
  extra = [f'--config.lr={bad_override}'] if bad_override else []
  if script == 'launch/tpu_vm.sh':
    return [script, 'run', 'vit-v4', 'us-central2-b', bad_config, bad_workdir, *extra]
  if script == 'launch/gke_xpk.sh':
    return [script, 'c', 'w', 'v4-64', '1', 'img:1', bad_config, bad_workdir, *extra]
  return [script, bad_config, bad_workdir, *extra]


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('hostile', HOSTILE)
def test_hostile_arguments_are_refused_before_anything_runs(script, hostile, tmp_path):
  # Stand-ins for the cloud tools record any call: none may happen.
  marker = tmp_path / 'ran'
  for tool in ('gcloud', 'xpk', 'srun', 'git'):
    fake = tmp_path / tool
    fake.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\n')
    fake.chmod(0o755)
  for where in ('override', 'workdir', 'config'):
    kwargs = {
      'override': {'bad_override': hostile},
      'workdir': {'bad_workdir': 'gs://b/' + hostile},
      'config': {'bad_config': 'configs/pretrain.py:model=' + hostile},
    }[where]
    for dry in (True, False):
      args = _invocations(script, **kwargs)
      if dry:
        args = [args[0], '--dry-run', *args[1:]]
      proc = _bash(*args, path=str(tmp_path))
      assert proc.returncode == 2, (where, proc.stdout, proc.stderr)
      assert proc.stdout == ''
      assert proc.stderr.startswith('error: invalid ') and proc.stderr.count('\n') == 1, proc.stderr
      assert not marker.exists(), marker.read_text()


def test_tpu_vm_refuses_unknown_actions_and_bad_names():
  for args in (
    ['reboot', 'vit-v4', 'us-central2-b'],
    ['delete', 'Vit;x', 'us-central2-b'],
    ['create', 'vit-v4', 'us-central2-b', 'v4-64', '--preemptible;id'],
  ):
    proc = _bash('launch/tpu_vm.sh', '--dry-run', *args)
    assert proc.returncode == 2 and proc.stdout == '' and 'error: invalid' in proc.stderr


def test_shellcheck_clean():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck not installed (.ci/run installs it)')
  proc = subprocess.run(
    ['shellcheck', *SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
