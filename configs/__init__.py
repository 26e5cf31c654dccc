"""Training recipes, installed as `vit_jax.configs`: `get_config(arg)` for `--config=NAME[:ARG]`.

Each recipe sets values of the library's schema (`vit_jax.config`); `python -m vit_jax.main
--config=quickstart:runlocal` finds it by name from any directory.
"""
