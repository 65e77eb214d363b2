"""Tensor-parallel communication for the SED loss: which group, and the one all-gather."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def resolve_tp_group(tp_group):
    """None -> Megatron's tensor-parallel group when parallel_state is initialised,
    else no communication (returns None)."""
    if tp_group is not None:
        return tp_group
    try:
        from megatron.core import parallel_state  # noqa: PLC0415 (heavy; only when no TP group is given)
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return None
    if dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def group_size_and_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group=group), dist.get_rank(group=group)


def all_gather_partials(partials: torch.Tensor, group: Optional[object], world_size: int) -> torch.Tensor:
    """[N, C] per rank -> [world_size, N, C] on every rank, in rank order (one collective)."""
    if world_size == 1:
        return partials.unsqueeze(0)
    out = torch.empty(
        (world_size * partials.shape[0], partials.shape[1]),
        dtype=partials.dtype,
        device=partials.device,
    )
    dist.all_gather_into_tensor(out, partials.contiguous(), group=group)
    return out.view(world_size, partials.shape[0], partials.shape[1])
