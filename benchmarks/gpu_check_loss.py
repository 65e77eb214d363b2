"""gpu_check part 1: the SED loss kernels against a float64 reference (and each other).

Per case (dtype x local vocab x top_k): Triton and torch implementations vs the float64
full-vocab reference (tests/helpers/sed_reference.py, independent of megatron_sed.ops):
loss, every statistic, the gradient (out of place and in place). bf16 gradients are
compared with the correctly rounded value of the exact gradient (float64 -> fp32 ->
bf16, round to nearest even) and the elements off by one or more bf16 ulps are counted,
with how many of them are rounded toward zero. A TP=2 emulation (two shards, the second
with vocab_start > 0, so targets fall outside a shard) runs the Triton kernels on each
shard and the shared combination on the stacked partials. One case has
tokens x vocab > 2^31 (int32 offsets would wrap), checked on its last rows.
"""

from __future__ import annotations

import torch

from megatron_sed import KernelOptions, SEDConfig, vocab_parallel_sed_loss
from megatron_sed.ops.partials import backward_needs_log, combine_partials
from megatron_sed.ops.stats import STAT_NAMES
from tests.helpers.sed_reference import reference_sed

FLOAT_STATS = [n for n in STAT_NAMES if n not in ("mask", "correct")]
# Loss / statistics are computed in float32 from the input's rounded values: float32
# accuracy against float64 (see tests/helpers/sed_reference.py TOL).
LOSS_TOL = 5e-5  # relative to max(1, |ref|)
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max |g - ref| / max |ref|


def make_case(rows: int, vocab: int, dtype, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 1, vocab, generator=g, dtype=torch.float64) * 3.0
    target = torch.randint(0, vocab, (rows, 1), generator=g)
    target = torch.where(torch.rand(rows, 1, generator=g) < 0.4, logits.argmax(-1), target)
    target[:: max(1, rows // 6)] = -100  # ignored rows
    return logits.to(dtype).to(device), target.to(device)


def reference(logits, target, cfg: SEDConfig):
    z = logits.detach().double().requires_grad_(True)
    loss, stats = reference_sed(z, target, cfg.coef, cfg.top_k, cfg.threshold, cfg.mask, cfg.regularizer)
    loss.sum().backward()
    # "correct" counts a tie for the maximum (docs/loss.md); bf16 logits tie often
    z64 = logits.detach().double()
    safe = torch.where(target >= 0, target, torch.zeros_like(target))
    at_max = z64.gather(-1, safe.unsqueeze(-1)).squeeze(-1) >= z64.max(dim=-1).values
    stats = dict(stats, correct=at_max & (target >= 0))
    return loss.detach(), stats, z.grad


def run_impl(logits, target, cfg: SEDConfig):
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = vocab_parallel_sed_loss(x, target, cfg)
    loss.sum().backward()
    return loss.detach(), stats, x.grad


def rel(a, b) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1.0)).max())


