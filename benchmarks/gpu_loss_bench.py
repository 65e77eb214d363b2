#!/usr/bin/env python
"""Time and peak memory of vocab-parallel losses on one GPU (forward + backward).

    python benchmarks/gpu_loss_bench.py                      # 8192 and 16384 tokens x 131072, bf16
    python benchmarks/gpu_loss_bench.py --out docs/gpu_loss_table.md --sweep
    python benchmarks/gpu_loss_bench.py --dry-run            # tiny, on CPU (Triton interpreter)

Methods (TP = 1, one process): Megatron-Core's unfused vocab_parallel_cross_entropy,
its native fused CE (megatron.core.fusions.fused_cross_entropy, torch.compile'd),
Transformer Engine's parallel_cross_entropy when transformer_engine imports,
our SED loss on the torch path and on the Triton kernels (gradient out of place and in
place), and Liger-Kernel's CE when `liger_kernel` imports. The SED settings are the
paper's: coef 1, top_k 2, top-k-mass mask, quadratic regulariser.

Per method: forward, backward and total milliseconds (median over --iters, CUDA events),
the bytes the op must move (read the logits forward, read them again backward, write the
gradient: 3 x tokens x vocab x element size), the achieved bandwidth against those
bytes, the ratio to the floor (those bytes at the device-to-device copy bandwidth
measured here), the peak memory (logits + everything the op allocates) against the
bf16 logits plus their gradient, and the largest per-token loss difference against the
reference of its family (Megatron's unfused CE for CEs, the torch SED for SED).
The logits are restored from a master copy before every iteration, outside the timing
(in-place methods overwrite them); the master copy is excluded from the peak.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=None, help="subset of method names to run")
    p.add_argument("--sweep", action="store_true", help="also time Triton SED block/warp variants")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes on CPU (Triton interpreter) to check the script end to end",
    )
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.tokens, args.vocab, args.iters, args.warmup = [8], 512, 1, 0
    return args


@dataclass
class Result:
    method: str
    tokens: int
    fwd_ms: float = float("nan")
    bwd_ms: float = float("nan")
    peak_bytes: Optional[int] = None
    max_diff: Optional[float] = None
    note: str = ""
    loss: object = field(default=None, repr=False)

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


class Timer:
    """CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()


