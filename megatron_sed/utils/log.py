"""Megatron's console convention, once: informational lines from global rank 0, the
training/evaluation lines from the last rank (where the loss lives under pipeline
parallelism)."""

from __future__ import annotations

import torch.distributed as dist


def print_rank_0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def print_rank_last(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(msg, flush=True)
