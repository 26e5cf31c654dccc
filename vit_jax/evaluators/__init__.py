"""Evaluators, big_vision style: `config.evals` maps a name to a type, a dataset and split, its
preprocessing and how often it runs (configs/common.py `eval_entry`, `fewshot_entry`).

    evaluators = build(config, context)   # {name: Evaluator}; context: EvalContext
    for name, ev in evaluators.items():
      if due(step, ev.every, total_steps):
        scalars.update(ev.run(params))    # {'eval/<name>/accuracy': ..., ...}

Types: 'classification' (top-1, top-5, loss; exact over hosts), 'real' (ImageNet ReaL top-1),
'fewshot' (closed-form regularised least-squares linear probes on frozen pre-logits features).
"""

from vit_jax.evaluators.common import TYPES, EvalContext, Evaluator, build

__all__ = ['TYPES', 'EvalContext', 'Evaluator', 'build']
