"""Few-shot linear probes on frozen pre-logits features (big_vision's `fewshot_lsr`).

For each dataset, the features of its train and test splits are computed once per run, sharded
over the mesh; then, on the host, for each seed and shot count: `shots` random train examples per
class, features standardised by their mean and std, a constant bias feature appended, and the
closed-form ridge regression onto targets in {-1, 1} (2 * one-hot - 1) with `l2_reg`; the probe's
argmax is scored on the whole test split. Reported: `eval/<name>/<dataset>_<shots>shot`, the mean
over seeds.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vit_jax.evaluators import common

BIAS_CONSTANT = 100.0  # Large, so the bias is nearly unregularised (as big_vision's).


def pre_logits(apply, params: Any, images: jax.Array) -> jax.Array:
  """The input of the model's `head` layer (the representation the classifier sees) for `images`
  in the model's input range; `apply` is `models.functional(model)`."""
  return apply(params, images, pre_logits=True).reshape(images.shape[0], -1)


def ridge_accuracy(
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_test: np.ndarray,
  y_test: np.ndarray,
  num_classes: int,
  l2_reg: float,
) -> float:
  """Test accuracy of the ridge-regression probe fit on (x_train, y_train) (see module doc)."""
  x_train = np.asarray(x_train, np.float64)
  mean = x_train.mean(0, keepdims=True)
  std = x_train.std(0, keepdims=True) + 1e-5

  def features(x):
    x = (np.asarray(x, np.float64) - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)

  x = features(x_train)
  y = 2.0 * np.eye(num_classes)[y_train] - 1.0
  n, d = x.shape
  if n >= d:  # (x^T x + l2 I)^-1 x^T y
    w = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
  else:  # x^T (x x^T + l2 I)^-1 y: the same, through the smaller n x n system.
    w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  return float(np.mean(np.argmax(features(x_test) @ w, -1) == np.asarray(y_test)))


def sample_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` examples per class (fewer where a class has fewer), drawn with `seed`."""
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
  return np.concatenate(per_class)


class FewShot:
  """Linear probes on several datasets; see the module doc."""

  def __init__(
    self,
    name: str,
    context: common.EvalContext,
    config,
    *,
    datasets: dict,
    shots: tuple,
    l2_reg: float,
    num_seeds: int,
    pp: str,
    batch_size: int,
    every: int,
  ):
    self.name, self.context, self.every = name, context, every
    self.shots, self.l2_reg, self.num_seeds = shots, l2_reg, num_seeds
    self.datasets = {
      key: tuple(common.get_dataset(config, dataset, s, pp, batch_size) for s in (train, test))
      for key, (dataset, train, test) in datasets.items()
    }
    from vit_jax import data

    prologue = data.device_preprocess(pp)  # The device part of `pp` (value_range).

    def features(params, batch):
      images = prologue(batch['image'])
      return pre_logits(context.apply, params, images), batch['label'], batch['mask']

    # Features with their labels and mask, gathered onto every device: each host reads them all.
    self._features = context.jit_sums(features)

  def _features_of(self, params, dataset) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    with self.context.mesh_context():
      for batch in self.context.batches(dataset, ('image', 'label', 'mask')):
        f, label, mask = (np.asarray(a) for a in jax.device_get(self._features(params, batch)))
        feats.append(f[mask])
        labels.append(label[mask])
    return np.concatenate(feats), np.concatenate(labels)

  def run(self, params: Any) -> dict[str, float]:
    out = {}
    for key, (train, test) in self.datasets.items():
      x_train, y_train = self._features_of(params, train)
      x_test, y_test = self._features_of(params, test)
      probe_test = (x_test, y_test, train.num_classes, self.l2_reg)
      for shots in self.shots:
        accs = []
        for seed in range(self.num_seeds):
          idx = sample_shots(y_train, train.num_classes, shots, seed)
          accs.append(ridge_accuracy(x_train[idx], y_train[idx], *probe_test))
        out[f'eval/{self.name}/{key}_{shots}shot'] = float(np.mean(accs))
    return out
