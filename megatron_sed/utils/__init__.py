"""Small helpers every part of megatron-sed shares: rank-aware printing (log.py), atomic
file writes (files.py), and the one-line note for megatron-core's expected CPU-machine
warnings (fallbacks.py)."""
