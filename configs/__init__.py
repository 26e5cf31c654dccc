"""Training recipes: `get_config(arg)` functions for `python -m vit_jax.main --config FILE:ARG`."""
