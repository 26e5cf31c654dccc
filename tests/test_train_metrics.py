"""Throughput/MFU bookkeeping, the peak-FLOPs table, FLOPs from XLA, and the metric writers."""

import json
import types

import jax
import numpy as np
import pytest

from vit_jax import metrics, train


@pytest.mark.parametrize(
  'kind,peak',
  [
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H200', 989e12),
    ('cpu', None),
  ],
)
def test_peak_flops_table(kind, peak):
  assert metrics.device_peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


def test_cpu_ceiling_is_measured():
  flops, how = metrics.peak_flops_total(8)
  assert 1e8 < flops < 1e14 and 'measured matmul ceiling' in how


def test_throughput_and_mfu(monkeypatch):
  clock = iter([0.0, 0.0, 2.0, 2.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  meter = metrics.Throughput(
    global_batch_size=64, num_devices=8, total_steps=100, flops_per_step=1e9, peak_flops=1e10
  )
  meter.reset(10)
  meter.add_data_wait(0.5)
  out = meter.summary(20)  # 10 steps in 2 s.
  assert out['perf/step_time'] == pytest.approx(0.2)
  assert out['perf/images_per_sec'] == pytest.approx(320)
  assert out['perf/images_per_sec_per_device'] == pytest.approx(40)
  assert out['perf/data_wait_frac'] == pytest.approx(0.25)
  assert out['perf/mfu'] == pytest.approx(1e9 / 0.2 / 1e10)
  assert out['perf/eta_seconds'] == pytest.approx(16)
  line = metrics.format_progress(20, 100, out)
  assert 'step 20/100' in line and '320.0 img/s' in line and 'ETA 0:00:16' in line


def test_trainer_flops_are_the_analytic_count_whatever_the_layout():
  """Trainer.compile reports metrics.model_flops x batch; scan, remat and meshes change nothing."""
  from vit_jax import config as config_lib

  local = {'image': np.zeros((1, 16, 64, 64, 3), np.float32), 'label': np.zeros((1, 16), np.int32)}

  def flops(devices, mesh, **model):
    config = config_lib.base_config()
    config.model_name = 'ViT-Ti_16'
    config.model.update(num_layers=2, **model)
    config.image_size, config.batch_size, config.eval_batch_size = 64, 16, 16
    config.mesh.update(mesh)
    trainer = train.Trainer(config, num_classes=10, devices=devices)
    batch = trainer.global_batch(local, stacked=True)
    compiled, flops = trainer.compile(
      trainer.init_state(0), batch, jax.random.key_data(jax.random.key(0))
    )
    assert trainer.compiled_train_step is compiled
    return trainer, compiled, flops

  trainer, compiled, one = flops(jax.devices()[:1], {'data': 1})
  assert one == metrics.model_flops(trainer.model, 64) * 16
  # XLA's cost analysis of the compiled single-device program agrees on CPU (it also counts
  # norms, softmax and the optimizer's elementwise work, hence the tolerance); on GPU it misses
  # the matmuls that become library calls, so the library does not use it.
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert float(cost['flops']) == pytest.approx(one, rel=0.05)
  assert flops(None, {'fsdp': 8, 'data': 1}, scan_layers=True, remat_policy='full')[2] == one


def test_metric_writer_jsonl_and_process_gating(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(3, {'train/loss': np.float32(1.5), 'eval/test/accuracy': 0.5})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    assert json.loads(f.readline()) == {'step': 3, 'train/loss': 1.5, 'eval/test/accuracy': 0.5}
  silent = metrics.MetricWriter(str(tmp_path / 'other'), enabled=False)
  silent.write(1, {'train/loss': 1.0})
  silent.close()
  assert not (tmp_path / 'other').exists()
