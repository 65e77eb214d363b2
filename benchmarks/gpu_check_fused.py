"""The GPU check's `fused` rows: the output layer fused with the SED loss
(megatron_sed.ops.fused_linear_sed) on the device.

- exactness: bf16 and fp32, fused vs materialised (output layer GEMM + SED op) vs the
  float64 reference: loss, statistics, dX, dW (the tolerances of
  tests/ops/test_fused_linear_sed.py);
- exactness both ways of the fused gradient: in the forward (handed the loss mask, the
  upstream gradient c x mask: what the trainer runs) and recomputed in the backward (a
  general upstream gradient);
- timing: output layer + loss forward and backward (CUDA events, median; the per-token
  loss reduced with a loss mask, as Megatron's loss_func does), peak memory above the
  inputs: fused (handed the mask; default chunk and a 4x larger one; and without the
  mask, recomputing the logits in the backward) against materialised SED,
  materialised Megatron CE (its output layer + vocab_parallel_cross_entropy) and Liger's
  fused linear CE where it imports. Target: fused <= 1.1 x materialised SED's time.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

from gpu_check_registry import FAIL, Check, Context, Outcome, info, skip, verdict

# the tolerances of tests/ops/test_fused_linear_sed.py: loss (absolute), dX and dW
# (relative to their max)
EXACT_TOL = {"bf16": (2e-5, 2e-2), "fp32": (2e-5, 1e-5)}
UPSTREAM = ("loss_mask", "any")  # the gradient in the forward / recomputed in the backward


def shapes(dry: bool):
    """(tokens, vocab, hidden) for timing; exactness runs at `exact_shape`."""
    if dry:
        return [(64, 512, 32)]
    return [(8192, 128256, 4096), (16384, 152064, 4096)]


def exact_shape(dry: bool):
    return (48, 512, 32) if dry else (1024, 32768, 1024)


def timing_methods() -> list[str]:
    return [
        "materialised_sed",
        "fused_sed",
        "fused_sed_chunk_x4",
        "fused_sed_recompute",
        "megatron_ce",
        "liger_flce",
    ]


def checks(dry_run: bool) -> list[Check]:
    out = [
        Check("fused", f"exact {dname} upstream {up}", partial(exact_row, dname=dname, upstream=up))
        for dname in EXACT_TOL
        for up in UPSTREAM
    ]
    out += [
        Check("fused", f"{t} x {v} x {h} {m}", partial(timing_row, shape=(t, v, h), method=m))
        for t, v, h in shapes(dry_run)
        for m in timing_methods()
    ]
    return out


def check_exact(device, dtype, dry, upstream="any"):
    """max relative errors {loss, stats, dx, dw} of the fused path vs float64, and
    the fused vs materialised loss difference. upstream "loss_mask": the upstream gradient
    is c x a loss mask handed to the op (the gradient in the forward); "any": a general
    one (recomputed in the backward)."""
    import torch

    from megatron_sed import SEDConfig, vocab_parallel_sed_loss
    from megatron_sed.ops.fused_linear_sed import fused_linear_sed_loss

    n, v, h = exact_shape(dry)
    g = torch.Generator(device="cpu").manual_seed(5)
    x64 = torch.randn(n, 1, h, generator=g, dtype=torch.float64)
    w64 = torch.randn(v, h, generator=g, dtype=torch.float64) * (3.0 / h**0.5)
    target = torch.randint(0, v, (n, 1), generator=g)
    target[::7] = -100
    grad = torch.rand(n, 1, generator=g)
    hint = None
    if upstream == "loss_mask":
        hint = (torch.rand(n, 1, generator=g) < 0.7).float()
        grad = 0.37 * hint
    cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.9)
    x, w = x64.to(device, dtype), w64.to(device, dtype)
    t, gr = target.to(device), grad.to(device)
    hint = None if hint is None else hint.to(device)

    def run(fused):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            loss, stats = fused_linear_sed_loss(hidden=xi, weight=wi, target=t, cfg=cfg, grad_hint=hint)
        else:
            loss, stats = vocab_parallel_sed_loss(xi @ wi.t(), t, cfg)
        (loss * gr).sum().backward()
        return loss.double().cpu(), stats, xi.grad.double().cpu(), wi.grad.double().cpu()

    fused, mat = run(True), run(False)
    # float64 on the dtype's own logits (the op in float64: its gradcheck dtype; the
    # independent reference is the tests' float64 formula, tests/helpers/sed_reference.py)
    logits64 = (x @ w.t()).double().cpu().requires_grad_()
    loss64, _ = vocab_parallel_sed_loss(logits64, target, cfg)
    (loss64 * grad.double()).sum().backward()
    dz = logits64.grad.view(n, v)
    ref_dx = dz @ w.double().cpu()
    ref_dw = dz.t() @ x.double().cpu().view(n, h)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    return dict(
        loss=float((fused[0] - loss64.detach()).abs().max()),
        dx=rel(fused[2].view(n, h), ref_dx),
        dw=rel(fused[3], ref_dw),
        vs_materialised=float((fused[0] - mat[0]).abs().max()),
    )


def _median_ms(fn, iters, warmup, device):
    import torch

    times, peak = [], 0
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def build(device, tp_group):
    """name -> fn(x, w, target, loss_mask) returning the per-token loss (or a reason string)."""
    from megatron_sed import SEDConfig, vocab_parallel_sed_loss
    from megatron_sed.ops.fused_linear_sed import default_chunk_tokens, fused_linear_sed_loss

    cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.95)
    methods = {
        "materialised_sed": lambda x, w, t, m: vocab_parallel_sed_loss(x @ w.t(), t, cfg)[0],
        "fused_sed": lambda x, w, t, m: fused_linear_sed_loss(
            hidden=x, weight=w, target=t, cfg=cfg, grad_hint=m
        )[0],
        "fused_sed_chunk_x4": lambda x, w, t, m: fused_linear_sed_loss(
            hidden=x,
            weight=w,
            target=t,
            cfg=cfg,
            chunk_tokens=4 * default_chunk_tokens(t.numel(), w.shape[0]),
            grad_hint=m,
        )[0],
        "fused_sed_recompute": lambda x, w, t, m: fused_linear_sed_loss(
            hidden=x, weight=w, target=t, cfg=cfg
        )[0],
    }
    try:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        methods["megatron_ce"] = lambda x, w, t, m: vocab_parallel_cross_entropy((x @ w.t()).float(), t)
    except ImportError as exc:
        methods["megatron_ce"] = f"skipped: {exc.__class__.__name__}"
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        methods["liger_flce"] = (
            (lambda x, w, t, m: liger(w, x.view(-1, x.shape[-1]), t.view(-1)))
            if device.type == "cuda"
            else "skipped: CUDA only"
        )
    except ImportError as exc:
        methods["liger_flce"] = f"skipped: Liger-Kernel not importable ({exc.__class__.__name__})"
    return methods


def time_shape(device, tokens, vocab, hidden, iters, warmup):
    """{method: (ms, peak bytes) or reason} for one shape, bf16 (fp32 on CPU dry runs)."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(tokens, 1, hidden, generator=g, device=device) * 0.5).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=device) * (4.0 / hidden**0.5)).to(dtype)
    target = torch.randint(0, vocab, (tokens, 1), generator=g, device=device)
    mask = (torch.rand(tokens, 1, generator=g, device=device) < 0.7).float()
    out = {}
    for name, fn in build(device, None).items():
        if isinstance(fn, str):
            out[name] = fn
            continue
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()

        def step(fn=fn, xi=xi, wi=wi):
            xi.grad = wi.grad = None
            # Megatron's loss_func: the masked per-token mean
            (fn(xi, wi, target, mask).float().view(-1) * mask.view(-1)).sum().div(mask.sum()).backward()

        try:
            out[name] = _median_ms(step, iters, warmup, device)
        except Exception as exc:  # noqa: BLE001 - a failing method is a row
            out[name] = f"error: {type(exc).__name__}: {str(exc)[:100]}"
        del xi, wi
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# -- rows -------------------------------------------------------------------------------


