"""Weight EMA: an exponential moving average of the parameters, kept beside them in the train state.

`config.ema_decay = d` (0: off) keeps `state['ema']`, a float32 copy of the params sharded like
them. After the optimizer update of every step (inside the jitted step) it becomes

    ema <- d_n * ema + (1 - d_n) * params        (n: updates so far, this one included)

in float32 whatever the params' dtype: with bfloat16 params, (1 - d) * params at d = 0.9999 is far
below a bfloat16 EMA's resolution (2**-8 of its value), which would never move. d_n is timm's
`ModelEmaV3.get_decay(n)` (pytorch-image-models timm/utils/model_ema.py:188-205 with
`update_after_step=0`, `min_decay=0`; timm's train.py:1391-1393 calls it with the update count
after `num_updates += 1`):

    t = n - 1;  d_n = 0 if t <= 0
                d_n = min(d, 1 - (1 + t / ema_warmup_gamma) ** -ema_warmup_power)  with ema_warmup
                d_n = d                                                            without

so the first update copies the params (as timm), and with the warmup the decay grows from 0 to `d`
(timm's defaults gamma 1, power 2/3: 0.999 at 31.6k steps, model_ema.py:141-146). The EMA is
checkpointed with the rest of the state and exact on resume; evaluators report `eval/<name>/ema_*`
beside the raw weights' metrics; `vit_jax.predict` and `vit_jax.export` use it when present
(`--weights=ema|raw`). docs/training.md "Weight EMA".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


def enabled(config: Mapping) -> bool:
  return float(config.get('ema_decay', 0.0) or 0.0) > 0.0


def decay(count, config: Mapping):
  """d_n of the update number `count` (1 for the first step's update): see the module doc.

  Works on Python numbers (numpy-free reference) and traced integers alike.
  """
  d = float(config['ema_decay'])
  t = jnp.maximum(jnp.asarray(count, jnp.float32) - 1.0, 0.0)
  if config.get('ema_warmup', False):
    gamma, power = float(config['ema_warmup_gamma']), float(config['ema_warmup_power'])
    value = jnp.minimum(1.0 - (1.0 + t / gamma) ** -power, d)
  else:
    value = jnp.full((), d, jnp.float32)
  return jnp.where(t <= 0, 0.0, value).astype(jnp.float32)


def update(ema: Any, params: Any, d) -> Any:
  """d * ema + (1 - d) * params per leaf, in float32 (the EMA's dtype, `copy`)."""
  f32 = jnp.float32
  return jax.tree.map(
    lambda e, p: (d * e.astype(f32) + (1.0 - d) * p.astype(f32)).astype(e.dtype), ema, params
  )


def copy(params: Any) -> Any:
  """A fresh float32 copy of `params` (its own buffers: the state is donated to the step)."""
  return jax.tree.map(lambda x: jnp.copy(x).astype(jnp.float32), params)


def metric_names(scalars: Mapping[str, float]) -> dict[str, float]:
  """'eval/<name>/<metric>' -> 'eval/<name>/ema_<metric>' (an evaluator's result on the EMA)."""
  return {'/ema_'.join(key.rsplit('/', 1)): value for key, value in scalars.items()}
