"""The GPU check's SED loss op: the `kernels` rows (exactness) and the `timing` rows.

kernels - per case (dtype x local vocab x top_k): Triton and torch implementations vs the
float64 full-vocab reference (tests/helpers/sed_reference.py, independent of
megatron_sed.ops): loss, every statistic, the gradient (out of place and in place). bf16
gradients are compared with the correctly rounded value of the exact gradient (float64 ->
fp32 -> bf16, round to nearest even) and the elements off by one or more bf16 ulps are
counted, with how many of them are rounded toward zero. A TP=2 emulation (two shards, the
second with vocab_start > 0, so targets fall outside a shard) runs the Triton kernels on
each shard and the shared combination on the stacked partials. One case has
tokens x vocab > 2^31 (int32 offsets would wrap), checked on its last rows.

timing - CUDA events, median (benchmarks/gpu_loss_bench.py measures): Megatron's unfused
and native fused CE, TE's parallel_cross_entropy and Liger's CE where they import, torch
and Triton SED (out of place, in place, a block/warp sweep); GB/s against the 3-pass
floor at the measured copy bandwidth; peak memory / (logits + gradient).
"""

from __future__ import annotations

import argparse
from functools import partial
from types import SimpleNamespace

import torch
from gpu_check_registry import Check, Context, info, skip, verdict

from megatron_sed import KernelOptions, SEDConfig, vocab_parallel_sed_loss
from megatron_sed.ops.partials import backward_needs_log, combine_partials
from megatron_sed.ops.stats import STAT_NAMES
from tests.helpers.sed_reference import reference_sed

FLOAT_STATS = [n for n in STAT_NAMES if n not in ("mask", "correct")]
# Loss / statistics are computed in float32 from the input's rounded values: float32
# accuracy against float64 (see tests/helpers/sed_reference.py TOL).
LOSS_TOL = 5e-5  # relative to max(1, |ref|)
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max |g - ref| / max |ref|

TOP_KS = (1, 2, 8)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SWEEP = [(4096, 8), (4096, 16), (2048, 8), (None, None)]  # Triton (block, warps); None: the default


def sizes(dry: bool) -> dict:
    if dry:
        return dict(vocabs=[203, 512, 76], rows=12, big=(24, 512, 4), tokens=[8], vocab=512)
    # 16448 x 131072 = 2^31 + 2^23 elements
    return dict(
        vocabs=[50257, 131072, 19008], rows=64, big=(16448, 131072, 64), tokens=[8192, 16384], vocab=131072
    )


def sweep_name(block, warps) -> str:
    return "default" if block is None else f"b{block},w{warps}"


def timing_methods() -> list[str]:
    base = ["megatron_ce_unfused", "megatron_ce_fused", "te_parallel_ce", "liger_ce", "sed_torch"]
    base += ["sed_triton", "sed_triton_inplace"]
    return base + [f"sed_triton[{sweep_name(b, w)}]" for b, w in SWEEP]


def checks(dry_run: bool) -> list[Check]:
    sz = sizes(dry_run)
    out = []
    for dname, dtype in DTYPES.items():
        out += [
            Check("kernels", f"{dname} V={vocab} k={k}", partial(case_row, dtype=dtype, vocab=vocab, k=k))
            for vocab in sz["vocabs"]
            for k in TOP_KS
        ]
        if dname == "bf16":
            out.append(Check("kernels", "bf16 gradient ulps", bf16_ulps_row))
    out += [
        Check("kernels", f"{dname} TP=2 vocab_start>0", partial(tp2_row, dtype=DTYPES[dname]))
        for dname in ("fp32", "bf16")
    ]
    out.append(Check("kernels", "tokens x vocab > 2^31", big_row))
    out.append(Check("timing", "copy bandwidth", copy_bandwidth_row))
    out += [
        Check(
            "timing", f"{tokens} x {sz['vocab']} {method}", partial(timing_row, tokens=tokens, method=method)
        )
        for tokens in sz["tokens"]
        for method in timing_methods()
    ]
    return out


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


# -- kernels rows -----------------------------------------------------------------------


def case_result(ctx: Context, dtype, vocab: int, k: int) -> dict:
    """check_case of one (dtype, vocab, top_k), computed once per run (the ulps row reads
    the bf16 ones)."""

    def make():
        sz = sizes(ctx.dry_run)
        seed = sz["vocabs"].index(vocab) * 10 + k
        logits, target = make_case(sz["rows"], vocab, dtype, seed=seed, device=ctx.device)
        return check_case(logits, target, SEDConfig(coef=1.0, top_k=k, threshold=0.9))

    return ctx.once(("case", dtype, vocab, k), make)


def case_row(ctx: Context, dtype, vocab: int, k: int):
    res = case_result(ctx, dtype, vocab, k)
    worst = max(r["grad_err"] for r in res.values())
    detail = "; ".join(
        f"{impl}: loss {r['loss_err']:.1e} stats {r['stat_err']:.1e} grad {r['grad_err']:.1e}"
        + (f" flips {r['bool_mismatch']}" if r["bool_mismatch"] else "")
        for impl, r in res.items()
    )
    return verdict(case_ok(res, dtype, sizes(ctx.dry_run)["rows"]), f"grad {worst:.1e}", detail)


