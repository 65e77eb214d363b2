"""Core attention on torch's scaled_dot_product_attention, with Megatron's interface.

Megatron-Core's `DotProductAttention` allocates from a CUDA memory buffer and fuses its
softmax with CUDA kernels, so it cannot run on CPU. `SDPACoreAttention` is a drop-in
`core_attention` submodule for `SelfAttention`: same constructor, same inputs
([sq, b, np, hn] query, [sk, b, ng, hn] key/value, a boolean mask where True means
"masked out", Megatron's convention) and the same [sq, b, np*hn] output. It has no
parameters, so swapping it in leaves the state-dict names of the local spec unchanged.

Packed sequences come either as a block-diagonal mask (see
`megatron_sed.data.reader.build_block_causal_mask`) or, as Transformer Engine takes them,
in THD form: [t, h, d] tokens with `PackedSeqParams` (`cu_seqlens_q_padded`, else
`cu_seqlens_q`, says where each sample starts); a query then attends causally within its
sample. A sample's own padding (between `cu_seqlens_q` and the padded end) sits after its
real tokens, so no real query sees it; padding queries attend their sample's tokens (TE
returns zeros there instead: both are unsupervised and feed no real token).

Context parallelism (a CPU stand-in for Transformer Engine's CP attention): each CP rank
holds Megatron's load-balanced chunks r and 2CP-1-r, of every sequence (padded samples,
megatron.core.utils.get_batch_on_this_cp_rank) or of every packed THD sample
(Transformer Engine's thd_get_partitioned_indices); megatron_sed.model.context_parallel
gives the global index of each rank's tokens in either layout. The keys and values of the
whole sequence are all-gathered over the CP group (backward: the gradients are
reduce-scattered back, so each rank gets the sum of every rank's contribution to its
tokens), put back in sequence order, and the local queries, at their global indices,
attend to them under the global causal (or per-sample causal) mask. It is exact, not
efficient: no ring overlap, no a2a / p2p variants, O(S) keys per rank.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch import Tensor

from megatron_sed.model.context_parallel import cp_chunk_positions, thd_partition_indices


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
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        thd = packed_seq_params is not None
        if thd:  # [t, h, d] -> [t, 1, h, d]: one flattened row
            if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
                raise ValueError("SDPACoreAttention takes PackedSeqParams in THD form, without a mask")
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        cp = self.cp_group.size() if self.cp_group is not None else 1
        s_local = key.shape[0]
        total = s_local * cp
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = (packed_seq_params.cu_seqlens_q if cu is None else cu).to(key.device)
            partition = partial(thd_partition_indices, cu, total, cp)
        else:
            partition = partial(cp_chunk_positions, s_local, cp, device=key.device)
        q_pos = None  # global index of each local query (None: 0..s-1, no CP)
        if cp > 1:
            if s_local % 2:
                raise ValueError(f"context parallelism needs an even local sequence length, got {s_local}")
            key, value = _gather_cp_keys_values(key, value, self.cp_group, partition)
            q_pos = partition(self.cp_group.rank())
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
        if attention_mask is not None or q_pos is not None or thd:
            masked = attention_mask.to(torch.bool) if attention_mask is not None else None
            k_pos = torch.arange(sk, device=q.device)
            if q_pos is None:  # no CP: the last sq positions (bottom-right aligned)
                q_pos = k_pos[sk - sq :]
            if causal:
                future = q_pos.view(-1, 1) < k_pos.view(1, -1)
                masked = future if masked is None else masked | future
            if thd:  # keys of other samples
                sample = torch.searchsorted(cu.to(torch.int64), k_pos, right=True)
                other = sample[q_pos].view(-1, 1) != sample.view(1, -1)
                masked = other if masked is None else masked | other
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
        # [b, n, sq, d] -> [sq, b, n*d] (THD: [t, 1, n*d], which Megatron reshapes as it does TE's)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def _gather_cp_keys_values(key: Tensor, value: Tensor, group, partition) -> tuple[Tensor, Tensor]:
    """All-gather [s/cp, b, ng, hn] keys and values over the CP group (backward:
    reduce-scatter of their gradients) and reorder them to sequence order;
    `partition(rank)` gives the global indices of a rank's tokens."""
    gathered_pos = torch.cat([partition(r) for r in range(group.size())])
    order = torch.argsort(gathered_pos)  # gathered (rank-major) -> sequence order
    key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=group)
    value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=group)
    return key.index_select(0, order), value.index_select(0, order)


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
