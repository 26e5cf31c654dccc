"""Building evaluators from the config, and what they share: batches onto the mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax

from vit_jax import sharding

TYPES = ('classification', 'real', 'fewshot')


class Evaluator(Protocol):
  every: int  # Steps between runs (0: only at the end; see train.due).

  def run(self, params: Any) -> dict[str, float]:
    """One pass; returns {'eval/<name>/<metric>': value}, the same on every process."""


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator needs from a run, and nothing more: the model's function, the number of
  classes, and the mesh, logical rules and parameter shardings that the evaluation's programs use.
  `vit_jax.train.Trainer.eval_context()` makes one for the run's model and mesh.
  """

  apply: Callable[[Any, jax.Array], jax.Array]  # (params, images) -> logits (or features).
  num_classes: int
  mesh: jax.sharding.Mesh
  rules: tuple  # Logical axis name -> mesh axes (vit_jax.sharding).
  param_shardings: Any  # A tree of shardings shaped like the params.

  def mesh_context(self):
    """The mesh and logical rules, so the model's activation constraints apply while tracing."""
    return sharding.mesh_context(self.mesh, self.rules)

  def batches(self, dataset, keys: tuple[str, ...]):
    """Global (sharded over the mesh's batch axes) arrays of `keys` for each batch of `dataset`,
    the next ones copied to the devices while the current one is evaluated."""
    from vit_jax import data  # Imported late: TensorFlow is heavy.

    def put(local):
      missing = [k for k in keys if k not in local]
      if missing:
        raise ValueError(
          f'evaluation batches lack {missing} (have {sorted(local)}); check the dataset and pp'
        )
      return sharding.global_batch({k: local[k] for k in keys}, self.mesh, self.rules)

    return data.prefetch(iter(dataset), put)

  def jit_sums(self, fn):
    """Jits `fn(params, batch)` with the run's shardings; results replicated on every device."""
    batch = sharding.batch_sharding(self.mesh, self.rules)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.jit(fn, in_shardings=(self.param_shardings, batch), out_shardings=replicated)


def get_dataset(config: Mapping, dataset: str, split: str, pp: str, batch_size: int):
  """A one-pass eval `vit_jax.data.Dataset` (every process: its share, padded, masked)."""
  from vit_jax import data  # Imported late: TensorFlow is heavy.

  return data.get_dataset(
    dataset,
    split,
    preprocess=pp,
    train=False,
    global_batch_size=batch_size,
    data_dir=config['data_dir'] or None,
    cache=bool(config.get('cache_data', False)),
  )


def build(config: Mapping, context: EvalContext) -> dict[str, Evaluator]:
  """Evaluators of `config.eval_splits` (classification on the training dataset, `pp_eval`, every
  `eval_every`) and of each `config.evals` entry whose `every` is not negative.

  Raises:
    ValueError: an unknown type or a name used twice (the message names it).
  """
  from vit_jax.evaluators import classification, fewshot

  entries = {}
  for split in filter(None, (s.strip() for s in config['eval_splits'].split(','))):
    entries[split] = dict(type='classification', split=split, every=int(config['eval_every']))
  for name, entry in dict(config.get('evals') or {}).items():
    entry = dict(entry)
    if name in entries:
      raise ValueError(f'evals.{name} has the name of an eval split in eval_splits; rename it')
    if entry.get('type') not in TYPES:
      raise ValueError(f'evals.{name}.type={entry.get("type")!r}; expected one of {TYPES}')
    entries[name] = entry
  out = {}
  for name, e in entries.items():
    if int(e['every']) < 0:
      continue
    batch_size = int(e.get('batch_size') or config['eval_batch_size'])
    pp = e.get('pp') or config['pp_eval']
    if e['type'] == 'fewshot':
      out[name] = fewshot.FewShot(
        name,
        context,
        config,
        datasets=dict(e['datasets']),
        shots=tuple(e['shots']),
        l2_reg=float(e['l2_reg']),
        num_seeds=int(e['num_seeds']),
        pp=pp,
        batch_size=batch_size,
        every=int(e['every']),
      )
      continue
    dataset = get_dataset(config, e.get('dataset') or config['dataset'], e['split'], pp, batch_size)
    cls = classification.Real if e['type'] == 'real' else classification.Classification
    out[name] = cls(name, context, dataset, pp=pp, loss=config['loss'], every=int(e['every']))
  return out
