"""The output layer and the SED loss fused: logit-free, vocab-parallel, sequence-parallel.

`fused_linear_sed_loss(hidden, weight, target, cfg, ...)` computes exactly what the output
layer `logits = hidden @ weight.T` followed by `vocab_parallel_sed_loss(logits, target)`
computes, without ever holding the `[s, b, V/tp]` logits or their gradient:

- forward: chunk by chunk over the tokens, the chunk's logits are formed (one GEMM in the
  input dtype, as the output layer does) and reduced at once to the op's per-row partials
  (torch_sed.VocabParallelSED.forward_partials, the same code the materialised op runs);
  only the [N, 4 + k] partials survive the chunk. The partials are combined
  (partials.gather_and_combine, the op's all-gather at TP > 1): every statistic, and the
  three per-row scalars alpha, beta, gamma of the gradient (docs/method.md).
- the gradient, one of two ways:
  * in the forward (`grad_hint` given, the weights the caller reduces the per-token loss
    with, e.g. the loss mask; 3 GEMMs): each chunk is combined at once and its dL/dz for
    an upstream gradient equal to the hint consumed while the logits are at hand; the
    backward checks that the upstream gradient is c x hint and scales the results by c
    (exact: everything is linear in the upstream gradient), or recomputes as below.
  * in the backward (4 GEMMs): chunk by chunk again, the logits are recomputed (the price
    of holding no gradient buffer), turned into dL/dz in place by the op's own backward
    (VocabParallelSED.backward_inplace).
  Either way dL/dz is rounded to the input dtype as autograd rounds the materialised
  gradient and consumed at once by the two GEMMs dX = dz W and dW += dz^T X. dW
  accumulates in float32 (in the backward way into `weight.main_grad` under Megatron's
  gradient_accumulation_fusion, as its LinearWithGradAccumulationAndAsyncCommunication
  does).

Collectives per micro-batch. Gradient in the backward, whatever the number of chunks:
forward one all-gather of the partials (plus, with sequence parallelism, the all-gather
of the hidden states that Megatron's ColumnParallelLinear does); backward, with sequence
parallelism, the same all-gather again (the gathered hidden states are not kept, as in
Megatron) and the reduce-scatter of their gradient, without it one all-reduce of the
hidden-state gradient (Megatron's column-parallel dgrad all-reduce). Gradient in the
forward: one all-gather of a chunk's partials per chunk, and the hidden-state gradient's
reduction, all in the forward. None when TP is 1.

Memory beyond the inputs and the weight gradient: the [N, 4 + k] partials, a few [N]
vectors, the gathered hidden states (SP) and one chunk's logits in a few forms (input
dtype, float32 work, its input-dtype rounding): see `default_chunk_tokens`; the gradient
in the forward holds dX and the float32 weight gradient from forward to backward (see
`grad_in_forward_fits`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sed.ops.comm import group_size_and_rank, resolve_tp_group
from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.partials import COL_MAX, Combined, backward_needs_log, gather_and_combine
from megatron_sed.ops.sed_loss import check_target
from megatron_sed.ops.stats import STAT_NAMES, SEDStats
from megatron_sed.ops.torch_sed import VocabParallelSED

# The default chunk: 1/CHUNKS_PER_PASS of the tokens (so the chunk's buffers, bf16 logits
# + their float32 copy, stay under 1/8 of the materialised bf16 logits plus gradient:
# 6 / (4 x 16) = 0.094), at least MIN_CHUNK_TOKENS (GEMMs of fewer rows run below speed:
# on a CPU core 128-row chunks cost 1.2-1.9x per GEMM, 512-row ones 1.05-1.15x), at most
# MAX_CHUNK_BYTES of float32 logits (long sequences x large vocabularies gain nothing).
CHUNKS_PER_PASS = 16
MIN_CHUNK_TOKENS = 256
MAX_CHUNK_BYTES = 256 << 20


def default_chunk_tokens(num_tokens: int, vocab_local: int) -> int:
    """Tokens per chunk when the --sed-fused-chunk-tokens knob is not set (docs/loss.md
    works the arithmetic through for Llama-3 and Qwen2.5 shapes)."""
    by_share = -(-num_tokens // CHUNKS_PER_PASS)
    by_bytes = max(1, MAX_CHUNK_BYTES // (4 * max(vocab_local, 1)))
    return max(1, min(num_tokens, max(MIN_CHUNK_TOKENS, min(by_share, by_bytes))))


def _gather_tokens(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[s/tp, b, h] per rank -> [s, b, h] in rank order (the sequence-parallel gather)."""
    out = torch.empty((world_size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _scatter_token_grad(grad: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[s, b, h] partial sums per rank -> this rank's [s/tp, b, h] of their sum."""
    out = torch.empty(
        (grad.shape[0] // world_size,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device
    )
    dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
    return out


def _addmm_low_precision(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """acc += a @ b with low-precision a, b and a float32 acc, as one tensor-core GEMM
    accumulating in float32 (CUDA's addmm with out_dtype; the float32 GEMM of the
    upcast operands, the CPU path, would run at a fraction of the speed there). False
    where unavailable: the caller then multiplies the upcast operands."""
    if not acc.is_cuda:
        return False
    try:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _weight_grad(weight: torch.Tensor, acc: torch.Tensor, into_main_grad: bool):
    """What the backward returns for the weight, Megatron's way: with gradient-accumulation
    fusion the float32 sum went into weight.main_grad, and a dummy gradient is returned
    where Megatron's DDP expects one (`grad_added_to_main_grad`)."""
    if not into_main_grad:
        return acc if acc.dtype == weight.dtype else acc.to(weight.dtype)
    if acc.data_ptr() != weight.main_grad.data_ptr():
        weight.main_grad.add_(acc)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


class _ChunkBuffers:
    """The chunk's logits in the model's dtype and, for other dtypes than float32 /
    float64, their float32 working copy: allocated once per pass."""

    def __init__(self, rows: int, vocab_local: int, dtype, work_dtype, device):
        self.low = torch.empty((rows, vocab_local), dtype=dtype, device=device)
        self.work = self.low if dtype == work_dtype else torch.empty_like(self.low, dtype=work_dtype)

    def logits(self, x_rows: torch.Tensor, weight: torch.Tensor):
        n = x_rows.shape[0]
        logits = torch.mm(x_rows, weight.t(), out=self.low[:n])
        return logits, self.work[:n]


def _chunks(num_tokens: int, chunk: int):
    for start in range(0, num_tokens, chunk):
        yield slice(start, min(start + chunk, num_tokens))


def _consume_logit_grad(dz, logits, x_rows, weight, grad_x_rows, acc) -> None:
    """The output layer's two backward GEMMs on one chunk's dL/dz (float32 `dz`, in the
    working buffer): dX rows = dz W, acc += dz^T X. For low-precision inputs dz is first
    rounded to their dtype, as autograd rounds the materialised gradient, and dW of those
    rounded values accumulates in float32 (exact products, as a low-precision GEMM with
    float32 accumulation; one rounding at the end)."""
    if logits.dtype != dz.dtype:
        dz_low = logits.copy_(dz)  # the logits' buffer is free again
        torch.mm(dz_low, weight, out=grad_x_rows)
        if not _addmm_low_precision(acc, dz_low.t(), x_rows):
            dz.copy_(dz_low)
            acc.addmm_(dz.t(), x_rows.to(dz.dtype))
    else:
        torch.mm(dz, weight, out=grad_x_rows)
        acc.addmm_(dz.t(), x_rows)


def _cat_combined(parts: list) -> Combined:
    return parts[0] if len(parts) == 1 else Combined(*(torch.cat(field) for field in zip(*parts)))


def grad_in_forward_fits(num_tokens: int, weight: torch.Tensor, into_main_grad: bool) -> bool:
    """Whether the gradient may be computed in the forward (3 GEMMs) rather than recomputed
    in the backward (4): that path holds a float32 [V/tp, h] weight-gradient buffer from its
    forward to its backward. Without gradient-accumulation fusion the backward path
    allocates the same buffer (then cast to the weight's dtype), so nothing is lost; with
    it (the backward accumulates straight into `main_grad`) the buffer is extra memory and
    is spent only within the chunk budget: 1/8 of the materialised logits plus gradient
    (docs/loss.md works the arithmetic through)."""
    if not into_main_grad:
        return True
    vocab_local, hidden = weight.shape
    buffer_bytes = 4 * vocab_local * hidden
    materialised_bytes = 2 * num_tokens * vocab_local * weight.element_size()
    return 8 * buffer_bytes <= materialised_bytes


def _upstream_scale(grad_loss: torch.Tensor, hint: torch.Tensor) -> Optional[float]:
    """The scalar c with grad_loss == c * hint, or None where the upstream gradient is not
    proportional to the hint. One host sync: the price of knowing that the gradient
    computed in the forward is the right one."""
    g = grad_loss.reshape(-1).to(hint.dtype)
    anchor = hint.abs().argmax()
    zero = torch.zeros((), dtype=hint.dtype, device=g.device)
    c = torch.where(hint[anchor] != 0, g[anchor] / hint[anchor], zero)
    proportional = (g - c * hint).abs().max() <= 1e-6 * g.abs().max()
    c, proportional = torch.stack([c, proportional.to(c.dtype)]).tolist()
    return c if proportional else None


class FusedLinearSED(torch.autograd.Function):
    """apply(hidden, weight, target, grad_hint, cfg, group, world_size, rank,
    sequence_parallel, chunk_tokens, into_main_grad) -> (loss, *stats in STAT_NAMES
    order), shaped like target."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        grad_hint,
        cfg: SEDConfig,
        group,
        world_size,
        rank,
        sequence_parallel,
        chunk,
        into_main_grad,
    ):
        x = _gather_tokens(hidden, group, world_size) if sequence_parallel and world_size > 1 else hidden
        x2d = x.reshape(-1, x.shape[-1])
        num_tokens, vocab_local = x2d.shape[0], weight.shape[0]
        target_1d = target.reshape(-1)
        work_dtype = VocabParallelSED.working_dtype(x.dtype)
        vocab_start = rank * vocab_local
        local_target, in_shard = VocabParallelSED.local_target(
            target_1d, vocab_start, vocab_start + vocab_local
        )
        k_local = min(cfg.top_k, vocab_local)
        in_forward = (
            grad_hint is not None
            and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            and grad_in_forward_fits(num_tokens, weight, into_main_grad)
        )

        partials = torch.empty((num_tokens, 4 + cfg.top_k), dtype=work_dtype, device=x.device)
        # one set of chunk buffers for the whole pass: a fresh allocation per chunk would
        # page-fault (CPU) the chunk's logits in again each time
        buffers = _ChunkBuffers(min(chunk, num_tokens), vocab_local, x.dtype, work_dtype, x.device)
        if in_forward:
            # Each chunk combined at once (at TP > 1 one all-gather of its partials) and its
            # dL/dz, for an upstream gradient equal to the hint, consumed by the two
            # backward GEMMs while the logits are at hand: 3 GEMMs in all. The backward
            # only scales the results (exact: the loss is linear in the upstream gradient).
            hint = grad_hint.reshape(-1).to(work_dtype)
            use_log = backward_needs_log(cfg)
            grad_x = torch.empty_like(x2d)
            acc = torch.zeros(weight.shape, dtype=work_dtype, device=weight.device)
            parts = []
            for rows in _chunks(num_tokens, chunk):
                logits, work = buffers.logits(x2d[rows], weight)
                partials[rows] = VocabParallelSED.forward_partials(
                    logits, work, local_target[rows], in_shard[rows], k_local, cfg.top_k, cfg.kernel
                )
                part = gather_and_combine(partials[rows], target_1d[rows], cfg, group, world_size)
                parts.append(part)
                dz = VocabParallelSED.backward_inplace(
                    work,
                    partials[rows, COL_MAX] - part.lse,
                    part.alpha,
                    part.beta,
                    part.gamma,
                    local_target[rows],
                    in_shard[rows],
                    hint[rows],
                    use_log,
                    cfg.kernel,
                )
                _consume_logit_grad(dz, logits, x2d[rows], weight, grad_x[rows], acc)
            out = _cat_combined(parts)
            del parts, part, dz
            grad_x = _reduce_token_grad(grad_x.view(x.shape), sequence_parallel, group, world_size)
        else:
            for rows in _chunks(num_tokens, chunk):
                # the output layer, in its dtype; float32 logits are reduced in place (as
                # the materialised op does), others through the float32 chunk buffer
                logits, work = buffers.logits(x2d[rows], weight)
                partials[rows] = VocabParallelSED.forward_partials(
                    logits, work, local_target[rows], in_shard[rows], k_local, cfg.top_k, cfg.kernel
                )
            out: Combined = gather_and_combine(partials, target_1d, cfg, group, world_size)
            grad_x = acc = hint = None
        del buffers, logits, work

        row_max = partials[:, COL_MAX].contiguous()
        ctx.save_for_backward(
            hidden,
            weight,
            row_max,
            row_max - out.lse,
            out.alpha,
            out.beta,
            out.gamma,
            local_target,
            in_shard,
            hint,
        )
        # the gradient for the hint, scaled in place by the backward that uses it (kept on
        # ctx, not saved: a second backward of the graph then recomputes instead)
        ctx.in_forward_grads = (grad_x, acc) if in_forward else None
        ctx.cfg, ctx.group, ctx.world_size = cfg, group, world_size
        ctx.sequence_parallel, ctx.chunk, ctx.into_main_grad = sequence_parallel, chunk, into_main_grad
        outputs = out.outputs(target.shape)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        (
            hidden,
            weight,
            row_max,
            log_scale,
            alpha,
            beta,
            gamma,
            local_target,
            in_shard,
            hint,
        ) = ctx.saved_tensors
        nones = (None,) * 9
        if ctx.in_forward_grads is not None:
            (grad_x, acc), ctx.in_forward_grads = ctx.in_forward_grads, None
            c = _upstream_scale(grad_loss, hint)
            if c is not None:
                if ctx.into_main_grad:
                    weight.main_grad.add_(acc, alpha=c)
                    return (grad_x.mul_(c), _weight_grad(weight, weight.main_grad, True)) + nones
                return (grad_x.mul_(c), _weight_grad(weight, acc.mul_(c), False)) + nones
            del grad_x, acc
            # (shown once per process: Python's default filter, one call site)
            warnings.warn(
                "fused_linear_sed_loss: the upstream gradient is not proportional to grad_hint; "
                "the backward recomputes the logits instead (exact, one GEMM slower). Pass the "
                "weights the per-token loss is reduced with as grad_hint, or none.",
                stacklevel=2,
            )
        group, world_size, cfg = ctx.group, ctx.world_size, ctx.cfg
        sp = ctx.sequence_parallel and world_size > 1
        x = _gather_tokens(hidden, group, world_size) if sp else hidden
        x2d = x.reshape(-1, x.shape[-1])
        num_tokens = x2d.shape[0]
        work_dtype = VocabParallelSED.working_dtype(x.dtype)
        g = grad_loss.reshape(-1)
        use_log = backward_needs_log(cfg)

        grad_x = torch.empty_like(x2d)
        if ctx.into_main_grad and weight.main_grad.dtype == work_dtype:
            acc = weight.main_grad  # Megatron's fused wgrad: accumulate straight into it
        else:
            acc = torch.zeros(weight.shape, dtype=work_dtype, device=weight.device)
        buffers = _ChunkBuffers(min(ctx.chunk, num_tokens), weight.shape[0], x.dtype, work_dtype, x.device)
        for rows in _chunks(num_tokens, ctx.chunk):
            logits, work = buffers.logits(x2d[rows], weight)
            if work is not logits:
                work.copy_(logits)
            # exp(z - m_r): what the forward left in the materialised op's working buffer
            work.sub_(row_max[rows].unsqueeze(1)).exp_()
            dz = VocabParallelSED.backward_inplace(
                work,
                log_scale[rows],
                alpha[rows],
                beta[rows],
                gamma[rows],
                local_target[rows],
                in_shard[rows],
                g[rows],
                use_log,
                cfg.kernel,
            )
            _consume_logit_grad(dz, logits, x2d[rows], weight, grad_x[rows], acc)
        del buffers, logits, work, dz
        grad_x = _reduce_token_grad(grad_x.view(x.shape), ctx.sequence_parallel, group, world_size)
        return (grad_x, _weight_grad(weight, acc, ctx.into_main_grad)) + nones


def _reduce_token_grad(grad_x: torch.Tensor, sequence_parallel: bool, group, world_size: int) -> torch.Tensor:
    """Each rank's hidden-state gradient holds its vocab shard's part: with sequence
    parallelism reduce-scatter it back to the rank's tokens, without it all-reduce it
    (Megatron's column-parallel dgrad all-reduce)."""
    if world_size == 1:
        return grad_x
    if sequence_parallel:
        return _scatter_token_grad(grad_x, group, world_size)
    dist.all_reduce(grad_x, group=group)
    return grad_x


def fused_linear_sed_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    cfg: Optional[SEDConfig] = None,
    tp_group=None,
    sequence_parallel: bool = False,
    chunk_tokens: Optional[int] = None,
    accumulate_into_main_grad: bool = False,
    grad_hint: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, SEDStats]:
    """SED-SFT loss of the output layer `hidden @ weight.T`, never materialising its logits.

    Args:
        hidden: [s, b, h] hidden states (sequence_parallel: this rank's [s/tp, b, h]).
        weight: [V/tp, h] this rank's vocab shard of the output weight (rank r holds vocab
            rows [r*V/tp, (r+1)*V/tp)), same dtype as hidden; no bias.
        target: [s, b] int64 global token ids of the whole sequence (ignore_index allowed).
        cfg: SEDConfig (defaults to SEDConfig()); cfg.impl is not used (the per-chunk work
            runs the torch implementation's code on any device).
        tp_group: the vocab-shard group (None: Megatron's TP group when initialised).
        sequence_parallel: gather the hidden states over tp_group first (and reduce-scatter
            their gradient), as Megatron's ColumnParallelLinear does under SP.
        chunk_tokens: tokens per chunk (None: default_chunk_tokens).
        accumulate_into_main_grad: add the weight gradient into `weight.main_grad` (float32)
            as Megatron's gradient_accumulation_fusion does.
        grad_hint: [s, b] (or [s/tp, b]-free: the whole sequence, like target) the weights
            the caller reduces the per-token loss with (the loss mask): the upstream
            gradient is then c * grad_hint for one scalar c, and the gradient is computed
            during the forward while each chunk's logits are at hand (3 GEMMs instead of
            4; see grad_in_forward_fits). The backward checks the proportionality (one
            host sync) and recomputes, exactly, where it does not hold. None: recompute.

    Returns:
        (loss [s, b] float32, SEDStats of [s, b] tensors): exactly vocab_parallel_sed_loss
        on the materialised logits; nothing is kept beyond the autograd graph.
    """
    cfg = cfg if cfg is not None else SEDConfig()
    group = resolve_tp_group(tp_group)
    world_size, rank = group_size_and_rank(group)
    sp = bool(sequence_parallel) and world_size > 1
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} and output weight {tuple(weight.shape)} must "
            "be [s, b, h] and [V/tp, h]"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden states ({hidden.dtype}) and output weight ({weight.dtype}) must share a float dtype"
        )
    check_target(target, cfg, weight.shape[0] * world_size, hidden.device)
    seq = hidden.shape[0] * (world_size if sp else 1)
    if tuple(target.shape) != (seq, hidden.shape[1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must be [s, b] = {(seq, hidden.shape[1])} "
            + ("(the whole sequence: s/tp per rank x tp)" if sp else "")
        )
    if accumulate_into_main_grad and getattr(weight, "main_grad", None) is None:
        raise ValueError("accumulate_into_main_grad needs weight.main_grad (Megatron's DDP sets it)")
    num_tokens = seq * hidden.shape[1]
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(num_tokens, weight.shape[0])
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens!r}")
    if grad_hint is not None and tuple(grad_hint.shape) != tuple(target.shape):
        raise ValueError(
            f"grad_hint shape {tuple(grad_hint.shape)} must be the target's {tuple(target.shape)}"
        )
    outputs = FusedLinearSED.apply(
        hidden,
        weight,
        target,
        grad_hint,
        cfg,
        group,
        world_size,
        rank,
        sp,
        max(1, min(chunk_tokens, num_tokens)),
        bool(accumulate_into_main_grad),
    )
    return outputs[0], SEDStats(**dict(zip(STAT_NAMES, outputs[1:])))
