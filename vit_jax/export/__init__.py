"""Export to other ecosystems: original `.npz` (`vit_jax.npz.save`), Hugging Face."""
