#!/usr/bin/env python
"""One-command GPU check of megatron-sed: one table, written as markdown + JSON.

    scripts/gpu_check.sh --report DIR             # on a GPU (<= 8 min on one H200)
    python benchmarks/gpu_check.py --dry-run --report DIR   # every code path on CPU, tiny

Sections (rows of one table: section | check | result | value | detail):

1. kernels  - Triton vs torch vs float64 reference: loss, every statistic, gradient
              (out of place and in place), bf16 and fp32, local vocab 50257 / 131072 /
              19008, top_k 1 / 2 / 8, ignored rows; a TP=2 emulation with
              vocab_start > 0; bf16 gradient ulps vs the correctly rounded value; one
              case with tokens x vocab > 2^31 (benchmarks/gpu_check_loss.py); the
              trainer's THD context-parallel split vs TE's thd_get_partitioned_indices.
2. timing   - CUDA events, median: Megatron's unfused / native fused CE, TE's
              parallel_cross_entropy and Liger's CE where they import, torch and Triton
              SED at 8192 and 16384 tokens x 131072 bf16; GB/s against the 3-pass floor
              at the measured copy bandwidth; peak memory / (logits + gradient); a
              Triton block/warp sweep (benchmarks/gpu_loss_bench.py does the timing).
3. syncs    - torch.cuda.set_sync_debug_mode("error") around SED forward/backward, an
              EMA step and a tiny model's training step (benchmarks/gpu_check_runtime.py).
4. fused    - the output layer fused with the SED loss (--cross-entropy-fusion-impl
              linear): exactness vs materialised and float64 (bf16, fp32); output
              layer + loss fwd+bwd time and peak memory, fused vs materialised SED,
              Megatron's CE and Liger's fused linear CE, at 8192 x 128256 and 16384 x
              152064, hidden 4096 (benchmarks/gpu_check_fused.py).
5. engine   - megatron-sed-train: 3 iterations bf16, --fp16, --finetune --lr 0 from the
              saved checkpoint (validation loss unchanged), --fp8-format hybrid if TE.

result: PASS / FAIL (a check), INFO (a measurement), SKIP (with the reason). Exit status
1 if any row FAILs. Nothing here needs Transformer Engine; megatron-core must import
(scripts/gpu_check.sh installs the carried wheel).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

TRITON_DEFAULT = "default"
SWEEP = [(4096, 8), (4096, 16), (2048, 8), (None, None)]  # (block, warps); None: the default


@dataclass
class Row:
    section: str
    check: str
    result: str  # PASS / FAIL / INFO / SKIP
    value: str = ""
    detail: str = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", default=".", help="directory for gpu_check.md / gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    p.add_argument("--sections", nargs="+", default=["kernels", "timing", "syncs", "fused", "engine"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def sizes(dry: bool) -> dict:
    if dry:
        return dict(vocabs=[203, 512, 76], rows=12, big=(24, 512, 4), tokens=[8], vocab=512)
    # 16448 x 131072 = 2^31 + 2^23 elements
    return dict(
        vocabs=[50257, 131072, 19008], rows=64, big=(16448, 131072, 64), tokens=[8192, 16384], vocab=131072
    )


def expected_rows(args) -> list[tuple[str, str]]:
    """(section, check) of every row the run writes (the CI test checks them all)."""
    sz = sizes(args.dry_run)
    rows = []
    if "kernels" in args.sections:
        for dtype in ("bf16", "fp32"):
            rows += [("kernels", f"{dtype} V={v} k={k}") for v in sz["vocabs"] for k in (1, 2, 8)]
        rows.append(("kernels", "bf16 gradient ulps"))
        rows += [("kernels", f"{dtype} TP=2 vocab_start>0") for dtype in ("fp32", "bf16")]
        rows.append(("kernels", "tokens x vocab > 2^31"))
        rows.append(("kernels", "THD CP split = TE's"))
    if "timing" in args.sections:
        rows.append(("timing", "copy bandwidth"))
        for t in sz["tokens"]:
            for m in timing_methods():
                rows.append(("timing", f"{t} x {sz['vocab']} {m}"))
    if "syncs" in args.sections:
        for name in sync_cases():
            rows.append(("syncs", name))
    if "fused" in args.sections:
        import gpu_check_fused as F

        rows += [("fused", f"exact {d}") for d in ("bf16", "fp32")]
        for t, v, h in F.shapes(args.dry_run):
            rows += [("fused", f"{t} x {v} x {h} {m}") for m in F.timing_methods()]
    if "engine" in args.sections:
        for name in ("bf16 train + save", "fp16 train", "finetune --lr 0", "fp8 hybrid"):
            rows.append(("engine", name))
    return rows


def timing_methods() -> list[str]:
    base = ["megatron_ce_unfused", "megatron_ce_fused", "te_parallel_ce", "liger_ce", "sed_torch"]
    base += ["sed_triton", "sed_triton_inplace"]
    return base + [f"sed_triton[{sweep_name(b, w)}]" for b, w in SWEEP]


def sweep_name(block, warps) -> str:
    return TRITON_DEFAULT if block is None else f"b{block},w{warps}"


def sync_cases() -> list[str]:
    return [
        "SED fwd+bwd triton, fixed tau",
        "SED fwd+bwd triton, tensor tau",
        "SED fwd+bwd torch, fixed tau",
        "EMA tracker step",
        "tiny GPTModel training step, fixed tau",
    ]


# -- sections ---------------------------------------------------------------------------


def section_kernels(args, device, rows: list[Row]) -> None:
    import gpu_check_loss as L
    import torch

    from megatron_sed import SEDConfig

    sz = sizes(args.dry_run)
    ulps = {"triton": [], "triton_inplace": [], "torch": []}
    for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for vi, vocab in enumerate(sz["vocabs"]):
            for k in (1, 2, 8):
                logits, target = L.make_case(sz["rows"], vocab, dtype, seed=vi * 10 + k, device=device)
                cfg = SEDConfig(coef=1.0, top_k=k, threshold=0.9)
                res = L.check_case(logits, target, cfg)
                ok = L.case_ok(res, dtype, sz["rows"])
                worst = {n: max(r[n] for r in res.values()) for n in ("loss_err", "stat_err", "grad_err")}
                detail = "; ".join(
                    f"{impl}: loss {r['loss_err']:.1e} stats {r['stat_err']:.1e} grad {r['grad_err']:.1e}"
                    + (f" flips {r['bool_mismatch']}" if r["bool_mismatch"] else "")
                    for impl, r in res.items()
                )
                rows.append(
                    Row(
                        "kernels",
                        f"{dname} V={vocab} k={k}",
                        "PASS" if ok else "FAIL",
                        f"grad {worst['grad_err']:.1e}",
                        detail,
                    )
                )
                if dtype == torch.bfloat16:
                    for impl, r in res.items():
                        ulps[impl].append(r["ulps"])
        if dtype == torch.bfloat16:
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
            triton_off = sum(u["off"] for u in ulps["triton"]) / max(
                1, sum(u["elements"] for u in ulps["triton"])
            )
            rows.append(
                Row(
                    "kernels",
                    "bf16 gradient ulps",
                    "PASS" if worst_max <= 1 else "FAIL",
                    f"triton {100 * triton_off:.2f}% off",
                    "; ".join(parts),
                )
            )
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        logits, target = L.make_case(sz["rows"], sz["vocabs"][1], dtype, seed=99, device=device)
        cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.9)
        r = L.check_tp2(logits, target, cfg)
        ok = r["loss_err"] <= L.LOSS_TOL and r["grad_err"] <= L.GRAD_TOL[dtype]
        rows.append(
            Row(
                "kernels",
                f"{dname} TP=2 vocab_start>0",
                "PASS" if ok else "FAIL",
                f"grad {r['grad_err']:.1e}",
                f"loss {r['loss_err']:.1e}",
            )
        )
    n, v, tail = sz["big"]
    r = L.check_big(n, v, tail, device)
    ok = r["loss_err"] <= L.LOSS_TOL and r["grad_err"] <= L.GRAD_TOL[torch.bfloat16]
    note = "" if r["elements"] > 2**31 else " (dry run: below 2^31, same code)"
    rows.append(
        Row(
            "kernels",
            "tokens x vocab > 2^31",
            "PASS" if ok else "FAIL",
            f"{r['elements']:,} elements",
            f"last {tail} rows vs float64: loss {r['loss_err']:.1e} grad {r['grad_err']:.1e}{note}",
        )
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    import gpu_check_runtime as R

    rows.append(Row("kernels", "THD CP split = TE's", *R.thd_partition_check(device)))


def section_timing(args, device, rows: list[Row]) -> None:
    import gpu_loss_bench as B
    import torch

    from megatron_sed import KernelOptions, SEDConfig, vocab_parallel_sed_loss

    sz = sizes(args.dry_run)
    bench_args = argparse.Namespace(
        top_k=2,
        sweep=False,
        iters=1 if args.dry_run else args.iters,
        warmup=0 if args.dry_run else args.warmup,
    )
    tp_group = B.init_megatron_tp1(device)
    methods = B.build_methods(bench_args, device, tp_group)
    sed = SEDConfig(coef=1.0, top_k=2, threshold=0.95, impl="triton")
    for block, warps in SWEEP:
        cfg = sed.replace(kernel=KernelOptions(block_size=block, num_warps=warps))
        methods[f"sed_triton[{sweep_name(block, warps)}]"] = (
            lambda c: lambda x, t: vocab_parallel_sed_loss(x, t, c)[0]
        )(cfg)
    timer = B.Timer(device)
    gib = float(1 << 30)
    for tokens in sz["tokens"]:
        g = torch.Generator(device=device).manual_seed(1234)
        master = (torch.randn(tokens, 1, sz["vocab"], generator=g, device=device) * 2.0).to(torch.bfloat16)
        target = torch.randint(0, sz["vocab"], (tokens, 1), generator=g, device=device)
        bw = B.copy_bandwidth(master, timer)
        if tokens == sz["tokens"][0]:
            rows.append(
                Row(
                    "timing",
                    "copy bandwidth",
                    "INFO",
                    f"{bw / 1e9:.0f} GB/s",
                    "device-to-device copy, read + write",
                )
            )
        must_move = 3 * master.numel() * 2
        floor_ms = must_move / bw * 1e3
        fused_ms = None
        for name in timing_methods():
            fn = methods.get(name, "skipped: not built")
            check = f"{tokens} x {sz['vocab']} {name}"
            if isinstance(fn, str):
                rows.append(Row("timing", check, "SKIP", "", fn))
                continue
            try:
                r = B.measure(fn, master, target, bench_args, timer, device)
            except Exception as exc:  # noqa: BLE001 - a failing method is a row
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(Row("timing", check, "FAIL", "", f"{type(exc).__name__}: {str(exc)[:120]}"))
                continue
            if name == "megatron_ce_fused":
                fused_ms = r.total_ms
            peak = (
                f", peak {r.peak_bytes / gib:.2f} GiB = {r.peak_bytes / (2 * master.numel() * 2):.2f} x (logits+grad)"
                if r.peak_bytes
                else ""
            )
            vs = f", {r.total_ms / fused_ms:.2f} x Megatron fused CE" if fused_ms else ""
            rows.append(
                Row(
                    "timing",
                    check,
                    "INFO",
                    f"{r.total_ms:.2f} ms",
                    f"fwd {r.fwd_ms:.2f} + bwd {r.bwd_ms:.2f} ms, {must_move / (r.total_ms / 1e3) / 1e9:.0f} GB/s, "
                    f"{r.total_ms / floor_ms:.2f} x floor{peak}{vs}",
                )
            )
        del master, target
        if device.type == "cuda":
            torch.cuda.empty_cache()


def section_syncs(args, device, rows: list[Row]) -> None:
    import gpu_check_runtime as R

    cases = dict(
        zip(
            sync_cases(),
            [
                lambda: R.sed_step(device, "triton", False),
                lambda: R.sed_step(device, "triton", True),
                lambda: R.sed_step(device, "torch", False),
                lambda: R.ema_step(device),
                lambda: R.model_step(device),
            ],
        )
    )
    how = 'set_sync_debug_mode("error")' if device.type == "cuda" else "CPU stand-in (TorchFunctionMode)"
    for name, fn in cases.items():
        try:
            fn()
            rows.append(Row("syncs", name, "PASS", "no sync", how))
        except Exception as exc:  # noqa: BLE001 - a sync is a FAIL row
            where = traceback.extract_tb(exc.__traceback__)[-1]
            rows.append(
                Row(
                    "syncs",
                    name,
                    "FAIL",
                    type(exc).__name__,
                    f"{str(exc)[:160]} at {Path(where.filename).name}:{where.lineno}",
                )
            )


def section_fused(args, device, rows: list[Row]) -> None:
    import gpu_check_fused as F
    import torch

    # the tolerances of tests/ops/test_fused_linear_sed.py (dX, dW relative to their max)
    tol = {"bf16": (2e-5, 2e-2), "fp32": (2e-5, 1e-5)}
    for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        r = F.check_exact(device, dtype, args.dry_run)
        loss_tol, grad_tol = tol[dname]
        ok = r["loss"] <= loss_tol and r["dx"] <= grad_tol and r["dw"] <= grad_tol
        rows.append(
            Row(
                "fused",
                f"exact {dname}",
                "PASS" if ok else "FAIL",
                f"dW {r['dw']:.1e}",
                f"vs float64: loss {r['loss']:.1e} dX {r['dx']:.1e} dW {r['dw']:.1e}; "
                f"loss vs materialised {r['vs_materialised']:.1e}",
            )
        )
    import gpu_loss_bench as B

    B.init_megatron_tp1(device)  # Megatron's CE reads its TP group from parallel_state
    gib = float(1 << 30)
    for tokens, vocab, hidden in F.shapes(args.dry_run):
        res = F.time_shape(
            device,
            tokens,
            vocab,
            hidden,
            1 if args.dry_run else args.iters,
            0 if args.dry_run else args.warmup,
        )
        base = res.get("materialised_sed")
        base_ms = base[0] if isinstance(base, tuple) else None
        logits_grad = 2 * tokens * vocab * 2
        for name in F.timing_methods():
            r = res.get(name, "skipped: not built")
            check = f"{tokens} x {vocab} x {hidden} {name}"
            if isinstance(r, str):
                rows.append(Row("fused", check, "FAIL" if r.startswith("error") else "SKIP", "", r))
                continue
            ms, peak = r
            ratio = ms / base_ms if base_ms else float("nan")
            result = "INFO"
            if name == "fused_sed" and device.type == "cuda":
                result = "PASS" if ratio <= 1.1 else "FAIL"  # the GPU target
            rows.append(
                Row(
                    "fused",
                    check,
                    result,
                    f"{ms:.1f} ms",
                    f"{ratio:.2f} x materialised SED; peak {peak / gib:.2f} GiB = "
                    f"{peak / logits_grad:.3f} x bf16 (logits+grad)",
                )
            )
    if device.type == "cuda":
        torch.cuda.empty_cache()


def section_engine(args, device, rows: list[Row]) -> None:
    import gpu_check_runtime as R

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_engine_"))
    flags = R.engine_flags(tmp, args.dry_run)
    iters = "2" if args.dry_run else "3"
    timeout = 300
    ck = tmp / "ck"

    def run(name, extra):
        t0 = time.time()
        try:
            return R.run_engine(tmp, name, [*flags, *extra], timeout), time.time() - t0, None
        except Exception as exc:  # noqa: BLE001 - a failed run is a FAIL row
            return None, time.time() - t0, str(exc).splitlines()[-1][:200] if str(exc) else type(exc).__name__

    bf16, secs, err = run(
        "bf16", ["--bf16", "--train-iters", iters, "--save", str(ck), "--save-interval", iters]
    )
    if bf16 is None:
        rows.append(Row("engine", "bf16 train + save", "FAIL", f"{secs:.0f} s", err))
    else:
        losses = bf16.series("lm_loss")
        ok = len(losses) == int(iters) and R.finite(losses)
        rows.append(
            Row(
                "engine",
                "bf16 train + save",
                "PASS" if ok else "FAIL",
                f"{secs:.0f} s",
                f"{len(losses)} iterations, lm loss {[round(x, 4) for x in losses]}",
            )
        )
    if args.dry_run:
        rows.append(Row("engine", "fp16 train", "SKIP", "", "dry run: the bf16 run's code path with --fp16"))
    else:
        fp16, secs, err = run("fp16", ["--fp16", "--train-iters", iters])
        losses = fp16.series("lm_loss") if fp16 else []
        ok = fp16 is not None and len(losses) == int(iters) and R.finite(losses)
        rows.append(
            Row(
                "engine",
                "fp16 train",
                "PASS" if ok else "FAIL",
                f"{secs:.0f} s",
                err or f"{len(losses)} iterations, lm loss {[round(x, 4) for x in losses]}",
            )
        )
    if bf16 is None:
        rows.append(Row("engine", "finetune --lr 0", "SKIP", "", "no checkpoint (the bf16 run failed)"))
    else:
        ft, secs, err = run(
            "finetune",
            [
                "--bf16",
                "--load",
                str(ck),
                "--finetune",
                "--lr",
                "0",
                "--min-lr",
                "0",
                "--lr-warmup-iters",
                "0",
                "--train-iters",
                "2",
            ],
        )
        if ft is None:
            rows.append(Row("engine", "finetune --lr 0", "FAIL", f"{secs:.0f} s", err))
        else:
            saved = [r.get("valid_lm_loss") for r in bf16.valid][-1:]
            after = [r.get("valid_lm_loss") for r in ft.valid]
            ok = bool(saved) and bool(after) and all(a == saved[0] for a in after)
            rows.append(
                Row(
                    "engine",
                    "finetune --lr 0",
                    "PASS" if ok else "FAIL",
                    f"{secs:.0f} s",
                    f"validation lm loss of the saved model {saved} vs after lr-0 steps {after}",
                )
            )
    if device.type != "cuda" or not R.te_available():
        why = "dry run on CPU" if device.type != "cuda" else "Transformer Engine does not import here"
        rows.append(Row("engine", "fp8 hybrid", "SKIP", "", why))
    else:
        fp8, secs, err = run("fp8", ["--bf16", "--fp8-format", "hybrid", "--train-iters", iters])
        losses = fp8.series("lm_loss") if fp8 else []
        ok = fp8 is not None and R.finite(losses)
        rows.append(
            Row(
                "engine",
                "fp8 hybrid",
                "PASS" if ok else "FAIL",
                f"{secs:.0f} s",
                err or f"{len(losses)} iterations, lm loss {[round(x, 4) for x in losses]}",
            )
        )


SECTIONS = {
    "kernels": section_kernels,
    "timing": section_timing,
    "syncs": section_syncs,
    "fused": section_fused,
    "engine": section_engine,
}


# -- report -----------------------------------------------------------------------------


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| section | check | result | value | detail |", "|---|---|---|---|---|"]
    for r in rows:
        detail = r.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.section} | {r.check} | {r.result} | {r.value} | {detail} |")
    return "\n".join(lines) + "\n"


def write_report(directory: str, rows: list[Row], header: str, meta: dict) -> tuple[Path, Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    md, js = d / "gpu_check.md", d / "gpu_check.json"
    for path, text in (
        (md, markdown(rows, header)),
        (js, json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return md, js


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a GPU or pass --dry-run", file=sys.stderr)
        return 1
    device = torch.device("cuda" if not args.dry_run else "cpu")
    import gpu_check_runtime as R

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU dry run (Triton interpreter)"
    cap = ".".join(map(str, torch.cuda.get_device_capability())) if device.type == "cuda" else "-"
    header = f"gpu_check on {name} (capability {cap}); {datetime.datetime.now().isoformat(timespec='seconds')}; {R.versions()}"
    print(header, flush=True)
    rows: list[Row] = []
    t_all = time.time()
    for section in args.sections:
        t0 = time.time()
        before = len(rows)
        try:
            SECTIONS[section](args, device, rows)
        except Exception as exc:  # noqa: BLE001 - one broken section does not hide the others
            rows.append(Row(section, "section error", "FAIL", type(exc).__name__, str(exc)[:200]))
            traceback.print_exc()
        for r in rows[before:]:
            print(
                f"  {r.section:8s} {r.check:44s} {r.result:5s} {r.value:>14s}  {r.detail[:120]}", flush=True
            )
        print(f"  [{section}: {time.time() - t0:.1f} s]", flush=True)
    meta = {
        "device": name,
        "capability": cap,
        "dry_run": args.dry_run,
        "seconds": round(time.time() - t_all, 1),
    }
    md, js = write_report(args.report, rows, header, meta)
    print()
    print(md.read_text())
    print(f"gpu_check: {time.time() - t_all:.0f} s; report {md} and {js}")
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
