"""Core attention on torch's scaled_dot_product_attention, with Megatron's interface.

Megatron-Core's `DotProductAttention` allocates from a CUDA memory buffer and fuses its
softmax with CUDA kernels, so it cannot run on CPU. `SDPACoreAttention` is a drop-in
`core_attention` submodule for `SelfAttention`: same constructor, same inputs
([sq, b, np, hn] query, [sk, b, ng, hn] key/value, a boolean mask where True means
"masked out", Megatron's convention) and the same [sq, b, np*hn] output. It has no
parameters, so swapping it in leaves the state-dict names of the local spec unchanged.

Packed sequences on CPU are expressed as a block-diagonal mask (see
`megatron_sed.data.reader.build_block_causal_mask`); THD `PackedSeqParams` are Transformer Engine's business.

Context parallelism (a CPU stand-in for Transformer Engine's CP attention): each CP rank
holds Megatron's load-balanced chunks r and 2CP-1-r of every sequence
(megatron.core.utils.get_batch_on_this_cp_rank). The keys and values of the whole
sequence are all-gathered over the CP group (backward: the gradients are reduce-scattered
back, so each rank gets the sum of every rank's contribution to its chunks), put back in
sequence order, and the local queries attend to them under the global causal mask (or the
block-causal mask, whose query rows the batch split already cut to this rank's chunks).
It is exact, not efficient: no ring overlap, no a2a / p2p variants, O(S) keys per rank.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch import Tensor


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v per head, computed by torch SDPA.

    Supports causal masks, arbitrary boolean masks broadcastable to [b, np, sq, sk]
    (block-diagonal for packed samples) and grouped-query attention (ng < np)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if pg_collection is not None and hasattr(pg_collection, "cp"):
            self.cp_group = pg_collection.cp
        elif config.context_parallel_size > 1:
            self.cp_group = parallel_state.get_context_parallel_group()
        else:
            self.cp_group = None
        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp_size = pg_collection.tp.size()
        else:
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        head_dim = divide(projection_size, config.num_attention_heads)
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise ValueError(
                "SDPACoreAttention takes packed samples as a block-diagonal attention mask, "
                "not PackedSeqParams (THD needs --transformer-impl transformer_engine)"
            )
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        cp_positions = None
        if self.cp_group is not None and self.cp_group.size() > 1:
            key, value, cp_positions = _gather_cp_keys_values(key, value, self.cp_group)
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        rep = self.heads_per_partition // self.groups_per_partition
        if rep > 1:  # GQA: each key/value group serves `rep` consecutive query heads
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        # [s, b, n, d] -> [b, n, s, d] (views; SDPA accepts strided inputs)
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)

        sdpa_mask = None
        if attention_mask is not None or cp_positions is not None:
            masked = attention_mask.to(torch.bool) if attention_mask is not None else None
            if causal:
                if cp_positions is not None:  # local queries at their global positions
                    future = cp_positions.view(-1, 1) < torch.arange(sk, device=q.device).view(1, -1)
                else:
                    future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(sk - sq + 1)
                masked = future if masked is None else masked | future
            if masked is not None:
                sdpa_mask = ~masked  # SDPA: True = may attend
            causal = False
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p == 0.0:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, is_causal=causal, scale=self.softmax_scale
            )
        else:
            # Like DotProductAttention: heads differ per TP rank, so the dropout mask comes
            # from the TP-rank RNG of Megatron's tracker (not under sequence parallelism).
            tracker = tensor_parallel.get_cuda_rng_tracker()
            fork = not self.config.sequence_parallel and tracker.is_initialized()
            with tracker.fork() if fork else contextlib.nullcontext():
                if q.is_cuda:  # SDPA's fused dropout draws from the CUDA generator
                    ctx = F.scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        attn_mask=sdpa_mask,
                        dropout_p=dropout_p,
                        is_causal=causal,
                        scale=self.softmax_scale,
                    )
                else:
                    ctx = _attention_with_dropout(q, k, v, sdpa_mask, causal, self.softmax_scale, dropout_p)
        # [b, n, sq, d] -> [sq, b, n*d]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def cp_chunk_positions(seq_len_local: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global sequence positions of a CP rank's tokens: Megatron's load-balanced layout
    splits a sequence into 2 x CP chunks and gives rank r chunks r and 2CP-1-r."""
    c = seq_len_local // 2
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def _gather_cp_keys_values(key: Tensor, value: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather [s/cp, b, ng, hn] keys and values over the CP group (backward:
    reduce-scatter of their gradients) and reorder them to sequence order; returns them
    with the global positions of this rank's queries."""
    size, rank = group.size(), group.rank()
    s_local = key.shape[0]
    if s_local % 2:
        raise ValueError(f"context parallelism needs an even local sequence length, got {s_local}")
    gathered_pos = torch.cat([cp_chunk_positions(s_local, size, r, key.device) for r in range(size)])
    order = torch.argsort(gathered_pos)  # gathered (rank-major) -> sequence order
    key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=group)
    value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=group)
    return (
        key.index_select(0, order),
        value.index_select(0, order),
        cp_chunk_positions(s_local, size, rank, key.device),
    )


def _attention_with_dropout(q, k, v, allowed: Optional[Tensor], causal: bool, scale: float, p: float):
    """softmax(q k^T * scale) with dropout, then @ v, spelled out. On CPU, SDPA's dropout
    draws from torch's CPU generator, which no RNG tracker controls and which Megatron
    itself draws from after restoring it from a checkpoint (the data loaders' seeds), so a
    resumed run would get other masks. `F.dropout` here draws from the generator the
    tracker forks (on the CPU backend: megatron_sed.backend.cpu's "CUDA" generator), as
    Megatron's DotProductAttention does."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(sk - sq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), p=p, training=True)
    return torch.matmul(probs, v)
