"""Forward+backward time and peak memory of the loss ops on this CPU.

Compares, on the same logits and targets:
  ce     Megatron-Core's vocab_parallel_cross_entropy (the baseline)
  sed    megatron_sed.vocab_parallel_sed_loss (top-k mass mask, quadratic regulariser)
  naive  SED as in the authors' code: full fp32 softmax + top-k + autograd (TP=1 only)

Each measurement runs in a fresh process (per TP rank). Peak memory is the logits the
op is handed plus the process's peak RSS above what it held once its inputs existed (the
op's own buffers, gradient included), per rank, max over ranks. Time is the median of --repeat fwd+bwd runs after one warm-up.

    python benchmarks/loss_bench.py                 # the full table (minutes)
    python benchmarks/loss_bench.py --quick         # a small table (seconds)
    python benchmarks/loss_bench.py --write-docs    # also update docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time


# --------------------------------------------------------------------------- worker
def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_inputs(tokens, vocab_local, dtype, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(tokens, 1, vocab_local, dtype=dtype)
    step = 256  # fill in slices: no full-size float32 temporary inflates the peak
    for i in range(0, tokens, step):
        logits[i : i + step] = (torch.randn(min(step, tokens - i), 1, vocab_local, generator=g) * 4).to(dtype)
    return logits


def _run_once(impl, logits, target, cfg, tp_group):
    import torch

    # A fresh input per run (float32 ops work in place), seen through a view as in a model,
    # where the logits come out of the output layer: were they the autograd leaf itself,
    # AccumulateGrad would copy a gradient that aliases them (Megatron's CE returns its
    # input tensor as the gradient) and bill that copy to the loss.
    leaf = logits.clone().requires_grad_()
    x = leaf.view(leaf.shape)
    t0 = time.perf_counter()
    if impl == "ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        loss = vocab_parallel_cross_entropy(x, target)
    elif impl == "sed":
        from megatron_sed import vocab_parallel_sed_loss

        loss, _ = vocab_parallel_sed_loss(x, target, cfg, tp_group=tp_group)
    else:  # the authors' formulation, materialising softmax and log-softmax
        z = x.float()
        ce = torch.nn.functional.cross_entropy(z.view(-1, z.shape[-1]), target.view(-1), reduction="none")
        with torch.no_grad():
            probs = torch.softmax(z, dim=-1)
            mask = probs.topk(cfg.top_k, dim=-1).values.sum(-1).view(-1) < cfg.threshold
        p_y = torch.exp(-ce)
        loss = ce + cfg.coef * mask * (p_y - 0.5) ** 2
    loss.sum().backward()
    elapsed = time.perf_counter() - t0
    del x, leaf, loss
    return elapsed


def worker(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    # Megatron's CE reads its TP group from parallel_state, so every run (TP=1 too) is a
    # torchrun world with Megatron's groups initialised.
    world = args.tp
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    from megatron_sed import SEDConfig

    dtype = getattr(torch, args.dtype)
    cfg = SEDConfig(coef=1.0, top_k=2, threshold=0.95, mask="topk_mass", impl="torch")
    logits = _make_inputs(args.tokens, args.vocab // world, dtype, seed=rank)
    target = torch.randint(0, args.vocab, (args.tokens, 1), generator=torch.Generator().manual_seed(7))
    _run_once(args.impl, logits[:8], target[:8], cfg, tp_group)  # import/initialise outside the peak
    base = _rss_peak_bytes() + logits.numel() * logits.element_size()  # + the per-run clone
    times = []
    for i in range(args.repeat + 1):
        if world > 1:
            dist.barrier()
        t = _run_once(args.impl, logits, target, cfg, tp_group)
        if i > 0:
            times.append(t)
    # peak = the inputs the op is handed (the logits) + what the op itself adds on top
    peak_extra = max(0, _rss_peak_bytes() - base) + logits.numel() * logits.element_size()
    gathered = [None] * world
    dist.all_gather_object(gathered, (max(times), peak_extra))
    peak_extra = max(p for _, p in gathered)
    dist.destroy_process_group()
    if rank == 0:
        times.sort()
        print(json.dumps({"time_s": times[len(times) // 2], "peak_bytes": peak_extra}))


# --------------------------------------------------------------------------- driver
def run_worker(script: str, flags: dict, threads: int, launcher: tuple = ()) -> dict:
    """Run `script --worker --KEY VALUE ...` (None values left out) in a fresh process,
    under `launcher` (e.g. torch.distributed.run's arguments) if given, and return the last
    JSON line it prints. Shared by the CPU benchmarks that measure each arm in its own
    process."""
    cmd = [sys.executable, *launcher, os.path.abspath(script), "--worker"]
    for key, value in flags.items():
        if value is not None:
            cmd += [f"--{key}", str(value)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])


def measure(impl, tokens, vocab, dtype, tp, repeat, threads):
    flags = dict(impl=impl, tokens=tokens, vocab=vocab, dtype=dtype, tp=tp, repeat=repeat, threads=threads)
    launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}")
    return run_worker(__file__, flags, threads, launcher)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def estimate_naive_bytes(tokens, vocab, dtype_bytes):
    # input clone + fp32 copy + log-softmax + softmax + grads
    return tokens * vocab * (dtype_bytes * 2 + 4 * 4)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, one repeat (for the demo)")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / tp)")
    p.add_argument(
        "--max-naive-gib",
        type=float,
        default=14.0,
        help="skip the naive op where its estimated memory exceeds this",
    )
    p.add_argument("--write-docs", action="store_true", help="update the table in docs/performance.md")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="sed", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.tokens, args.vocab, args.tp = args.tokens[0], args.vocab[0], args.tp[0]
        return worker(args)
    if args.quick:
        args.tokens, args.vocab, args.tp, args.repeat = [1024], [32768], [1, 2], 2

    cores = os.cpu_count() or 1
    rows = []
    header = (
        "| tokens | vocab | dtype | TP | CE ms | SED ms | naive ms | SED/CE time | "
        "CE peak MiB | SED peak MiB | naive peak MiB | SED/CE mem | naive/SED mem |"
    )
    print(header)
    print("|" + "---|" * 13)
    for tokens in args.tokens:
        for vocab in args.vocab:
            for dtype in args.dtypes:
                for tp in args.tp:
                    threads = args.threads or max(1, cores // tp)
                    res = {
                        impl: measure(impl, tokens, vocab, dtype, tp, args.repeat, threads)
                        for impl in ("ce", "sed")
                    }
                    nbytes = 2 if dtype == "bfloat16" else 4
                    if tp == 1 and estimate_naive_bytes(tokens, vocab, nbytes) <= args.max_naive_gib * 2**30:
                        res["naive"] = measure("naive", tokens, vocab, dtype, tp, args.repeat, threads)
                    ms = {k: v["time_s"] * 1e3 for k, v in res.items()}
                    mib = {k: v["peak_bytes"] / 2**20 for k, v in res.items()}
                    naive_ms = f"{ms['naive']:.0f}" if "naive" in ms else "n/a"
                    naive_mib = f"{mib['naive']:.0f}" if "naive" in mib else "n/a"
                    naive_ratio = f"{mib['naive'] / max(mib['sed'], 1):.2f}" if "naive" in mib else "n/a"
                    row = (
                        f"| {tokens} | {vocab} | {dtype} | {tp} | {ms['ce']:.0f} | {ms['sed']:.0f} | {naive_ms} | "
                        f"{ms['sed'] / ms['ce']:.2f} | {mib['ce']:.0f} | {mib['sed']:.0f} | {naive_mib} | "
                        f"{mib['sed'] / max(mib['ce'], 1):.2f} | {naive_ratio} |"
                    )
                    print(row, flush=True)
                    rows.append(row)
    stamp = f"{datetime.date.today().isoformat()}, {machine_description()}"
    print(f"\n{stamp}; peak MiB = the logits + the op's own buffers and gradient (per rank, max over ranks)")
    if args.write_docs:
        write_docs("\n".join([header, "|" + "---|" * 13] + rows), stamp, args)


def write_docs(table: str, stamp: str, args) -> None:
    cmd = "python benchmarks/loss_bench.py" + (" --quick" if args.quick else "")
    body = f"Measured {stamp}, `{cmd}`, median of {args.repeat} fwd+bwd runs:\n\n{table}"
    write_docs_block("loss_bench", "CPU loss: SED vs Megatron CE", body)


def write_docs_block(name: str, heading: str, body: str) -> None:
    """Put `body` between docs/performance.md's `<!-- name:begin -->` / `:end` markers (a new
    `## heading` section at the end where they are missing), atomically. Shared by the CPU
    benchmarks' --write-docs."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")
    text = open(path).read() if os.path.exists(path) else "# Performance\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text += f"\n## {heading}\n\n{block}\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
