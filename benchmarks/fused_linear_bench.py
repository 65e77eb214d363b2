"""Output layer + SED loss, forward and backward, on this CPU: fused (logit-free,
megatron_sed.ops.fused_linear_sed) against materialised (logits = X W^T, then
vocab_parallel_sed_loss), at TP 1 on the same hidden states, weight, targets and loss
mask. "fused" is handed the loss mask (the gradient computed in the forward, 3 GEMMs:
what the trainer runs), "fused-recompute" is not (logits recomputed in the backward).

Each measurement runs in a fresh process. Memory: the process's peak RSS above what it
held once its inputs (hidden states X, weight W) existed, less the weight gradient (both
paths return one): the path's own buffers, dX included. The target of the fused path is
at most 1/8 of the materialised logits plus their gradient (tokens x V x 2 x dtype bytes:
the "logits+grad" column). Time: the median of --repeat fwd+bwd runs (after a warm-up on
a few tokens, so the first run's page faults are counted as they are in training), as
the process's CPU time (user + system: what the work costs, robust on a shared machine,
page faults included) and as wall time.

    python benchmarks/fused_linear_bench.py --quick        # seconds
    python benchmarks/fused_linear_bench.py                # the table in docs/performance.md
    python benchmarks/fused_linear_bench.py --write-docs   # also update docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import machine_description, run_worker, write_docs_block  # noqa: E402


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_once(impl, x, w, target, mask, cfg, chunk):
    import torch

    from megatron_sed import vocab_parallel_sed_loss
    from megatron_sed.ops.fused_linear_sed import fused_linear_sed_loss

    x.grad = w.grad = None
    c0, t0 = time.process_time(), time.perf_counter()
    if impl.startswith("fused"):
        # "fused": handed the loss mask, as the trainer's output processor does (the
        # gradient in the forward, 3 GEMMs); "fused-recompute": without (4 GEMMs)
        hint = mask if impl == "fused" else None
        loss, _ = fused_linear_sed_loss(x, w, target, cfg, chunk_tokens=chunk, grad_hint=hint)
    else:
        loss, _ = vocab_parallel_sed_loss(torch.matmul(x, w.t()), target, cfg)
    # Megatron's loss_func: the masked sum over the supervised tokens, per token
    (loss * mask).sum().div(mask.sum()).backward()
    return time.process_time() - c0, time.perf_counter() - t0


def worker(args):
    import torch

    from megatron_sed import SEDConfig

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.tokens, 1, args.hidden, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5 * 4).to(dtype).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens, 1), generator=g)
    mask = (torch.rand(args.tokens, 1, generator=g) < 0.7).float()  # prompts are not supervised
    cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.95, mask="topk_mass", impl="torch")
    small = x[:8].detach().clone().requires_grad_()
    _run_once(
        args.impl, small, w, target[:8], mask[:8], cfg, args.chunk
    )  # imports (8 tokens: little retained)
    w.grad = None
    base = _rss_now()
    runs = [_run_once(args.impl, x, w, target, mask, cfg, args.chunk) for _ in range(args.repeat)]
    extra = max(0, _rss_peak() - base) - w.numel() * w.element_size()
    cpu = sorted(c for c, _ in runs)[len(runs) // 2]
    wall = sorted(t for _, t in runs)[len(runs) // 2]
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "extra_bytes": max(extra, 0)}))


def measure(impl, tokens, vocab, hidden, dtype, repeat, threads, chunk):
    flags = dict(
        impl=impl,
        tokens=tokens,
        vocab=vocab,
        hidden=hidden,
        dtype=dtype,
        repeat=repeat,
        threads=threads,
        chunk=chunk,
    )
    return run_worker(__file__, flags, threads)


HEADER = (
    "| tokens | vocab | hidden | dtype | chunk | materialised CPU ms | fused CPU ms | fused/mat. CPU time | "
    "fused/mat. wall | recompute/mat. CPU time | logits+grad MiB | materialised extra MiB | fused extra MiB | "
    "fused extra / (logits+grad) | recompute extra / (logits+grad) |"
)
NCOLS = 15
IMPLS = ("materialised", "fused", "fused-recompute")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small shape (seconds)")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=[
            "4096x32000x1024",
            "4096x128256x1024",
            "4096x152064x1024",
            "16384x32000x256",
            "16384x128256x256",
        ],
        help="tokens x vocab x hidden",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=None, help="fused chunk tokens (default: derived)")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="fused", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.shapes = ["1024x32000x256"]
    from megatron_sed.ops.fused_linear_sed import default_chunk_tokens

    nbytes = 2 if args.dtype in ("bfloat16", "float16") else 4
    rows = []
    print(HEADER)
    print("|" + "---|" * NCOLS)
    for shape in args.shapes:
        tokens, vocab, hidden = (int(v) for v in shape.split("x"))
        res = {
            impl: measure(impl, tokens, vocab, hidden, args.dtype, args.repeat, args.threads, args.chunk)
            for impl in IMPLS
        }
        chunk = args.chunk or default_chunk_tokens(tokens, vocab)
        logits_grad = tokens * vocab * nbytes * 2 / 2**20
        ms = {k: v["cpu_s"] * 1e3 for k, v in res.items()}
        wall = res["fused"]["wall_s"] / res["materialised"]["wall_s"]
        mib = {k: v["extra_bytes"] / 2**20 for k, v in res.items()}
        row = (
            f"| {tokens} | {vocab} | {hidden} | {args.dtype} | {chunk} | {ms['materialised']:.0f} | "
            f"{ms['fused']:.0f} | {ms['fused'] / ms['materialised']:.2f} | {wall:.2f} | "
            f"{ms['fused-recompute'] / ms['materialised']:.2f} | {logits_grad:.0f} | "
            f"{mib['materialised']:.0f} | {mib['fused']:.0f} | {mib['fused'] / logits_grad:.3f} | "
            f"{mib['fused-recompute'] / logits_grad:.3f} |"
        )
        print(row, flush=True)
        rows.append(row)
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine_description()}"
    print(f"\n{stamp}, {args.threads} thread(s)")
    if args.write_docs:
        table = "\n".join([HEADER, "|" + "---|" * NCOLS] + rows)
        body = f"Measured {stamp}, {args.threads} thread(s), median of {args.repeat}:\n\n{table}"
        write_docs_block("fused_linear_bench", "CPU: output layer + loss, fused vs materialised", body)


if __name__ == "__main__":
    main()
