"""Small helpers every part of megatron-sed shares: rank-aware printing (log.py) and
atomic file writes (files.py)."""
