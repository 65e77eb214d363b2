"""Backends that let Megatron's CUDA-only training code run elsewhere: `cpu` (CPU tensors
with gloo, for CI, the demo and development machines without a GPU)."""
