"""Classification (top-1, top-5, loss) and ImageNet ReaL accuracy over a dataset's split.

Sums are computed on the sharded global batch and reduced by XLA, so the result over any number of
processes is that of one pass over the split (padding rows carry mask=False and count for nothing).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vit_jax import losses
from vit_jax.evaluators import common


class Classification:
  """Top-1 / top-5 accuracy and mean loss of the model on one split, exact over hosts.

  Reports `eval/<name>/accuracy`, `eval/<name>/top5` and `eval/<name>/loss`. `pp` is the
  preprocessing string the dataset was made with: its device part (`value_range`) runs here.
  """

  keys = ('image', 'label', 'mask')
  metrics = {'accuracy': 'correct', 'top5': 'top5', 'loss': 'loss'}  # Metric -> its sum.

  def __init__(
    self, name: str, context: common.EvalContext, dataset, *, pp: str, loss: str, every: int
  ):
    from vit_jax import data

    self.name, self.context, self.dataset, self.every = name, context, dataset, every
    prologue = data.device_preprocess(pp)
    logits = lambda params, batch: context.apply(params, prologue(batch['image']))
    self._sums = context.jit_sums(self._sums_fn(logits, context.num_classes, loss))

  @staticmethod
  def _sums_fn(logits_fn, num_classes: int, loss: str):
    """`sums(params, batch)` -> the batch's sums of `metrics`' values and `count`."""

    def sums(params, batch):
      logits = logits_fn(params, batch).astype(jnp.float32)
      mask = batch['mask'].astype(jnp.float32)
      label = batch['label']
      top1 = jnp.argmax(logits, -1) == label
      _, topk = jax.lax.top_k(logits, min(5, num_classes))
      top5 = jnp.any(topk == label[:, None], axis=-1)
      onehot = jax.nn.one_hot(label, num_classes, dtype=jnp.float32)
      per_example = losses.per_example_loss(logits, onehot, loss)  # The training loss.
      return {
        'correct': jnp.sum(top1 * mask),
        'top5': jnp.sum(top5 * mask),
        'loss': jnp.sum(per_example * mask),
        'count': jnp.sum(mask),
      }

    return sums

  def totals(self, params: Any) -> dict[str, float]:
    """Sums over the split: correct, (top5, loss,) count."""
    totals = None
    with self.context.mesh_context():
      for batch in self.context.batches(self.dataset, self.keys):
        out = self._sums(params, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
      raise ValueError(f'eval {self.name!r}: the dataset gave no batches')
    return {k: float(v) for k, v in jax.device_get(totals).items()}

  def run(self, params: Any) -> dict[str, float]:
    """One pass over the split: {'eval/<name>/<metric>': mean over its examples}."""
    totals = self.totals(params)
    count = max(totals['count'], 1.0)
    return {f'eval/{self.name}/{k}': totals[key] / count for k, key in self.metrics.items()}


class Real(Classification):
  """ImageNet ReaL (Beyer et al., 2020): a prediction is right if it is in the example's ReaL label
  set; examples whose set is empty are left out, as in the paper.

  Batches carry `real_labels`, multi-hot [batch, num_classes] (vit_jax.data gives them for
  `imagenet2012_real`). Reports `eval/<name>/accuracy`.
  """

  keys = ('image', 'real_labels', 'mask')
  metrics = {'accuracy': 'correct'}

  @staticmethod
  def _sums_fn(logits_fn, num_classes, loss):
    def sums(params, batch):
      real = batch['real_labels'] > 0
      pred = jnp.argmax(logits_fn(params, batch), -1)
      hit = jnp.take_along_axis(real, pred[:, None], axis=-1)[:, 0]
      valid = batch['mask'] & jnp.any(real, axis=-1)
      return {'correct': jnp.sum(hit & valid), 'count': jnp.sum(valid)}

    return sums
