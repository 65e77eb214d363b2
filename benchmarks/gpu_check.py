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

This file runs the checks and writes the report; each check is declared once, with its
row's section and name, in its module (benchmarks/gpu_check_registry.py lists them). A
check that raises is a FAIL row saying what and where; the others still run.

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
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_check_registry import FAIL, SECTIONS, SKIP, Check, Context, Outcome, declared_checks  # noqa: E402


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
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def require_unique(checks: list[Check]) -> None:
    """A (section, name) declared twice would be two rows nobody can tell apart."""
    twice = [key for key, n in Counter((c.section, c.name) for c in checks).items() if n > 1]
    if twice:
        raise ValueError(f"gpu_check: checks declared twice: {twice}")


# -- runner -----------------------------------------------------------------------------


def failure(exc: BaseException) -> str:
    """The exception's last line (a trainer's last log line, a sync's message) and where."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{lines[-1][:160] if lines else ''} at {Path(where.filename).name}:{where.lineno}"


def run_check(check: Check, ctx: Context) -> Row:
    try:
        out = check.fn(ctx)
        if not isinstance(out, Outcome):
            raise TypeError(f"check {check.name!r} returned {out!r}, not an Outcome")
    except Exception as exc:  # noqa: BLE001 - one broken check does not hide the others
        traceback.print_exc()
        ctx.free_device_memory()
        return Row(check.section, check.name, FAIL, type(exc).__name__, failure(exc))
    return Row(check.section, check.name, out.result, out.value, out.detail)


def run_checks(checks: list[Check], sections: list[str], ctx: Context) -> list[Row]:
    """Each section's checks in declaration order, sections in the order asked for."""
    rows = []
    for section in sections:
        t0 = time.time()
        for check in checks:
            if check.section == section:
                row = run_check(check, ctx)
                rows.append(row)
                # a PASS / INFO row's detail is in the report; a FAIL / SKIP says why here
                detail = row.detail if row.result in (FAIL, SKIP) else row.detail[:120]
                print(
                    f"  {section:8s} {row.check:44s} {row.result:5s} {row.value:>14s}  {detail}", flush=True
                )
        ctx.end_section()
        print(f"  [{section}: {time.time() - t0:.1f} s]", flush=True)
    return rows


# -- report -----------------------------------------------------------------------------


def versions(names=("megatron-core", "torch", "triton", "transformer-engine", "liger-kernel")) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for n in names:
        try:
            out.append(f"{n} {version(n)}")
        except PackageNotFoundError:
            out.append(f"{n} -")
    return ", ".join(out)


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
    checks = declared_checks(args.dry_run)
    require_unique(checks)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU dry run (Triton interpreter)"
    cap = ".".join(map(str, torch.cuda.get_device_capability())) if device.type == "cuda" else "-"
    header = f"gpu_check on {name} (capability {cap}); {datetime.datetime.now().isoformat(timespec='seconds')}; {versions()}"
    print(header, flush=True)
    ctx = Context(
        device=device,
        dry_run=args.dry_run,
        iters=1 if args.dry_run else args.iters,
        warmup=0 if args.dry_run else args.warmup,
    )
    t_all = time.time()
    rows = run_checks(checks, args.sections, ctx)
    meta = {
        "device": name,
        "capability": cap,
        "dry_run": args.dry_run,
        "seconds": round(time.time() - t_all, 1),
    }
    md, js = write_report(args.report, rows, header, meta)
    print()
    print(md.read_text())
    failed = [f"{r.section} / {r.check}" for r in rows if r.result == FAIL]
    print(f"gpu_check: {time.time() - t_all:.0f} s; {len(failed)} failed {failed}; report {md} and {js}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
