"""Vocab-parallel SED loss on Triton kernels: one read of the logits forward, one read
and one write backward, no float32 copy of the logits.

Same contract as the torch Function (torch_sed.TorchSEDLoss); the dispatcher
`vocab_parallel_sed_loss` (sed_loss.py) picks it with `SEDConfig(impl="triton")`, or
`impl="auto"` on CUDA tensors. Only the per-row work differs: the kernels in
triton_kernels.py produce the partials and the gradient; the one all-gather and the
combination (partials.gather_and_combine) are shared with the torch implementation.

Memory: the forward saves the logits themselves (no copy) and five numbers per row.
The backward allocates the gradient in the logits' dtype, or, with
`SEDConfig(kernel=KernelOptions(grad_in_place=True))`, writes it over the logits (peak =
the logits alone). In place is off by default because it destroys the logits, which the
caller may still hold; the graph can then be backpropagated only once. Block size and
warps come from the same KernelOptions.

Limits: top_k <= MAX_TOP_K (the running top-k lives in registers); `unsupported_reason`
says why an input cannot run (the dispatcher raises it for impl="triton" and falls back
to torch for impl="auto").
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from megatron_sed.ops import triton_kernels
from megatron_sed.ops.config import KernelOptions, SEDConfig
from megatron_sed.ops.partials import NUM_FIXED_COLS, backward_needs_log, gather_and_combine

MAX_TOP_K = 8
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def kernels_interpreted() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""

    return isinstance(triton_kernels.sed_partials_kernel, InterpretedFunction)


def unsupported_reason(logits: torch.Tensor, cfg: SEDConfig) -> Optional[str]:
    """Why the Triton kernels cannot run on this input, or None."""
    if cfg.top_k > MAX_TOP_K:
        return (
            f"SEDConfig.top_k={cfg.top_k} exceeds the Triton kernels' maximum top_k of {MAX_TOP_K} "
            "(use impl='torch' or a smaller top_k)"
        )
    if logits.dtype not in SUPPORTED_DTYPES:
        return f"the Triton SED kernels read {SUPPORTED_DTYPES} logits, got {logits.dtype}"
    if not logits.is_cuda and not kernels_interpreted():
        return (
            f"the Triton SED kernels need CUDA tensors, got logits on {logits.device} "
            "(to run them on CPU, set TRITON_INTERPRET=1 before triton is imported)"
        )
    return None


def _acc_dtypes(dtype: torch.dtype):
    """(torch, triton) accumulation dtypes: float32, float64 for float64 input."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _block_size(n_cols: int, dtype: torch.dtype, opts: KernelOptions) -> int:
    if opts.block_size is not None:
        return opts.block_size
    # 8 KiB of logits per block (4096 bf16 columns, 16 per thread at 8 warps): the forward
    # kernel then needs ~128 registers per thread, so two programs fit on an SM. Untuned
    # on hardware yet: benchmarks/gpu_loss_bench.py --sweep times the alternatives.
    target = (8 * 1024) // torch.empty((), dtype=dtype).element_size()
    return min(triton.next_power_of_2(max(n_cols, 1)), target)


def _num_warps(block: int, opts: KernelOptions) -> int:
    if opts.num_warps is not None:
        return opts.num_warps
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def sed_partials(
    logits_2d: torch.Tensor,
    target_1d: torch.Tensor,
    vocab_start: int,
    top_k: int,
    opts: KernelOptions = KernelOptions(),
) -> torch.Tensor:
    """[N, V_r] logits (unit column stride) -> [N, 4 + top_k] partials (see partials.py)."""
    n, n_cols = logits_2d.shape
    acc_torch, acc_tl = _acc_dtypes(logits_2d.dtype)
    partials = torch.empty((n, NUM_FIXED_COLS + top_k), dtype=acc_torch, device=logits_2d.device)
    if n == 0:
        return partials
    block = _block_size(n_cols, logits_2d.dtype, opts)
    triton_kernels.sed_partials_kernel[(n,)](
        logits_2d,
        logits_2d.stride(0),
        target_1d,
        partials,
        n_cols,
        vocab_start,
        NUM_PARTIAL_COLS=NUM_FIXED_COLS + top_k,
        K=top_k,
        KP=max(2, triton.next_power_of_2(top_k)),
        BLOCK=block,
        ACC=acc_tl,
        num_warps=_num_warps(block, opts),
    )
    return partials