def grad_err(g, ref) -> float:
    return float((g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bf16_ulps(g: torch.Tensor, exact: torch.Tensor) -> dict:
    """How a bf16 gradient differs from the correctly rounded exact one."""
    correct = exact.float().to(torch.bfloat16)  # fp64 -> fp32 -> bf16, both round to nearest even
    gi = g.view(torch.int16).to(torch.int32)
    ci = correct.view(torch.int16).to(torch.int32)
    # ulp distance on the sign-magnitude bf16 encoding (same sign: |difference of the bits|)
    same_sign = (gi < 0) == (ci < 0)
    dist = torch.where(same_sign, (gi - ci).abs(), (gi & 0x7FFF) + (ci & 0x7FFF))
    off = dist > 0
    n_off = int(off.sum())
    toward_zero = int((off & (g.float().abs() < correct.float().abs())).sum())
    return {
        "elements": g.numel(),
        "off": n_off,
        "off_frac": n_off / max(1, g.numel()),
        "toward_zero_frac": toward_zero / max(1, n_off),
        "max_ulp": int(dist.max()) if g.numel() else 0,
    }


def check_case(logits, target, cfg: SEDConfig) -> dict:
    """Triton (out of place, in place) and torch vs the float64 reference."""
    ref_loss, ref_stats, ref_grad = reference(logits, target, cfg)
    out = {}
    for name, c in (
        ("triton", cfg.replace(impl="triton")),
        ("triton_inplace", cfg.replace(impl="triton", kernel=KernelOptions(grad_in_place=True))),
        ("torch", cfg.replace(impl="torch")),
    ):
        loss, stats, grad = run_impl(logits, target, c)
        stat_err = max(rel(stats[n], ref_stats[n]) for n in FLOAT_STATS)
        bool_mismatch = sum(int((stats[n] != ref_stats[n]).sum()) for n in ("mask", "correct"))
        r = {
            "loss_err": rel(loss, ref_loss),
            "stat_err": stat_err,
            "bool_mismatch": bool_mismatch,
            "grad_err": grad_err(grad, ref_grad),
        }
        if logits.dtype == torch.bfloat16:
            r["ulps"] = bf16_ulps(grad, ref_grad)
        out[name] = r
    return out


def case_ok(res: dict, dtype, rows: int) -> bool:
    # mask / argmax flips: allowed only for float32 rounding right at the threshold / a tie
    return all(
        r["loss_err"] <= LOSS_TOL
        and r["stat_err"] <= LOSS_TOL
        and r["bool_mismatch"] <= max(1, rows // 100)
        and r["grad_err"] <= GRAD_TOL[dtype]
        and r.get("ulps", {}).get("max_ulp", 0) <= 1
        for r in res.values()
    )


def tp2_emulated(logits, target, cfg: SEDConfig):
    """Two vocab shards through the Triton kernels (shard 1 has vocab_start > 0; most
    targets lie outside one of them), combined like the all-gathered partials."""
    from megatron_sed.ops import triton_sed

    n, v = logits.shape[0], logits.shape[-1]
    x2 = logits.reshape(n, v)
    t1 = target.reshape(-1)
    half = v // 2
    shards = [x2[:, :half].contiguous(), x2[:, half:].contiguous()]
    starts = [0, half]
    parts = [triton_sed.sed_partials(s, t1, st, cfg.top_k, cfg.kernel) for s, st in zip(shards, starts)]
    valid = t1 != cfg.ignore_index
    out = combine_partials(torch.stack(parts), valid, cfg, cfg.top_k)
    lse = torch.where(valid, out.lse, torch.zeros_like(out.lse))
    grads = []
    for s, st in zip(shards, starts):
        g = torch.empty_like(s)
        triton_sed.sed_grad(
            s, t1, st, lse, out.alpha, out.beta, out.gamma, backward_needs_log(cfg), g, cfg.kernel
        )
        grads.append(g)
    return out.loss, torch.cat(grads, dim=1)


def check_tp2(logits, target, cfg: SEDConfig) -> dict:
    ref_loss, _, ref_grad = reference(logits, target, cfg)
    loss, grad = tp2_emulated(logits, target, cfg)
    return {
        "loss_err": rel(loss, ref_loss.reshape(-1)),
        "grad_err": grad_err(grad, ref_grad.reshape(grad.shape)),
    }


def check_big(rows: int, vocab: int, tail: int, device) -> dict:
    """bf16 Triton forward + backward over rows x vocab (> 2^31 elements on a GPU); the
    last `tail` rows (the ones past int32 offsets) against the float64 reference."""
    cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.95, impl="triton")
    g = torch.Generator(device=device).manual_seed(5)
    x = (torch.randn(rows, 1, vocab, generator=g, device=device, dtype=torch.float32) * 3.0).to(
        torch.bfloat16
    )
    t = torch.randint(0, vocab, (rows, 1), generator=g, device=device)
    x.requires_grad_(True)
    loss, _ = vocab_parallel_sed_loss(x, t, cfg)
    loss.sum().backward()
    ref_loss, _, ref_grad = reference(x[-tail:].detach(), t[-tail:], cfg.replace(impl="torch"))
    res = {
        "elements": rows * vocab,
        "loss_err": rel(loss[-tail:].detach(), ref_loss),
        "grad_err": grad_err(x.grad[-tail:], ref_grad),
    }
    del x, loss
    return res
