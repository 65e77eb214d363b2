"""Which tokens each context-parallel rank holds: the two layouts Megatron uses.

* Whole sequence (padded samples, Megatron's ``get_batch_on_this_cp_rank`` without
  ``cu_seqlens``): the sequence is cut into 2 x CP chunks and rank r keeps chunks r and
  2CP-1-r (`cp_chunk_positions`).
* Per packed sample (THD, Megatron's ``_get_batch_on_this_cp_rank_per_document_balancing``
  with Transformer Engine's ``tex.thd_get_partitioned_indices``): every sample, padded
  to a multiple of 2 x CP, is cut into 2 x CP chunks of its own and rank r keeps chunks
  r and 2CP-1-r of each (`thd_partition_indices`).

Both return the global indices of a rank's tokens, in the order the rank holds them. They
are plain torch with static shapes, so the same code splits the batch on the host (CPU
or GPU runs: no device sync) and tells the CPU stand-in CP attention
(megatron_sed.model.attention) where its queries and every rank's keys sit.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cp_chunk_positions(seq_len_local: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global sequence positions of a CP rank's tokens: Megatron's load-balanced layout
    splits a sequence into 2 x CP chunks and gives rank r chunks r and 2CP-1-r."""
    c = seq_len_local // 2
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def thd_partition_indices(cu_seqlens_padded: Tensor, total_tokens: int, cp_size: int, cp_rank: int) -> Tensor:
    """Indices (int64, on ``cu_seqlens_padded``'s device) of the ``total_tokens /
    cp_size`` tokens of a THD batch that CP rank ``cp_rank`` keeps: for each sequence of
    padded length L (a multiple of 2 x CP), chunks r and 2CP-1-r of L / (2 CP) tokens.

    The semantics of Transformer Engine's ``tex.thd_get_partitioned_indices(cu_seqlens,
    total_tokens, world_size, rank)`` (its ``thd_partition_indices_kernel`` in
    ``transformer_engine/common/fused_attn``), written out in torch so that the CPU runs
    and tests use it: local token m falls in sequence i (binary search in
    cu_seqlens_padded / CP); its index within the local part of i picks the first chunk
    (r) or the second (2CP-1-r). ``cu_seqlens_padded[-1]`` must equal ``total_tokens``.
    """
    cu = cu_seqlens_padded.to(torch.int64)
    w = 2 * cp_size
    cu_local = cu // cp_size  # each sequence's share on one rank (2 chunks)
    m = torch.arange(total_tokens // cp_size, device=cu.device)
    seq = (torch.searchsorted(cu_local, m, right=True) - 1).clamp(0, cu.numel() - 2)
    start = cu_local[seq]
    half = (cu_local[seq + 1] - start) // 2  # one chunk
    index = m - start
    chunk = torch.where(index < half, cp_rank, w - 2 - cp_rank)  # TE: rank or 2(W-1)-rank
    return index + start * cp_size + half * chunk


def check_thd_partition(cu_seqlens_padded: list[int], total_tokens: int, cp_size: int) -> None:
    """The layout `thd_partition_indices` needs (checked on the host lengths)."""
    if cu_seqlens_padded[-1] != total_tokens:
        raise ValueError(
            f"cu_seqlens_padded ends at {cu_seqlens_padded[-1]}, not at the {total_tokens} tokens"
        )
    lengths = [b - a for a, b in zip(cu_seqlens_padded, cu_seqlens_padded[1:])]
    bad = [n for n in lengths if n % (2 * cp_size)]
    if bad:
        raise ValueError(
            f"context parallelism over packed samples needs each sample padded to a multiple "
            f"of 2 x CP ({2 * cp_size}); got sample lengths {bad}"
        )
