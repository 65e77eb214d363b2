"""Triton kernels of the SED loss: one pass over a row of the local vocab shard.

Both kernels run one program per row (token) and walk its `n_cols` local logits in
blocks of BLOCK columns, reading the logits in their own dtype (bf16 / fp16 / fp32 /
fp64) and doing all math in ACC (float32, or float64 for float64 input). Nothing of
size [tokens, vocab] is allocated besides the gradient itself.

Forward (`sed_partials_kernel`) writes the per-rank partials of partials.py per row:

    m_r, s_r = sum e^(z - m_r), a_r = sum e^(z - m_r)(z - m_r), z_y (0 if not local),
    the K largest local logits, descending (-inf padded)

with an online update: when the running max moves from m to m' (d = m - m' < 0),
s' = e^d s and a' = e^d (a + d s), then the block's own terms are added (per lane;
the lanes are summed once at the end).
The running top-K is a KP-wide register vector; a block only enters the (k reductions
long) insertion step when its maximum beats the current k-th largest value, which after
the first few blocks is rare.

Backward (`sed_grad_kernel`) recomputes p_j = exp(z_j - lse) from the logits and writes

    grad_j = p_j * (alpha + beta * (z_j - lse)) - gamma * [j == y]

in ACC before one rounding to the gradient's dtype (alpha, beta, gamma: partials.Combined's
coefficients already multiplied by the incoming gradient g). Rows whose three coefficients are all zero
(ignored targets) are written as zeros without reading their logits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sed_partials_kernel(
    logits_ptr,
    stride_row,
    target_ptr,
    partials_ptr,
    n_cols,
    vocab_start,
    NUM_PARTIAL_COLS: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # int64 row offsets: 16384 rows x 131072 columns already overflow int32.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    kpos = tl.arange(0, KP)
    neg_inf = float("-inf")

    # The running max is a scalar of type ACC (a python float would be float32); the sums
    # are per-lane vectors, reduced once at the end: one block reduction (the max) per
    # iteration instead of three.
    m = tl.max(tl.full([BLOCK], neg_inf, ACC), axis=0)
    s_vec = tl.zeros([BLOCK], ACC)
    a_vec = tl.zeros([BLOCK], ACC)
    # Running top-K; lanes >= K hold +inf so they are never the minimum (never replaced).
    topv = tl.where(kpos < K, tl.full([KP], neg_inf, ACC), tl.full([KP], float("inf"), ACC))

    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        valid = cols < n_cols
        z = tl.load(row_ptr + cols, mask=valid, other=neg_inf).to(ACC)
        blk_max = tl.max(z, axis=0)
        if blk_max > m:
            # The max moved (often only in the first blocks): rescale what was summed,
            # s' = e^d s and a' = e^d (a + d s) with d = m - m' < 0. Until a finite logit is
            # seen m = -inf and the sums are 0 (the where() keeps -inf * 0 = nan out).
            d = m - blk_max
            scale = tl.exp(d)
            a_vec = tl.where(s_vec > 0, scale * (a_vec + d * s_vec), 0.0)
            s_vec = s_vec * scale
            m = blk_max
        # Shift by 0 while every logit so far is -inf (keeps -inf - -inf = nan out).
        m_ref = tl.where(m == neg_inf, 0.0, m)
        shifted = z - m_ref
        e = tl.exp(shifted)  # 0 on padding lanes and -inf logits
        s_vec += e
        # where(): there e = 0 and shifted = -inf, whose product is nan.
        a_vec += tl.where(e > 0, e * shifted, 0.0)

        kth = tl.min(topv, axis=0)
        if blk_max > kth:
            cand = z
            for _ in tl.static_range(K):
                best, best_idx = tl.max(cand, axis=0, return_indices=True)
                low, low_idx = tl.min(topv, axis=0, return_indices=True)
                # Replace the smallest kept value if `best` beats it (lane KP: no lane).
                topv = tl.where(kpos == tl.where(best > low, low_idx, KP), best, topv)
                # Remove one occurrence only: equal logits count separately, as in torch.topk.
                cand = tl.where(offs == best_idx, neg_inf, cand)

    local = tl.load(target_ptr + row) - vocab_start
    in_shard = (local >= 0) & (local < n_cols)
    safe_local = tl.where(in_shard, local, 0)
    z_y = tl.load(row_ptr + safe_local, mask=in_shard, other=0.0).to(ACC)
    z_y = tl.where(in_shard, z_y, 0.0)

    out = partials_ptr + row * NUM_PARTIAL_COLS
    tl.store(out + 0, m)
    tl.store(out + 1, tl.sum(s_vec, axis=0))
    tl.store(out + 2, tl.sum(a_vec, axis=0))
    tl.store(out + 3, z_y)
    # Sort the top-K descending by K extractions over KP lanes (cheap, once per row).
    rest = tl.where(kpos < K, topv, neg_inf)
    for i in tl.static_range(K):
        best, best_idx = tl.max(rest, axis=0, return_indices=True)
        tl.store(out + 4 + i, best)
        rest = tl.where(kpos == best_idx, neg_inf, rest)


@triton.jit
def sed_grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    grad_stride_row,
    target_ptr,
    lse_ptr,
    alpha_ptr,
    beta_ptr,
    gamma_ptr,
    n_cols,
    vocab_start,
    USE_LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row = grad_ptr + row * grad_stride_row
    offs = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row).to(ACC)
    alpha = tl.load(alpha_ptr + row).to(ACC)
    beta = tl.load(beta_ptr + row).to(ACC)
    gamma = tl.load(gamma_ptr + row).to(ACC)
    local = tl.load(target_ptr + row) - vocab_start  # outside [0, n_cols): no target term here

    if tl.abs(alpha) + tl.abs(beta) + tl.abs(gamma) == 0:
        # Ignored row: zero gradient, and no need to read the logits (which may be anything).
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            tl.store(
                grad_row + cols, tl.zeros([BLOCK], ACC).to(grad_ptr.dtype.element_ty), mask=cols < n_cols
            )
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            valid = cols < n_cols
            z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(ACC)
            log_p = z - lse
            p = tl.exp(log_p)
            if USE_LOG:
                g = p * (alpha + beta * log_p)
            else:
                g = p * alpha
            # The target term is subtracted in ACC, before the one rounding to the output dtype.
            g = g - tl.where(cols == local, gamma, 0.0)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)
