"""Which tokens a context-parallel rank holds (megatron_sed.model.context_parallel) and the
local attention over packed THD samples; the CP runs themselves are in
tests/train/test_engine_layouts.py."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sed.model.context_parallel import (
    check_thd_partition,
    cp_chunk_positions,
    thd_partition_indices,
)
from tests.helpers.attention import tiny_sdpa_attention
from tests.helpers.host_sync import NoHostSync


def test_thd_partition_indices_hand_worked():
    """Samples of padded lengths 8, 4, 4 (cu_seqlens_padded [0, 8, 12, 16]) at CP 2: each
    is cut into 4 chunks (of 2, 1, 1 tokens); rank 0 keeps chunks 0 and 3 of each, rank 1
    chunks 1 and 2 (Transformer Engine's thd_get_partitioned_indices layout)."""
    cu = torch.tensor([0, 8, 12, 16], dtype=torch.int32)
    assert thd_partition_indices(cu, 16, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 15]
    assert thd_partition_indices(cu, 16, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    # CP 3, samples of 6 and 12: chunks of 1 and 2 tokens, rank r keeps r and 5 - r
    cu = torch.tensor([0, 6, 18])
    assert thd_partition_indices(cu, 18, 3, 1).tolist() == [1, 4, 8, 9, 14, 15]
    ranks = torch.cat([thd_partition_indices(cu, 18, 3, r) for r in range(3)])
    assert sorted(ranks.tolist()) == list(range(18))  # every token on exactly one rank


def test_one_sample_is_the_whole_sequence_layout():
    """A row holding one sample splits as Megatron's get_batch_on_this_cp_rank splits a
    padded sequence."""
    for cp in (2, 4):
        for r in range(cp):
            thd = thd_partition_indices(torch.tensor([0, 32]), 32, cp, r)
            assert thd.tolist() == cp_chunk_positions(32 // cp, cp, r).tolist()


def test_thd_partition_indices_has_no_host_sync():
    """The CP attention computes the partition from the device cu_seqlens in every layer."""
    cu = torch.tensor([0, 8, 12, 16], dtype=torch.int32)
    with NoHostSync() as mode:
        thd_partition_indices(cu, 16, 2, 1)
    assert mode.checked > 0


def test_thd_partition_needs_samples_padded_to_2cp():
    check_thd_partition([0, 8, 12, 16], 16, 2)
    with pytest.raises(ValueError, match=r"multiple of 2 x CP \(4\); got sample lengths \[6, 6\]"):
        check_thd_partition([0, 6, 12, 16], 16, 2)  # 6, 6, 4
    with pytest.raises(ValueError, match="not at the 20 tokens"):
        check_thd_partition([0, 8, 12, 16], 20, 2)


def test_sdpa_core_attention_thd_equals_the_block_causal_mask():
    """THD input (one flattened row, PackedSeqParams with each sample's padding) gives the
    mask path's outputs on every real token; no real token sees another sample or padding."""
    from megatron_sed.data.reader import build_block_causal_mask, packed_seq_params_from_segments

    attn = tiny_sdpa_attention()
    seg = torch.tensor([[0, 0, 0, -2, 1, 1, 1, 1, 2, 2, -2, -2, -1, -1, -1, -1]])
    s = seg.shape[1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, 1, 4, 8, generator=g)
    k = torch.randn(s, 1, 2, 8, generator=g)
    v = torch.randn(s, 1, 2, 8, generator=g)
    masked = attn(q, k, v, build_block_causal_mask(seg))
    thd = attn(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=packed_seq_params_from_segments(seg))
    assert thd.shape == (s, 1, 32)
    real = (seg[0] >= 0) | (seg[0] == -1)
    torch.testing.assert_close(thd[real], masked[real], rtol=1e-6, atol=1e-6)
    # sample 1 alone (tokens 4..7): the same outputs
    alone = attn(q[4:8], k[4:8], v[4:8], None)
    torch.testing.assert_close(thd[4:8], alone, rtol=1e-6, atol=1e-6)
    assert math.isfinite(float(thd.abs().sum()))
