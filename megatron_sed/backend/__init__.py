"""Backends that let Megatron's CUDA-only code run elsewhere: `cpu` (CPU tensors with gloo,
for CI, the demo and development machines without a GPU; process-wide, installed by the
trainer) and `rotary` (Megatron's RotaryEmbedding on a CPU without that backend, for the
models eval, export and RL build)."""
