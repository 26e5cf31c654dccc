"""Export to other ecosystems: original `.npz` (`vit_jax.checkpoint.save_npz`), Hugging Face."""
