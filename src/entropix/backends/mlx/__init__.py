"""The MLX backend: entropix on Apple silicon (Metal), and on Linux through the CPU build."""