def sed_grad(
    logits_2d: torch.Tensor,
    target_1d: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    use_log: bool,
    out: torch.Tensor,
    opts: KernelOptions = KernelOptions(),
) -> torch.Tensor:
    """Write grad_j = p_j (alpha + beta log p_j) - gamma [j = y] into `out` (may be
    `logits_2d`); alpha, beta, gamma per row, already scaled by the incoming gradient."""
    n, n_cols = logits_2d.shape
    if n == 0:
        return out
    _, acc_tl = _acc_dtypes(logits_2d.dtype)
    block = _block_size(n_cols, logits_2d.dtype, opts)
    triton_kernels.sed_grad_kernel[(n,)](
        logits_2d,
        logits_2d.stride(0),
        out,
        out.stride(0),
        target_1d,
        lse,
        alpha,
        beta,
        gamma,
        n_cols,
        vocab_start,
        USE_LOG=use_log,
        BLOCK=block,
        ACC=acc_tl,
        num_warps=_num_warps(block, opts),
    )
    return out


class TritonSEDLoss(torch.autograd.Function):
    """apply(logits, target, cfg, group, world_size, rank) -> (loss, *stats in
    megatron_sed.ops.stats.STAT_NAMES order), shaped like target. Inputs are validated
    (and this implementation chosen) by sed_loss.vocab_parallel_sed_loss."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, cfg: SEDConfig, group, world_size, rank):
        vocab_local = vocab_parallel_logits.shape[-1]
        logits_2d = vocab_parallel_logits.reshape(-1, vocab_local)
        if vocab_local > 1 and logits_2d.stride(1) != 1:
            logits_2d = logits_2d.contiguous()  # a copy in the logits' own dtype, rare
        target_1d = target.reshape(-1).to(torch.int64).contiguous()
        vocab_start = rank * vocab_local

        partials = sed_partials(logits_2d, target_1d, vocab_start, cfg.top_k, cfg.kernel)
        out = gather_and_combine(partials, target_1d, cfg, group, world_size)
        valid = target_1d != cfg.ignore_index

        # Rows the backward must not touch (ignored targets) carry lse = 0 and zero
        # coefficients; the kernel then writes zeros without reading the row.
        lse = torch.where(valid, out.lse, torch.zeros_like(out.lse))
        ctx.save_for_backward(logits_2d, target_1d, lse, out.alpha, out.beta, out.gamma)
        ctx.use_log = backward_needs_log(cfg)
        ctx.vocab_start = vocab_start
        ctx.opts = cfg.kernel
        ctx.input_shape = vocab_parallel_logits.shape

        outputs = out.outputs(target.shape)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        logits_2d, target_1d, lse, alpha, beta, gamma = ctx.saved_tensors
        g = grad_loss.reshape(-1).to(alpha.dtype)
        alpha, beta, gamma = (g * alpha).contiguous(), (g * beta).contiguous(), (g * gamma).contiguous()
        out = (
            logits_2d
            if ctx.opts.grad_in_place
            else torch.empty_like(logits_2d, memory_format=torch.contiguous_format)
        )
        sed_grad(
            logits_2d,
            target_1d,
            ctx.vocab_start,
            lse.contiguous(),
            alpha,
            beta,
            gamma,
            ctx.use_log,
            out,
            ctx.opts,
        )
        return out.view(ctx.input_shape), None, None, None, None, None
