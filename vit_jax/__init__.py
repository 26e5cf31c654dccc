"""vit_jax: Vision Transformers in JAX/Flax, from Colab to TPU pods."""

__version__ = '0.1.0'
