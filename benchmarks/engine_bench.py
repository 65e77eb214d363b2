"""Step time of megatron-sed-train (Megatron's pretrain loop + the SED plugin) on this CPU.

Two tables, each run alternated A, B, A, B ... so that a drifting machine affects both
arms alike, ratios taken pair by pair (median of the pairs):

1. engine vs. an older megatron-sed tree (its own training loop) on the demo model
   (4 layers, hidden 128, vocab 262, 2 data-parallel gloo processes), same flags;
   needs --old-tree (a checkout of the old loop) and --old-python (its interpreter).
2. SED vs. Megatron's own CE through the engine at vocabulary 32k and 128k (the demo
   model with a NullTokenizer of that size): --loss-type sed vs. --loss-type ce
   --no-sed-stats (GPTModel's vocab_parallel_cross_entropy, untouched by megatron-sed).

The step time of a run is the median of its --metrics-file `iter_time_ms` records after
the first (warm-up) interval.

    python benchmarks/engine_bench.py                       # table 2 (minutes)
    python benchmarks/engine_bench.py --old-tree ../old --old-python ../old/.venv/bin/python
    python benchmarks/engine_bench.py --quick               # fewer iterations and vocab 32k only
    python benchmarks/engine_bench.py --fused --vocab 128000 --iters 15  # table 3 only

3. --fused: SED with the output layer fused (--cross-entropy-loss-fusion
   --cross-entropy-fusion-impl linear) vs. materialised, 4,096 tokens per micro-batch
   (16 x 256) on each of the 2 data-parallel ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO_MODEL = [
    "--num-layers",
    "4",
    "--hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--position-embedding-type",
    "rope",
    "--untie-embeddings-and-output-weights",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--seq-length",
    "256",
    "--max-position-embeddings",
    "256",
]


def _run(python: str, flags, workdir: Path, env_extra=None, nproc=2, pythonpath=None) -> float:
    """One training run; the median steady-state step time in ms."""
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_sed.train",
        *flags,
        "--metrics-file",
        str(metrics),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env_extra or {}))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [r["iter_time_ms"] for r in rows if "iter_time_ms" in r][1:]
    return statistics.median(times)


def _pairs(label_a, run_a, label_b, run_b, repeats):
    a, b = [], []
    for _ in range(repeats):
        a.append(run_a())
        b.append(run_b())
    ratios = [x / y for x, y in zip(a, b)]
    return {
        "a": label_a,
        "b": label_b,
        "a_ms": statistics.median(a),
        "b_ms": statistics.median(b),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-tree", type=Path, default=None)
    p.add_argument("--old-python", type=str, default=None)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--vocab", type=int, nargs="*", default=[32000, 128000])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fused", action="store_true", help="only table 3 (linear fusion vs materialised)")
    a = p.parse_args(argv)
    if a.quick:
        a.iters, a.repeats, a.vocab = 30, 1, [32000]
    tmp = Path(tempfile.mkdtemp(prefix="engine_bench_"))
    common = [
        *DEMO_MODEL,
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
        "--lr-warmup-iters",
        "2",
        "--weight-decay",
        "0.01",
        "--clip-grad",
        "1.0",
        "--synthetic-num-problems",
        "400",
        "--split",
        "90,10,0",
        "--log-interval",
        str(max(5, a.iters // 6)),
        "--train-iters",
        str(a.iters),
    ]
    print(
        f"# engine step time, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    rows = []
    if a.old_tree is not None:
        demo = [
            *common,
            "--micro-batch-size",
            "8",
            "--global-batch-size",
            "16",
            "--loss-type",
            "sed",
            "--sed-threshold",
            "0.9",
        ]
        new_dir, old_dir = tmp / "new", tmp / "old"
        new_dir.mkdir()
        old_dir.mkdir()
        rows.append(
            (
                "demo model, vocab 262, DP 2",
                _pairs(
                    "engine",
                    lambda: _run(
                        sys.executable,
                        [
                            *demo,
                            "--synthetic-cache-dir",
                            str(tmp / "syn_new"),
                            "--eval-iters",
                            "1",
                            "--eval-interval",
                            "100000",
                        ],
                        new_dir,
                    ),
                    "old loop",
                    lambda: _run(
                        a.old_python,
                        [*demo, "--synthetic-cache-dir", str(tmp / "syn_old")],
                        old_dir,
                        pythonpath=str(a.old_tree),
                    ),
                    a.repeats,
                ),
            )
        )

    def vocab_flags(vocab: int, micro: int, global_batch: int) -> list[str]:
        return [
            *common,
            "--micro-batch-size",
            str(micro),
            "--global-batch-size",
            str(global_batch),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            str(vocab),
            "--eval-iters",
            "1",
            "--eval-interval",
            "100000",
            "--synthetic-cache-dir",
            str(tmp / "syn_new"),
        ]

    for vocab in a.vocab if a.fused else []:
        flags = [*vocab_flags(vocab, 16, 32), "--loss-type", "sed", "--sed-threshold", "0.9"]
        d = tmp / f"fused{vocab}"
        d.mkdir()
        linear = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
        rows.append(
            (
                f"demo model, vocab {vocab}, 4096 tokens/micro-batch, DP 2",
                _pairs(
                    "SED fused (linear)",
                    lambda f=flags, d=d, lin=linear: _run(sys.executable, [*f, *lin], d),
                    "SED materialised",
                    lambda f=flags, d=d: _run(sys.executable, f, d),
                    a.repeats,
                ),
            )
        )
    for vocab in [] if a.fused else a.vocab:
        flags = vocab_flags(vocab, 4, 8)
        d = tmp / f"v{vocab}"
        d.mkdir()
        rows.append(
            (
                f"demo model, vocab {vocab}, DP 2",
                _pairs(
                    "SED",
                    lambda f=flags, d=d: _run(
                        sys.executable, [*f, "--loss-type", "sed", "--sed-threshold", "0.9"], d
                    ),
                    "Megatron CE",
                    lambda f=flags, d=d: _run(sys.executable, [*f, "--loss-type", "ce", "--no-sed-stats"], d),
                    a.repeats,
                ),
            )
        )
    print("\n| setting | A | B | A step (ms) | B step (ms) | A/B (median of pairs) | A/B min-max |")
    print("|---|---|---|---|---|---|---|")
    for setting, r in rows:
        print(
            f"| {setting} | {r['a']} | {r['b']} | {r['a_ms']:.1f} | {r['b_ms']:.1f} | "
            f"{r['ratio']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
