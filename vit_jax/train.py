"""The training loop: `train_and_evaluate(config, workdir)`; nothing here is model-specific.

One jitted step `(state, batch, rng) -> (state, metrics)` with explicit shardings over the mesh of
`config.mesh`, donated state, the rng folded with the step, and gradient accumulation over
`accum_steps` micro-batches inside the step. Resume is the default: a workdir with a checkpoint
continues from it (params, optimizer state, step, rng, data position), bit-identically on CPU.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vit_jax import config as config_lib
from vit_jax import ema as ema_lib
from vit_jax import guards, losses, models, npz, optim, resume, sharding, train_state
from vit_jax import labels as labels_lib
from vit_jax import metrics as metrics_lib
from vit_jax.export import load as checkpoint_load


class TrainingDivergedError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf; carries the step."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


def due(step: int, every: int, total_steps: int) -> bool:
  """Whether periodic work (log, eval, checkpoint) runs after `step`: every `every`, and last."""
  return step == total_steps or (every > 0 and step % every == 0)


# --- the step -----------------------------------------------------------------------------------


def make_train_step(
  apply: Callable,
  tx: optax.GradientTransformation,
  schedule,
  *,
  config: Mapping,
  num_classes: int,
  param_shardings: Any = None,
):
  """Returns the pure step `(state, batch, rng) -> (state, metrics)` of `apply`
  (`models.functional`: the model split once into graph and state).

  `batch` arrays are [accum_steps, micro_batch, ...]; the gradient is the mean of the micro-batch
  gradients, which equals the gradient of the whole batch (each micro-batch loss is a mean over the
  same number of examples). Dropout keys are `fold_in(fold_in(rng, step), micro_batch_index)`.
  uint8 images get the device end of `config.pp_train` first, then mixup (`config.mixup`) mixes
  each micro-batch with a key folded from its dropout key (vit_jax.data.device).
  With `config.ema_decay`, `state['ema']` follows the updated params (vit_jax.ema).
  """
  from vit_jax import data  # Imported late: TensorFlow is heavy and hides accelerators on import.

  loss_kind, smoothing = config['loss'], float(config['label_smoothing'])
  if loss_kind not in losses.LOSSES:
    raise ValueError(f'unknown loss {loss_kind!r}; expected one of {losses.LOSSES}')
  prologue = data.device_preprocess(config.get('pp_train', ''))
  mix = dict(config.get('mixup') or {})
  mix = mix if mix.get('p') or mix.get('cutmix_p') else None
  use_ema = ema_lib.enabled(config)

  def loss_fn(params, micro, rng):
    image, targets = prologue(micro['image']), losses.targets(micro, num_classes, smoothing)
    if mix:
      image, targets = data.mixup(rng, image, targets, **mix)
    logits = apply(params, image, train=True, rng=rng)
    return jnp.mean(losses.per_example_loss(logits, targets, loss_kind))

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state, batch, rng):
    step = state['step']
    rng = jax.random.fold_in(rng, step)
    params = state['params']
    accum = jax.tree.leaves(batch)[0].shape[0]

    def micro_step(carry, xs):
      i, micro = xs
      loss, grads = grad_fn(params, micro, jax.random.fold_in(rng, i))
      if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    if accum == 1:
      loss, grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(rng, 0))
    else:
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(micro_step, zeros, (jnp.arange(accum), batch))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {'step': step + 1, 'params': new_params, 'opt_state': opt_state}
    if use_ema:  # After the optimizer update; `step + 1` updates so far (timm's num_updates).
      new_state['ema'] = ema_lib.update(state['ema'], new_params, ema_lib.decay(step + 1, config))
    metrics = {
      'train/loss': loss,
      'train/grad_norm': grad_norm,
      'train/lr': schedule(step),
      # The updated params' norm: an overflow in the update is caught before it is checkpointed.
      'train/param_norm': optax.global_norm(new_params),
    }
    return new_state, metrics

  return train_step


# --- state --------------------------------------------------------------------------------------


class Trainer:
  """Model, optimizer, mesh and the jitted functions of one run; usable from tests and notebooks."""

  def __init__(self, config: Mapping, *, num_classes: int, devices=None):
    self.config = config
    self.num_classes = num_classes
    self.mesh = sharding.make_mesh(config['mesh'], devices)
    self.rules = sharding.logical_rules(config)
    image_size = int(config['image_size'])
    kwargs = config_lib.model_kwargs(config)
    build = lambda rngs: models.get_model(
      config['model_name'], num_classes, image_size=image_size, rngs=rngs, **kwargs
    )
    # The model's graph and abstract state, split once; the step is a pure function of the state.
    self.model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    self.apply = models.functional(self.model)
    axes = models.logical_axes(self.model)
    self.tx, self.schedule = optim.make_optimizer(config)
    self.accum_steps = int(config['accum_steps'])
    self.micro_batch = int(config['batch_size']) // self.accum_steps
    self.use_ema = ema_lib.enabled(config)

    def init(rng):  # Boxed: leaves carry logical axis names, for the shardings.
      params = sharding.box(models.params_of(build(nnx.Rngs(rng))), axes)
      state = {'step': jnp.zeros((), jnp.int32), 'params': params}
      state['opt_state'] = self.tx.init(params)
      if self.use_ema:  # Starts as the params (timm's deepcopy), sharded like them.
        state['ema'] = ema_lib.copy(params)
      return state

    boxed = jax.eval_shape(init, jax.random.key(0))
    self.state_shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(boxed),
      self.state_shardings,
    )
    self._init = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=self.state_shardings)
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    train_step = make_train_step(
      self.apply,
      self.tx,
      self.schedule,
      config=config,
      num_classes=num_classes,
      param_shardings=self.state_shardings['params'],
    )
    self.step_fn = train_step  # The pure step, for benchmarks and tests.
    self._train_step = jax.jit(
      train_step,
      in_shardings=(
        self.state_shardings,
        sharding.batch_sharding(self.mesh, self.rules, 1),
        self.replicated,
      ),
      out_shardings=(self.state_shardings, self.replicated),
      donate_argnums=(0,),
    )
    self.compiled_train_step = None

  def _context(self):
    """Mesh and logical rules active while tracing, so the models' activation constraints apply."""
    return sharding.mesh_context(self.mesh, self.rules)

  def init_state(self, seed: int) -> dict:
    """Fresh state, created directly in its shardings (no host holds a full copy)."""
    with self._context():
      return self._init(jax.random.key(seed))

  def with_params(self, state: dict, params: Any) -> dict:
    """Replaces params by host arrays (e.g. a pretrained checkpoint) and re-inits the optimizer."""
    params = sharding.to_global(params, self.state_shardings['params'])
    opt_init = jax.jit(self.tx.init, out_shardings=self.state_shardings['opt_state'])
    out = {'step': state['step'], 'params': params, 'opt_state': opt_init(params)}
    if self.use_ema:  # The EMA starts from the new params.
      out['ema'] = jax.jit(ema_lib.copy, out_shardings=self.state_shardings['ema'])(params)
    return out

  def host_params(self, state: dict) -> Any:
    """Params as numpy on every process (gathers across processes when needed)."""
    return jax.tree.map(npz.to_numpy, state['params'])

  def compile(self, state: dict, batch: dict, rng: jax.Array):
    """AOT-compiles the train step for these shapes; returns (compiled, model FLOPs per step).

    FLOPs are `metrics.model_flops` (analytic, per image) times the global batch: rematerialized
    work is not counted, and scanned or sharded layouts count the same.
    """
    with self._context():
      compiled = self._train_step.lower(state, batch, rng).compile()
    self.compiled_train_step = compiled
    per_image = metrics_lib.model_flops(self.model, int(self.config['image_size']))
    return compiled, per_image * int(self.config['batch_size'])

  def train_step(self, state: dict, batch: dict, rng: jax.Array):
    if self.compiled_train_step is not None:
      return self.compiled_train_step(state, batch, rng)
    with self._context():
      return self._train_step(state, batch, rng)

  def global_batch(self, local_batch: Mapping[str, np.ndarray], *, stacked: bool):
    return sharding.global_batch(local_batch, self.mesh, self.rules, ndim_prefix=int(stacked))

  def eval_context(self):
    """What the evaluators need from this trainer (`vit_jax.evaluators.EvalContext`): the model's
    function, the number of classes, the mesh, rules and parameter shardings."""
    from vit_jax.evaluators import common

    return common.EvalContext(
      self.apply, self.num_classes, self.mesh, self.rules, self.state_shardings['params']
    )


