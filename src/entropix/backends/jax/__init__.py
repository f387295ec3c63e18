"""The JAX backend: the same model and sampler in JAX, sharded over a device mesh."""
