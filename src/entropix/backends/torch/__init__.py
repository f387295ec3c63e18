"""The PyTorch backend: model, KV cache, sampler ops, loader."""