# --- the loop -----------------------------------------------------------------------------------


def _datasets(config: Mapping, *, start_batch: int, micro_batch: int):
  from vit_jax import data  # Imported late: TensorFlow is heavy and hides accelerators on import.

  return data.get_dataset(
    config['dataset'],
    config['train_split'],
    preprocess=config['pp_train'],
    train=True,
    global_batch_size=micro_batch,
    data_dir=config['data_dir'] or None,
    seed=int(config['data_seed']),
    start_batch=start_batch,
    shuffle_buffer=int(config['shuffle_buffer']),
    cache=bool(config.get('cache_data', False)),
  )


def _batches(dataset, accum_steps: int) -> Iterator[dict[str, np.ndarray]]:
  """Stacks `accum_steps` consecutive micro-batches into [accum_steps, micro_batch, ...]."""
  iterator = iter(dataset)
  while True:
    micro = [next(iterator) for _ in range(accum_steps)]
    yield {k: np.stack([m[k] for m in micro]) for k in micro[0] if k != 'mask'}


def _num_classes(config: Mapping) -> int:
  if int(config['num_classes']) > 0:
    return int(config['num_classes'])
  from vit_jax import data

  return data.get_dataset_info(config['dataset'], config['data_dir'] or None)[0]


def write_config(config: Mapping, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(as_dict, f, indent=2, sort_keys=True, default=str)


def _write_labels(config: Mapping, workdir: str) -> None:
  """Stores the label names in the workdir: predict and export read them from there."""
  if jax.process_index() != 0:
    return
  from vit_jax import data

  names = data.get_dataset_info(config['dataset'], config['data_dir'] or None)[1]
  checkpoint_load.write_labels(labels_lib.readable(list(names)), workdir)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, devices=None
) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, checkpoints.

  Holds the workdir's lock (`guards.WorkdirLock`) for the whole run.

  Args:
    config: a recipe config (the fields: vit_jax/config.py).
    workdir: where checkpoints/, metrics.jsonl, tensorboard/ and config.json go.
    devices: devices for the mesh (default: all).

  Returns:
    {'step', 'checkpoint_dir', 'preempted', 'eval/<split>/accuracy', ...} of the last step.

  Raises:
    config.ConfigError: a config mistake (`config.validate`), before anything is written.
    TrainingDivergedError: a NaN/Inf loss or gradient, or a spike past `config.spike_factor`
      times the running median; the last good checkpoint is left as it was.
    train_state.CheckpointError: the workdir is locked by a live run, its checkpoint cannot be
      resumed with this config, or a save failed (each with a one-line message).
  """
  config_lib.validate(config, workdir, devices=devices)  # After any overrides; before any data.
  # From here SIGTERM stops the run: at once (`Preempted`) until the loop starts, then at a step.
  watcher = train_state.PreemptionWatcher()
  lock = guards.WorkdirLock(workdir)
  try:
    lock.acquire()
    return _train_and_evaluate(config, workdir, devices, watcher)
  finally:
    lock.release()  # Also after a signal that interrupted `acquire`.
    watcher.restore()


def _restore_or_init(trainer: Trainer, ckpt, config: Mapping, layout: str):
  """(state, rng, data batches read or None): the workdir's checkpoint when it holds one, else a
  fresh state (its params from `config.pretrained_path` when set)."""
  rng = jax.device_put(jax.random.key_data(jax.random.key(int(config['seed']))), trainer.replicated)
  abstract = dict(
    trainer.abstract_state,
    rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=trainer.replicated),
  )
  restored = resume.restore(ckpt, abstract, config, num_classes=trainer.num_classes, layout=layout)
  if restored is not None:
    state, meta = restored
    logging.info('resuming from step %d', int(state['step']))
    # The data position is read, not recomputed: accum_steps may differ.
    return state, state.pop('rng'), meta.get('data_batches')
  state = trainer.init_state(int(config['seed']))
  if config['pretrained_path']:
    params = checkpoint_load.load_pretrained(  # An original-format .npz or one of our workdirs.
      config['pretrained_path'], trainer.host_params(state), model_name=config['model_name']
    )
    state = trainer.with_params(state, params)
  return state, rng, None


class _Bookkeeping:
  """Everything the loop does besides stepping: the pending step metrics and their flush (which
  stops a diverged run), checkpoints (never after a bad step), and the periodic log / eval /
  checkpoint work of one step (`periodic`, the one place that reads the `*_every` fields).
  """

  def __init__(self, config, trainer, ckpt, ckpt_dir, *, writer, meter, evaluators, layout,
               start_batch, first_step):  # fmt: skip
    self.config, self.trainer, self.ckpt, self.ckpt_dir = config, trainer, ckpt, ckpt_dir
    self.writer, self.meter, self.evaluators, self.layout = writer, meter, evaluators, layout
    self.start_batch, self.first_step = start_batch, first_step
    self.total_steps = int(config['total_steps'])
    self.pending: list[tuple[int, dict]] = []
    self.last_saved = ckpt.latest_step()
    self.spikes = guards.SpikeGuard(float(config.get('spike_factor', 0.0)))
    self.result: dict[str, Any] = {'preempted': False}

  def flush(self) -> dict[str, float]:
    """Fetches pending step metrics; raises on the first non-finite or spiking one."""
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending.clear()
    for s, m in zip(steps, fetched):
      bad = [f'non-finite {k}={m[k]}' for k in ('train/loss', 'train/grad_norm', 'train/param_norm')
             if not np.isfinite(m[k])] or self.spikes.check(m)  # fmt: skip
      if bad:
        self.ckpt.wait()
        good = 'none yet'
        if self.last_saved is not None:
          good = f'step {self.last_saved} in {self.ckpt_dir}'
        raise TrainingDivergedError(
          s,
          f'{", ".join(bad)} at step {s}; last good checkpoint: {good}. '
          'Lower lr, raise warmup, or check the data.',
        )
    if not fetched:
      return {}
    out = {k: float(np.mean([m[k] for m in fetched])) for k in ('train/loss', 'train/grad_norm')}
    return out | {k: float(fetched[-1][k]) for k in ('train/lr', 'train/param_norm')}

  def save(self, at: int, state: dict, rng: jax.Array) -> None:
    self.flush()  # Never checkpoint a state that followed a non-finite step.
    meta = {
      'data_batches': self.start_batch + (at - self.first_step) * self.trainer.accum_steps,
      'micro_batch': self.trainer.micro_batch,
      'num_classes': self.trainer.num_classes,
      'layout': self.layout,
      'config': json.loads(self.config.to_json_best_effort()),
    }
    if self.ckpt.save(at, dict(state, rng=rng), meta):
      self.last_saved = at

  def periodic(self, step: int, state: dict, rng: jax.Array) -> None:
    """The log, eval and checkpoint work due after `step` (`due`)."""
    scalars = {}
    if due(step, int(self.config['log_every']), self.total_steps):
      scalars.update(self.flush())
      scalars.update(self.meter.summary(step))
    ran = [ev for ev in self.evaluators.values() if due(step, ev.every, self.total_steps)]
    for ev in ran:
      scalars.update(ev.run(state['params']))
      if 'ema' in state:  # The same evaluation of the EMA weights: eval/<name>/ema_*.
        scalars.update(ema_lib.metric_names(ev.run(state['ema'])))
    if ran:
      self.meter.reset(step)
    if scalars:
      self.writer.write(step, scalars)
      if jax.process_index() == 0:
        logging.info('%s', metrics_lib.format_progress(step, self.total_steps, scalars))
      self.result.update(scalars)
    if due(step, int(self.config['checkpoint_every']), self.total_steps):
      self.save(step, state, rng)


def _train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, devices, watcher: train_state.PreemptionWatcher
) -> dict[str, Any]:
  total_steps = int(config['total_steps'])
  trainer = Trainer(config, num_classes=_num_classes(config), devices=devices)
  logging.info(
    'mesh %s over %d devices, %d processes; model %s with %d params',
    sharding.describe(trainer.mesh),
    trainer.mesh.size,
    jax.process_count(),
    config['model_name'],
    models.count_params(trainer.model),
  )
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  ckpt = train_state.Checkpointer(
    ckpt_dir,
    max_to_keep=int(config['keep_checkpoints']) or None,
    async_save=bool(config['async_checkpoints']),
  )
  layout = f'mesh {sharding.describe(trainer.mesh)} in {jax.process_count()} processes'
  state, rng, start_batch = _restore_or_init(trainer, ckpt, config, layout)
  step = int(jax.device_get(state['step']))
  write_config(config, workdir)  # Only now: a refused resume leaves the old config.json.
  if start_batch is None:
    start_batch = step * trainer.accum_steps
  train_ds = _datasets(config, start_batch=start_batch, micro_batch=trainer.micro_batch)
  _write_labels(config, workdir)  # The dataset is prepared by now.
  from vit_jax import data
  from vit_jax import evaluators as evaluators_lib  # Late, as the data: imports TensorFlow.

  put = lambda local: trainer.global_batch(local, stacked=True)
  batches = data.prefetch(_batches(train_ds, trainer.accum_steps), put)  # Next ones on devices.
  writer = metrics_lib.MetricWriter(workdir, resume_step=step)
  meter = metrics_lib.Throughput(
    global_batch_size=int(config['batch_size']),
    num_devices=trainer.mesh.size,
    total_steps=total_steps,
  )
  book = _Bookkeeping(
    config, trainer, ckpt, ckpt_dir, writer=writer, meter=meter,
    evaluators=evaluators_lib.build(config, trainer.eval_context()), layout=layout,
    start_batch=start_batch, first_step=step,
  )  # fmt: skip
  failure = None
  try:
    if step < total_steps:  # Compile once, before the loop, for the first batch's shapes.
      t = time.perf_counter()
      peek = next(batches)
      batches = itertools.chain([peek], batches)
      _, flops = trainer.compile(state, peek, rng)  # A global batch (data.prefetch).
      peak, how = metrics_lib.peak_flops_total(trainer.mesh.size)
      meter.flops_per_step, meter.peak_flops = flops, peak
      logging.info(
        'compiled train step in %.1fs; %.3g model FLOPs/step; peak %s',
        time.perf_counter() - t,
        flops,
        how,
      )
    first = True
    watcher.arm()  # A signal from now on checkpoints the step reached.
    while step < total_steps:
      t = time.perf_counter()
      batch = next(batches)
      # Steps run asynchronously: a wait while the devices still run the last dispatched step
      # costs nothing. Only one that ends with them done can have idled them (counted whole).
      if state['step'].is_ready():
        meter.add_data_wait(time.perf_counter() - t)
      state, step_metrics = trainer.train_step(state, batch, rng)
      step += 1
      book.pending.append((step, step_metrics))
      ckpt.check(step)  # A failed background save stops the run within a step, naming the cause.
      if first:  # The throughput window starts after compilation and the first step.
        jax.block_until_ready(state['step'])
        meter.reset(step)
        first = False
      book.periodic(step, state, rng)
      if step < total_steps and watcher.should_stop(step):
        logging.warning('preempted: checkpointing step %d and exiting', step)
        book.save(step, state, rng)
        book.result['preempted'] = True
        break
    book.flush()
    if book.last_saved != step:
      book.save(step, state, rng)
    ckpt.wait()
  except BaseException as e:
    failure = e
  # Closed outside the handler: a pending save that fails too is logged (by orbax) without this
  # failure's traceback chained to it; the run's own error is reported once, in one line.
  writer.close()
  save_error = ckpt.close(at=step)
  if save_error is not None:
    if not isinstance(failure, (TrainingDivergedError, KeyboardInterrupt)):
      raise save_error from None  # E.g. a full disk failed the save, then a metrics write.
    logging.error('%s', save_error)  # The divergence or interrupt is still the run's error.
  if failure is not None:
    if isinstance(failure, OSError) and failure.errno in train_state.DISK_FULL:
      raise train_state.OutputWriteError(failure, ckpt_dir, book.last_saved) from None
    raise failure
  result = book.result
  result.update(step=step, checkpoint_dir=os.path.join(ckpt_dir, str(step)), workdir=workdir)
  return result
