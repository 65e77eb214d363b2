"""Vocab-parallel SED-SFT loss: the torch implementation (CPU, and GPU for top_k > 8).

Written in the style of `megatron.core.tensor_parallel.cross_entropy`: small static
helpers and one autograd Function; reached through `vocab_parallel_sed_loss`
(megatron_sed.ops.sed_loss). Memory and traffic:

- One float32 working buffer of the local logits, as Megatron's CE has (for float32
  input it *is* the input, overwritten in place, exactly like Megatron's CE). It ends
  the forward holding exp(z - m_r), the unnormalised local softmax; the per-row factor
  exp(m_r - lse) that normalises it is folded into the backward's single multiply.
- The forward walks the rows in cache-sized chunks: the dtype conversion, top-k,
  shift, exp and the two row sums touch each chunk while it sits in cache, so the
  extra statistics (entropy, top-k) cost almost no memory traffic.
- One all-gather of `[N, 4 + k]` partials per forward (see partials.py), none in
  backward. The backward is Megatron's in-place CE backward with one scalar per row
  (docs/method.md): grad_j = g * (p_j * (alpha + beta * log p_j) - gamma * [j = y]),
  with the target term formed in float32 before autograd casts to the input dtype.
- No host synchronisation on CUDA tensors (the target range check is asynchronous there).
"""

from __future__ import annotations

import torch

from megatron_sed.ops.config import KernelOptions, SEDConfig
from megatron_sed.ops.partials import NUM_FIXED_COLS, Combined, backward_needs_log, gather_and_combine

# Rows per chunk (KernelOptions.chunk_bytes overrides). On CPU with one intra-op thread,
# chunks of ~2 MiB (work + scratch fit a core's L2) stay in cache while the forward makes
# its several passes over them; with several threads each op on a chunk is a fork/join
# parallel region, so chunks must be large enough to amortise it (small chunks were 4-10x
# slower at 2 threads). On a GPU every op is a kernel launch: a few large chunks (each op
# then streams a big slice; at 8192 x 131072 fp32, 8 chunks of 512 MiB instead of 2,000 of
# 2 MiB). The one chunk-sized scratch buffer is capped at 2% (CPU) / 1/8 (GPU) of the
# working buffer.
_MIN_CHUNK_BYTES = 2 << 20
_GPU_CHUNKS = 8