def bf16_ulps_row(ctx: Context):
    """The bf16 cases' gradients against the correctly rounded exact value, summed up."""
    ulps: dict[str, list[dict]] = {}
    for vocab in sizes(ctx.dry_run)["vocabs"]:
        for k in TOP_KS:
            for impl, r in case_result(ctx, torch.bfloat16, vocab, k).items():
                ulps.setdefault(impl, []).append(r["ulps"])
    parts = []
    for impl, us in ulps.items():
        n = sum(u["elements"] for u in us)
        off = sum(u["off"] for u in us)
        tz = sum(u["toward_zero_frac"] * u["off"] for u in us)
        mx = max(u["max_ulp"] for u in us)
        parts.append(
            f"{impl}: {100 * off / n:.2f}% off by >=1 ulp ({100 * tz / max(off, 1):.0f}% toward zero), max {mx} ulp"
        )
    worst_max = max(u["max_ulp"] for us in ulps.values() for u in us)
    triton_off = sum(u["off"] for u in ulps["triton"]) / max(1, sum(u["elements"] for u in ulps["triton"]))
    return verdict(worst_max <= 1, f"triton {100 * triton_off:.2f}% off", "; ".join(parts))


def tp2_row(ctx: Context, dtype):
    sz = sizes(ctx.dry_run)
    logits, target = make_case(sz["rows"], sz["vocabs"][1], dtype, seed=99, device=ctx.device)
    r = check_tp2(logits, target, SEDConfig(coef=1.0, top_k=2, threshold=0.9))
    ok = r["loss_err"] <= LOSS_TOL and r["grad_err"] <= GRAD_TOL[dtype]
    return verdict(ok, f"grad {r['grad_err']:.1e}", f"loss {r['loss_err']:.1e}")


def big_row(ctx: Context):
    n, v, tail = sizes(ctx.dry_run)["big"]
    r = check_big(n, v, tail, ctx.device)
    ok = r["loss_err"] <= LOSS_TOL and r["grad_err"] <= GRAD_TOL[torch.bfloat16]
    note = "" if r["elements"] > 2**31 else " (dry run: below 2^31, same code)"
    return verdict(
        ok,
        f"{r['elements']:,} elements",
        f"last {tail} rows vs float64: loss {r['loss_err']:.1e} grad {r['grad_err']:.1e}{note}",
    )


# -- timing rows ------------------------------------------------------------------------


def timing_bench(ctx: Context) -> SimpleNamespace:
    """gpu_loss_bench's methods (+ the Triton sweep), its timer and options; built once."""

    def make():
        import gpu_loss_bench as B

        bench_args = argparse.Namespace(top_k=2, sweep=False, iters=ctx.iters, warmup=ctx.warmup)
        methods = B.build_methods(bench_args, ctx.device, B.init_megatron_tp1(ctx.device))
        sed = SEDConfig(coef=1.0, top_k=2, threshold=0.95, impl="triton")
        for block, warps in SWEEP:
            cfg = sed.replace(kernel=KernelOptions(block_size=block, num_warps=warps))
            methods[f"sed_triton[{sweep_name(block, warps)}]"] = (
                lambda c: lambda x, t: vocab_parallel_sed_loss(x, t, c)[0]
            )(cfg)
        return SimpleNamespace(B=B, args=bench_args, methods=methods, timer=B.Timer(ctx.device))

    return ctx.once("timing bench", make)


def timing_inputs(ctx: Context, tokens: int) -> SimpleNamespace:
    """bf16 logits [tokens, 1, V] and targets, and the copy bandwidth measured on them;
    one token count held at a time."""

    def make():
        bench = timing_bench(ctx)
        vocab = sizes(ctx.dry_run)["vocab"]
        g = torch.Generator(device=ctx.device).manual_seed(1234)
        master = (torch.randn(tokens, 1, vocab, generator=g, device=ctx.device) * 2.0).to(torch.bfloat16)
        target = torch.randint(0, vocab, (tokens, 1), generator=g, device=ctx.device)
        return SimpleNamespace(master=master, target=target, bw=bench.B.copy_bandwidth(master, bench.timer))

    return ctx.latest("timing inputs", tokens, make)


def copy_bandwidth_row(ctx: Context):
    bw = timing_inputs(ctx, sizes(ctx.dry_run)["tokens"][0]).bw
    return info(f"{bw / 1e9:.0f} GB/s", "device-to-device copy, read + write")


def timing_row(ctx: Context, tokens: int, method: str):
    bench = timing_bench(ctx)
    fn = bench.methods.get(method, "skipped: not built")
    if isinstance(fn, str):
        return skip(fn)
    inputs = timing_inputs(ctx, tokens)
    r = bench.B.measure(fn, inputs.master, inputs.target, bench.args, bench.timer, ctx.device)
    ctx.shared[("timing ms", tokens, method)] = r.total_ms
    numel = inputs.master.numel()
    must_move = 3 * numel * 2
    floor_ms = must_move / inputs.bw * 1e3
    peak = (
        f", peak {r.peak_bytes / float(1 << 30):.2f} GiB = {r.peak_bytes / (2 * numel * 2):.2f} x (logits+grad)"
        if r.peak_bytes
        else ""
    )
    fused_ms = ctx.shared.get(("timing ms", tokens, "megatron_ce_fused"))  # measured before, if at all
    vs = f", {r.total_ms / fused_ms:.2f} x Megatron fused CE" if fused_ms else ""
    return info(
        f"{r.total_ms:.2f} ms",
        f"fwd {r.fwd_ms:.2f} + bwd {r.bwd_ms:.2f} ms, {must_move / (r.total_ms / 1e3) / 1e9:.0f} GB/s, "
        f"{r.total_ms / floor_ms:.2f} x floor{peak}{vs}",
    )
