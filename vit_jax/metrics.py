"""Metrics: JSON lines + TensorBoard (process 0 only), console progress with ETA, throughput, MFU.

MFU is `model_flops` (an analytic count of matmuls and convolutions per image, as PaLM's MFU) over
the devices' bf16 peak (`PEAK_FLOPS`), or on CPU over a measured matmul ceiling. XLA's cost
analysis is no substitute: on GPU it misses the matmuls that become library calls, and it counts a
scanned block once and rematerialized work again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import timeit
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Peak dense bf16 FLOP/s per device (a TPU chip or a GPU), from the vendors' spec sheets.
PEAK_FLOPS = {
  'tpu v4': 275e12,
  'tpu v5 lite': 197e12,  # v5e reports itself as 'TPU v5 lite'.
  'tpu v5e': 197e12,
  'tpu v5p': 459e12,
  'tpu v5': 459e12,
  'tpu v6 lite': 918e12,  # v6e (Trillium).
  'tpu v6e': 918e12,
  'a100': 312e12,
  'h100': 989e12,  # SXM; PCIe parts are slower, and the table errs on the strict side.
  'h200': 989e12,
}


def _resnet_stem_flops(size: int, num_layers, width_factor: float) -> tuple[float, int, int]:
  """(forward FLOPs, output side, output channels) of `resnet.resnet_stem` on size x size x 3."""
  width = int(64 * width_factor)
  side = -(-size // 2)  # conv_root: 7x7, stride 2, SAME.
  flops = 2.0 * side**2 * 7 * 7 * 3 * width
  side = -(-side // 2)  # 3x3/2 max-pool.
  channels = width
  for i, units in enumerate(num_layers):
    features = width * 2**i
    for j in range(units):
      stride = 2 if (i > 0 and j == 0) else 1
      out = -(-side // stride)
      if channels != 4 * features or stride != 1:
        flops += 2.0 * out**2 * channels * 4 * features  # conv_proj
      flops += 2.0 * side**2 * channels * features  # conv1, 1x1
      flops += 2.0 * out**2 * 9 * features * features  # conv2, 3x3 (strided)
      flops += 2.0 * out**2 * features * 4 * features  # conv3, 1x1
      side, channels = out, 4 * features
  return flops, side, channels


def model_flops(
  model: Any, image_size: int, *, train: bool = True, all_tokens: bool = False
) -> float:
  """Analytic FLOPs per image of a ViT, hybrid R+ViT or MLP-Mixer (2 per multiply-add).

  Counts every matmul and convolution the model needs; not norms, activations or softmax (a few
  percent), rematerialized work or the scanned model's full last block, so MFU is comparable
  whatever the remat policy or `scan_layers`. Under a class-token head the last block is needed
  for the class token only (keys and values of all tokens), as the unscanned model computes it.
  Register tokens count as tokens; with patch dropout a training step counts the patches it keeps.
  A training step is 3x the forward, less the input gradient of the first layer (never computed).

  Args:
    model: a `VisionTransformer` or `MlpMixer` (unbound; only its fields are read).
    image_size: square input side in pixels.
    train: count a training step's forward and backward instead of the forward alone.
    all_tokens: count the last block over every token, as published per-model counts (DeiT's
      GMACs, fvcore) do.

  Returns:
    FLOPs per image.

  Raises:
    ValueError: a model that is neither a ViT nor a Mixer.
  """
  ph, pw = model.patches
  first = 0.0  # FLOPs of the layer that sees the images (no input gradient in training).
  from vit_jax import models
  from vit_jax.models import vit

  if models.model_family(model) == 'mixer':
    tokens, d = (image_size // ph) * (image_size // pw), model.hidden_dim
    first = 2.0 * tokens * ph * pw * 3 * d
    per_block = 4.0 * d * tokens * model.tokens_mlp_dim + 4.0 * tokens * d * model.channels_mlp_dim
    rest = model.num_blocks * per_block + 2.0 * d * (model.num_classes or 0)
  elif hasattr(model, 'transformer'):
    side, channels = image_size, 3
    if model.resnet is not None:
      first, side, channels = _resnet_stem_flops(
        image_size, tuple(model.resnet['num_layers']), model.resnet['width_factor']
      )
    grid, d = (side // ph) * (side // pw), model.hidden_size
    embed = 2.0 * grid * ph * pw * channels * d
    first, rest = (embed, 0.0) if model.resnet is None else (first, embed)
    t = model.transformer
    # Tokens the blocks process: the class token, the registers and the patches, of which a
    # training step with patch dropout keeps only `keep_patches` (the patch embedding sees all).
    dropout = train and t.get('patch_dropout')
    patches = vit.keep_patches(grid, t['patch_dropout']) if dropout else grid
    n = patches + (model.classifier in ('token', 'token_unpooled'))
    n += getattr(model, 'num_registers', 0)
    mlp = t['mlp_dim']
    # Q, K, V and out projections; attention's QK^T and weights x V; the MLP.
    per_layer = 8.0 * n * d * d + 4.0 * n * n * d + 4.0 * n * d * mlp
    rest += t['num_layers'] * per_layer
    if model.classifier == 'token' and not all_tokens:  # The last block's class token only.
      rest -= per_layer - (4.0 * n * d * d + 4.0 * d * d + 4.0 * n * d + 4.0 * d * mlp)
    if model.classifier == 'map':  # One probe attends over the n tokens.
      rest += 4.0 * d * d + 4.0 * n * d * d + 4.0 * n * d + 4.0 * d * mlp
    pooled = n if model.classifier in ('unpooled', 'token_unpooled') else 1
    head_in = d
    if model.representation_size is not None:
      rest += pooled * 2.0 * d * model.representation_size
      head_in = model.representation_size
    rest += pooled * 2.0 * head_in * (model.num_classes or 0)
  else:
    raise ValueError(f'no FLOPs formula for {type(model).__name__}')
  return 3.0 * rest + 2.0 * first if train else rest + first


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of one accelerator from `PEAK_FLOPS`, or None (CPU, unknown kinds)."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  keys = sorted(PEAK_FLOPS, key=len, reverse=True)  # Most specific name first.
  return next((PEAK_FLOPS[key] for key in keys if key in kind), None)


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted float32 n x n matmul on the default device: the CPU ceiling for MFU."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  return 2 * n**3 / min(timeit.repeat(lambda: f(x).block_until_ready(), number=1, repeat=repeats))


def peak_flops_total(num_devices: int) -> tuple[float, str]:
  """(peak FLOP/s of the whole job's devices, how it was obtained)."""
  per_device = device_peak_flops()
  if per_device is not None:
    return per_device * num_devices, f'{jax.devices()[0].device_kind} table x {num_devices}'
  # CPU: simulated devices share the host's cores, so the host's ceiling is the whole job's
  # (times the processes, each measuring its own host).
  flops = measure_matmul_flops() * jax.process_count()
  return flops, f'measured matmul ceiling {flops / 1e9:.1f} GFLOP/s'


def _scalar(x: Any) -> Any:
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    x = np.asarray(x)
    return x.item() if x.size == 1 else x.tolist()
  return x


def _scalar_metadata():
  from tensorflow.core.framework import summary_pb2

  metadata = summary_pb2.SummaryMetadata()
  metadata.plugin_data.plugin_name = 'scalars'
  return metadata.SerializeToString()


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files (process 0 only).

  Args:
    workdir: where metrics.jsonl and tensorboard/ go.
    enabled: write at all (default: on process 0).
    tensorboard: also write event files.
    resume_step: the step the run resumes from: records past it (about to be written again) and
      a torn last line or event are dropped first, so every reader sees each step once.
  """

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool | None = None,
    tensorboard: bool = True,
    resume_step: int | None = None,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      _truncate_jsonl(self.path, resume_step)
    # Raw appends: a failed write (disk full) is cut back to the last whole line at once.
    self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if tensorboard:
      import tensorflow as tf

      self._tb_dir = os.path.join(workdir, 'tensorboard')
      if resume_step is not None:
        _truncate_events(self._tb_dir, resume_step)
      self._tb = tf.summary.create_file_writer(self._tb_dir)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _scalar(v) for k, v in scalars.items()}}
    data = (json.dumps(record) + '\n').encode()
    end = os.fstat(self._file).st_size
    try:
      written = 0
      while written < len(data):  # After a short write (disk full, file size limit) the next
        written += os.write(self._file, data[written:])  # one raises, with the real cause.
    except OSError as e:
      with contextlib.suppress(OSError):
        os.ftruncate(self._file, end)  # Keeps the file whole: every line parses.
      raise OSError(
        e.errno, f'writing the metrics of step {step} to {self.path} failed: {e.strerror}'
      ) from e
    if self._tb is not None:
      import tensorflow as tf

      try:
        # tf.summary.write with the scalars plugin tag: what tf.summary.scalar writes, without
        # needing the tensorboard package installed.
        metadata = _scalar_metadata()
        with self._tb.as_default(step=int(step)):
          for key, value in record.items():
            if key != 'step' and isinstance(value, (int, float)):
              tf.summary.write(key, tf.constant(float(value), tf.float32), metadata=metadata)
        self._tb.flush()
      except tf.errors.OpError as e:  # E.g. a full disk: reported in one line like the above.
        raise OSError(
          5,
          f'writing the TensorBoard events of step {step} to {self._tb_dir} failed: '
          f'{" ".join(e.message.split())}',
        ) from e

  def close(self) -> None:
    if self._file is not None:
      os.close(self._file)
      self._file = None
    if self._tb is not None:
      try:
        self._tb.close()
      except Exception as e:  # A full disk: the events are lost, metrics.jsonl is whole.
        logging.warning('closing the TensorBoard writer: %s', ' '.join(str(e).split())[:200])
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics.jsonl file (a torn line is skipped with a warning)."""
  records = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except ValueError:  # A line torn by a kill or a full disk mid-write.
        logging.warning('%s: skipping a torn line %r', path, line[:80])
  return records


def _truncate_jsonl(path: str, step: int) -> None:
  """Keeps the whole records up to `step` (atomically: a new file renamed over the old one)."""
  records = [r for r in read_jsonl(path) if int(r.get('step', 0)) <= step]
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  os.replace(tmp, path)


def _truncate_events(directory: str, step: int) -> None:
  """Drops the events past `step` from the TensorBoard event files in `directory`.

  Dropped rather than hidden behind a `SessionLog.START` event (on which TensorBoard's Python
  reader purges later steps): then any reader sees each step once. Each file that changes is
  rewritten whole and renamed over itself.
  """
  import tensorflow as tf
  from tensorflow.core.util import event_pb2

  for path in sorted(tf.io.gfile.glob(os.path.join(directory, 'events.out.tfevents.*'))):
    kept, dropped = [], 0
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        if event_pb2.Event.FromString(record).step <= step:
          kept.append(record)
        else:
          dropped += 1
    except tf.errors.DataLossError:  # A record torn by a kill mid-write: drop it.
      dropped += 1
    if not dropped:
      continue
    tmp = os.path.join(directory, 'rewrite.tmp')  # No 'tfevents' in it: no reader picks it up.
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in kept:
        writer.write(record)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    logging.info(
      '%s: dropped %d events past step %d (written before a restart)', path, dropped, step
    )


@dataclasses.dataclass(kw_only=True)
class Throughput:
  """Images/s, step time, share of time spent waiting for data, MFU and ETA between log points."""

  global_batch_size: int
  num_devices: int
  total_steps: int
  flops_per_step: float | None = None
  peak_flops: float | None = None

  def __post_init__(self):
    self.reset(None)

  def reset(self, step: int | None) -> None:
    self._t0 = time.perf_counter()
    self._step0 = step
    self._data_wait = 0.0

  def add_data_wait(self, seconds: float) -> None:
    self._data_wait += seconds

  def summary(self, step: int) -> dict[str, float]:
    """Throughput since the last call (or `reset`), ending at `step`; resets the window."""
    elapsed = time.perf_counter() - self._t0
    steps = step - (self._step0 if self._step0 is not None else step)
    out = {}
    if steps > 0 and elapsed > 0:
      step_time = elapsed / steps
      ips = self.global_batch_size / step_time
      out = {
        'perf/step_time': step_time,
        'perf/images_per_sec': ips,
        'perf/images_per_sec_per_device': ips / self.num_devices,
        'perf/data_wait_frac': min(self._data_wait / elapsed, 1.0),
        'perf/eta_seconds': step_time * max(self.total_steps - step, 0),
      }
      if self.flops_per_step and self.peak_flops:
        out['perf/mfu'] = self.flops_per_step / step_time / self.peak_flops
    self.reset(step)
    return out


def format_progress(step: int, total_steps: int, scalars: Mapping[str, Any]) -> str:
  """One console line: step, loss, lr, img/s(/device), data wait, MFU, ETA."""
  parts = [f'step {step}/{total_steps}']
  fmt = {
    'train/loss': 'loss {:.4f}',
    'train/lr': 'lr {:.3g}',
    'train/grad_norm': '|g| {:.3g}',
    'perf/images_per_sec': '{:.1f} img/s',
    'perf/images_per_sec_per_device': '({:.1f}/dev)',
    'perf/step_time': 'step {:.3f}s',
    'perf/data_wait_frac': 'data wait {:.0%}',
    'perf/mfu': 'MFU {:.1%}',
  }
  for key, pattern in fmt.items():
    if key in scalars:
      parts.append(pattern.format(scalars[key]))
  for key, value in scalars.items():
    if key.startswith('eval/'):
      parts.append(f'{key} {value:.4f}')
  if 'perf/eta_seconds' in scalars:
    eta = int(scalars['perf/eta_seconds'])
    parts.append(f'ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}')
  return ' | '.join(parts)