def chunk_bytes(total_bytes: int, device: torch.device, opts: KernelOptions) -> int:
    """Bytes of logits per chunk of rows for a working buffer of `total_bytes`."""
    if opts.chunk_bytes is not None:
        return opts.chunk_bytes
    if device.type != "cpu":
        return max(64 << 20, -(-total_bytes // _GPU_CHUNKS))
    threads = torch.get_num_threads()
    if threads <= 1:
        return _MIN_CHUNK_BYTES
    return max(_MIN_CHUNK_BYTES, min((32 << 20) * threads, total_bytes // 50))


def rows_per_chunk(num_rows: int, row_bytes: int, device: torch.device, opts: KernelOptions) -> int:
    row_bytes = max(row_bytes, 1)
    return max(1, min(num_rows, chunk_bytes(num_rows * row_bytes, device, opts) // row_bytes))


class VocabParallelSED:
    """Static helpers of the torch implementation (one idea each)."""

    @staticmethod
    def working_dtype(dtype: torch.dtype) -> torch.dtype:
        """float32 math for every input dtype; float64 stays float64 (gradcheck)."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    @staticmethod
    def local_target(target_1d: torch.Tensor, vocab_start: int, vocab_end: int):
        """Local column of each row's target, and whether it lies in this shard."""
        in_shard = (target_1d >= vocab_start) & (target_1d < vocab_end)
        local = torch.where(in_shard, target_1d - vocab_start, torch.zeros_like(target_1d))
        return local, in_shard

    @staticmethod
    def row_topk(w: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
        """The k largest values of each row, descending.

        torch.topk on CPU costs ~4x a max reduction. The k largest values always lie in
        the k blocks with the largest block maxima (a value outside them would have k
        larger block maxima above it), so a fast block-max pass, a top-k over the block
        maxima and a top-k over the k candidate blocks give the same values."""
        n, vocab = w.shape
        if vocab % block or vocab < 8 * block or k * block * 2 > vocab:
            return torch.topk(w, k, dim=-1, sorted=True).values
        blocks = w.view(n, vocab // block, block)
        best = blocks.amax(dim=-1).topk(k, dim=-1).indices
        candidates = blocks.gather(1, best.unsqueeze(-1).expand(n, k, block))
        return candidates.view(n, k * block).topk(k, dim=-1, sorted=True).values

    @staticmethod
    def forward_partials(
        logits_2d: torch.Tensor,
        work: torch.Tensor,
        local_target: torch.Tensor,
        in_shard: torch.Tensor,
        k_local: int,
        num_topk_cols: int,
        opts: KernelOptions,
    ) -> torch.Tensor:
        """Fill `work` with exp(z - m_r) chunk by chunk and return the [N, 4 + k] partials.

        `work` may alias `logits_2d` (float32 input: in place, as Megatron's CE)."""
        n, vocab = work.shape
        partials = torch.empty((n, NUM_FIXED_COLS + num_topk_cols), dtype=work.dtype, device=work.device)
        if num_topk_cols > k_local:
            partials[:, NUM_FIXED_COLS + k_local :] = float("-inf")
        same = work.data_ptr() == logits_2d.data_ptr()
        rows = rows_per_chunk(n, vocab * work.element_size(), work.device, opts)
        scratch = torch.empty((rows, vocab), dtype=work.dtype, device=work.device)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            w = work[start:end]
            if not same:
                w.copy_(logits_2d[start:end])
            top = VocabParallelSED.row_topk(w, k_local)
            row_max = top[:, 0]
            partials[start:end, NUM_FIXED_COLS : NUM_FIXED_COLS + k_local] = top
            partials[start:end, 0] = row_max
            target_logit = w.gather(1, local_target[start:end].unsqueeze(1)).squeeze(1)
            partials[start:end, 3] = torch.where(
                in_shard[start:end], target_logit, torch.zeros_like(target_logit)
            )
            shifted = torch.sub(w, row_max.unsqueeze(1), out=scratch[: end - start])
            torch.exp(shifted, out=w)
            partials[start:end, 1] = w.sum(dim=-1)
            # sum_j e_j (z_j - m_r), in the chunk's scratch while it sits in cache
            # (a batched dot product via bmm is several times slower on CPU).
            partials[start:end, 2] = shifted.mul_(w).sum(dim=-1)
        return partials

    @staticmethod
    def backward_inplace(
        work: torch.Tensor,
        log_scale: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        gamma: torch.Tensor,
        local_target: torch.Tensor,
        in_shard: torch.Tensor,
        grad_output: torch.Tensor,
        use_log: bool,
        opts: KernelOptions,
    ) -> torch.Tensor:
        """Turn `work` (= exp(z - m_r)) into dL/dz in place and return it.

        p_j = work_j * exp(log_scale), log_scale = m_r - lse."""
        g = grad_output.reshape(-1).to(work.dtype)
        if not use_log:
            work.mul_((torch.exp(log_scale) * alpha * g).unsqueeze(1))
        else:
            n, vocab = work.shape
            rows = rows_per_chunk(n, vocab * work.element_size(), work.device, opts)
            tiny = torch.finfo(work.dtype).tiny
            scale = torch.exp(log_scale) * g
            for start in range(0, n, rows):
                end = min(start + rows, n)
                w = work[start:end]
                # log p_j = log(work_j) + m_r - lse; work_j == 0 contributes 0 * finite.
                log_p = torch.log(w.clamp_min(tiny)).add_(log_scale[start:end].unsqueeze(1))
                log_p.mul_(beta[start:end].unsqueeze(1)).add_(alpha[start:end].unsqueeze(1))
                w.mul_(log_p).mul_(scale[start:end].unsqueeze(1))
        target_term = torch.where(in_shard, gamma * g, torch.zeros_like(g))
        rows_idx = torch.arange(work.shape[0], device=work.device)
        work[rows_idx, local_target] -= target_term
        return work


class TorchSEDLoss(torch.autograd.Function):
    """apply(logits, target, cfg, group, world_size, rank) -> (loss, *stats in
    megatron_sed.ops.stats.STAT_NAMES order), shaped like target."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, cfg: SEDConfig, group, world_size, rank):
        vocab_local = vocab_parallel_logits.shape[-1]
        logits_2d = vocab_parallel_logits.reshape(-1, vocab_local)
        target_1d = target.reshape(-1)
        dtype = VocabParallelSED.working_dtype(vocab_parallel_logits.dtype)
        if vocab_parallel_logits.dtype == torch.float32 and vocab_parallel_logits.is_contiguous():
            # In place, like Megatron's CE on float32 logits. The saved tensor is the input
            # itself: autograd forbids saving a view whose base was modified. float64 (the
            # reference / gradcheck dtype) is never modified in place.
            work_full = vocab_parallel_logits
        else:
            work_full = torch.empty(vocab_parallel_logits.shape, dtype=dtype, device=logits_2d.device)
        work = work_full.view(-1, vocab_local)

        vocab_start = rank * vocab_local
        local_target, in_shard = VocabParallelSED.local_target(
            target_1d, vocab_start, vocab_start + vocab_local
        )
        k_local = min(cfg.top_k, vocab_local)
        partials = VocabParallelSED.forward_partials(
            logits_2d, work, local_target, in_shard, k_local, cfg.top_k, cfg.kernel
        )
        out: Combined = gather_and_combine(partials, target_1d, cfg, group, world_size)

        log_scale = partials[:, 0] - out.lse
        ctx.use_log = backward_needs_log(cfg)
        ctx.opts = cfg.kernel
        ctx.save_for_backward(work_full, log_scale, out.alpha, out.beta, out.gamma, local_target, in_shard)
        ctx.input_shape = vocab_parallel_logits.shape

        # float32 results (float64 for float64 input, the reference dtype)
        outputs = out.outputs(target.shape)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        work_full, log_scale, alpha, beta, gamma, local_target, in_shard = ctx.saved_tensors
        if work_full.dtype == torch.float64:
            # float64 (reference / gradcheck dtype): keep the saved buffer intact so the
            # graph can be differentiated more than once, as gradcheck does.
            work_full = work_full.clone()
        grad = VocabParallelSED.backward_inplace(
            work_full.view(-1, work_full.shape[-1]),
            log_scale,
            alpha,
            beta,
            gamma,
            local_target,
            in_shard,
            grad_loss,
            ctx.use_log,
            ctx.opts,
        )
        return grad.view(ctx.input_shape), None, None, None, None, None