def init_megatron_tp1(device):
    """A one-process group and Megatron's parallel state at TP = 1 (its CEs need them)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    return parallel_state.get_tensor_model_parallel_group()


def build_methods(args, device, tp_group) -> dict[str, Callable]:
    """name -> fn(logits [s, b, V], target [s, b]) returning a per-token loss (or a reason str)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sed import SEDConfig, vocab_parallel_sed_loss

    methods: dict[str, Callable] = {}
    methods["megatron_ce_unfused"] = lambda x, t: vocab_parallel_cross_entropy(x, t)
    if device.type == "cuda":
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        methods["megatron_ce_fused"] = lambda x, t: fused_vocab_parallel_cross_entropy(x, t, tp_group)
    else:
        methods["megatron_ce_fused"] = "skipped: torch.compile'd, timed on CUDA only"
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

        def te_ce(x, t):
            # TE's Triton CE takes [b, s, V] (any leading dims) and returns per-token losses
            return parallel_cross_entropy(x, t, 0.0, False, tp_group)

        methods["te_parallel_ce"] = te_ce if device.type == "cuda" else "skipped: CUDA only"
    except ImportError as exc:
        methods["te_parallel_ce"] = f"skipped: Transformer Engine not importable ({exc.__class__.__name__})"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        def liger(x, t):
            return liger_cross_entropy(x.view(-1, x.shape[-1]), t.view(-1), reduction="none").view(t.shape)

        methods["liger_ce"] = liger if device.type == "cuda" else "skipped: CUDA only"
    except ImportError as exc:
        methods["liger_ce"] = f"skipped: liger_kernel not importable ({exc.__class__.__name__})"

    sed = SEDConfig(coef=1.0, top_k=args.top_k, threshold=0.95, mask="topk_mass", regularizer="quadratic")
    methods["sed_torch"] = lambda x, t: vocab_parallel_sed_loss(x, t, sed.replace(impl="torch"))[0]
    try:
        from megatron_sed.ops import triton_sed  # noqa: F401 (import check)
    except ImportError as exc:
        reason = f"skipped: Triton SED not importable ({exc})"
        methods["sed_triton"] = methods["sed_triton_inplace"] = reason
        return methods

    from megatron_sed import KernelOptions

    def triton_fn(in_place, block=None, warps=None):
        cfg = sed.replace(
            impl="triton", kernel=KernelOptions(block_size=block, num_warps=warps, grad_in_place=in_place)
        )

        def fn(x, t):
            return vocab_parallel_sed_loss(x, t, cfg)[0]

        return fn

    methods["sed_triton"] = triton_fn(False)
    methods["sed_triton_inplace"] = triton_fn(True)
    if args.sweep:
        for block in (2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                if block // (32 * warps) >= 4:  # at least 4 columns per thread
                    methods[f"sed_triton_inplace[b{block},w{warps}]"] = triton_fn(True, block, warps)
    return methods


def measure(fn, master, target, args, timer, device) -> Result:
    import torch

    leaf = torch.empty_like(master).requires_grad_(True)
    fwd, bwd, peak, first_loss = [], [], 0, None
    for i in range(args.warmup + args.iters):
        with torch.no_grad():
            leaf.copy_(master)
        leaf.grad = None
        timer.sync()
        if device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = timer.mark()
        loss = fn(leaf, target)
        t1 = timer.mark()
        loss.sum().backward()
        t2 = timer.mark()
        timer.sync()
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if i == 0:
            first_loss = loss.detach().float().clone()
        if i >= args.warmup:
            fwd.append(timer.elapsed_ms(t0, t1))
            bwd.append(timer.elapsed_ms(t1, t2))
        del loss
        leaf.grad = None
    logits_bytes = master.numel() * master.element_size()
    return Result(
        method="",
        tokens=target.numel(),
        fwd_ms=statistics.median(fwd),
        bwd_ms=statistics.median(bwd),
        peak_bytes=(logits_bytes + peak) if device.type == "cuda" else None,
        loss=first_loss,
    )


def copy_bandwidth(master, timer, iters=10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the floor's speed."""
    import torch

    x = torch.empty_like(master)
    x.copy_(master)
    times = []
    for _ in range(iters):
        t0 = timer.mark()
        x.copy_(master)
        t1 = timer.mark()
        timer.sync()
        times.append(timer.elapsed_ms(t0, t1))
    return 2 * master.numel() * master.element_size() / (statistics.median(times) / 1e3)


def fmt(v, spec):
    return "-" if v is None or v != v else format(v, spec)


def format_table(results: list[Result], vocab: int, elem_size: int, copy_bw: dict[int, float]) -> str:
    """Markdown table; ratios against Megatron's native fused CE of the same token count."""
    lines = [
        "| tokens | method | fwd ms | bwd ms | total ms | vs Megatron fused CE | GB/s (3 passes) "
        "| x floor | peak GiB | peak / (logits+grad) | max abs loss diff | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    gib = float(1 << 30)
    for r in results:
        must_move = 3 * r.tokens * vocab * elem_size
        logits_and_grad = 2 * r.tokens * vocab * elem_size
        ref = next((q for q in results if q.tokens == r.tokens and q.method == "megatron_ce_fused"), None)
        ran = r.total_ms == r.total_ms
        vs_fused = (
            r.total_ms / ref.total_ms if ran and ref is not None and ref.total_ms == ref.total_ms else None
        )
        gbps = must_move / (r.total_ms / 1e3) / 1e9 if ran else None
        floor_ms = must_move / copy_bw[r.tokens] * 1e3 if r.tokens in copy_bw else None
        x_floor = r.total_ms / floor_ms if ran and floor_ms else None
        peak = r.peak_bytes / gib if r.peak_bytes is not None else None
        peak_ratio = r.peak_bytes / logits_and_grad if r.peak_bytes is not None else None
        lines.append(
            f"| {r.tokens} | {r.method} | {fmt(r.fwd_ms, '.2f')} | {fmt(r.bwd_ms, '.2f')} | "
            f"{fmt(r.total_ms, '.2f')} | {fmt(vs_fused, '.2f')} | {fmt(gbps, '.0f')} | "
            f"{fmt(x_floor, '.2f')} | {fmt(peak, '.2f')} | {fmt(peak_ratio, '.2f')} | "
            f"{fmt(r.max_diff, '.1e')} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # The Triton interpreter must be chosen before triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_loss_bench: no CUDA device found; this benchmark times GPU kernels. "
            "Run it on a GPU node, or use --dry-run to check the script on CPU.",
            file=sys.stderr,
        )
        return 1
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    tp_group = init_megatron_tp1(device)
    methods = build_methods(args, device, tp_group)
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            print(
                f"gpu_loss_bench: unknown --methods {sorted(unknown)}; known: {sorted(methods)}",
                file=sys.stderr,
            )
            return 2
        methods = {k: v for k, v in methods.items() if k in args.methods}
    timer = Timer(device)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, Triton interpreter)"
    )
    print(f" > gpu_loss_bench on {name}: vocab {args.vocab}, {args.dtype}, tokens {args.tokens}", flush=True)

    results: list[Result] = []
    copy_bw: dict[int, float] = {}
    for tokens in args.tokens:
        g = torch.Generator(device=device).manual_seed(1234)
        # LM-like logits: a few confident rows, most spread (so the SED mask is mixed).
        master = (
            torch.randn(tokens, 1, args.vocab, generator=g, device=device, dtype=torch.float32) * 2.0
        ).to(dtype)
        target = torch.randint(0, args.vocab, (tokens, 1), generator=g, device=device)
        copy_bw[tokens] = copy_bandwidth(master, timer)
        ref_loss = {}
        for mname, fn in methods.items():
            if isinstance(fn, str):
                results.append(Result(mname, tokens, note=fn))
                continue
            started = time.time()
            try:
                r = measure(fn, master, target, args, timer, device)
            except Exception as exc:  # noqa: BLE001 - a failing method is a table row, not a crash
                if device.type == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                results.append(Result(mname, tokens, note=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
                continue
            r.method = mname
            family = "megatron_ce_unfused" if not mname.startswith("sed") else "sed_torch"
            if mname == family:
                ref_loss[family] = r.loss
            elif family in ref_loss:
                r.max_diff = float((r.loss - ref_loss[family]).abs().max())
            r.loss = None
            results.append(r)
            print(
                f" > tokens {tokens:6d} {mname:36s} {r.total_ms:9.2f} ms (incl. warmup {time.time() - started:.1f} s)",
                flush=True,
            )
        del master, target
        if device.type == "cuda":
            torch.cuda.empty_cache()

    import triton

    header = (
        f"Device: {name}; {datetime.date.today().isoformat()}; torch {torch.__version__}, "
        f"triton {triton.__version__}; vocab {args.vocab}, {args.dtype}, TP 1, median of "
        f"{args.iters} iterations after {args.warmup} warm-up. Floor: 3 x tokens x vocab x "
        f"{dtype.itemsize} bytes at the measured copy bandwidth "
        + ", ".join(f"{bw / 1e9:.0f} GB/s ({t} tokens)" for t, bw in copy_bw.items())
        + "."
    )
    table = format_table(results, args.vocab, dtype.itemsize, copy_bw)
    text = header + "\n\n" + table + "\n"
    print()
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.out)  # atomic
    return 0


if __name__ == "__main__":
    sys.exit(main())