def exact_row(ctx: Context, dname: str, upstream: str) -> Outcome:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dname]
    r = check_exact(ctx.device, dtype, ctx.dry_run, upstream)
    loss_tol, grad_tol = EXACT_TOL[dname]
    ok = r["loss"] <= loss_tol and r["dx"] <= grad_tol and r["dw"] <= grad_tol
    return verdict(
        ok,
        f"dW {r['dw']:.1e}",
        f"vs float64: loss {r['loss']:.1e} dX {r['dx']:.1e} dW {r['dw']:.1e}; "
        f"loss vs materialised {r['vs_materialised']:.1e}",
    )


def timing_row(ctx: Context, shape: tuple[int, int, int], method: str) -> Outcome:
    def time_all():
        import gpu_loss_bench as B

        B.init_megatron_tp1(ctx.device)  # Megatron's CE reads its TP group from parallel_state
        return time_shape(ctx.device, *shape, ctx.iters, ctx.warmup)

    results = ctx.once(("fused timing", shape), time_all)  # every method of the shape, once
    r = results.get(method, "skipped: not built")
    if isinstance(r, str):
        return Outcome(FAIL, "", r) if r.startswith("error") else skip(r)
    tokens, vocab, _ = shape
    base = results.get("materialised_sed")
    ratio = r[0] / base[0] if isinstance(base, tuple) else float("nan")
    ms, peak = r
    detail = (
        f"{ratio:.2f} x materialised SED; peak {peak / float(1 << 30):.2f} GiB = "
        f"{peak / (2 * tokens * vocab * 2):.3f} x bf16 (logits+grad)"
    )
    if method == "fused_sed" and ctx.device.type == "cuda":
        return verdict(ratio <= 1.1, f"{ms:.1f} ms", detail)  # the GPU target
    return info(f"{ms:.1f} ms", detail)
