"""Run megatron-sed-train the way users do (torchrun / python -m), in a subprocess: each
run is a fresh Megatron process group with its own global state, as on a cluster.

    run = train(tmp, "tp2", 2, [*TINY, "--tensor-model-parallel-size", "2"])
    run.records          # --metrics-file training records (one per --log-interval)
    run.valid            # evaluation records
    run.log              # stdout + stderr
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# A tiny GPT on the built-in synthetic set (byte tokenizer), single precision.
TINY_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
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
    "128",
    "--max-position-embeddings",
    "128",
    "--make-vocab-size-divisible-by",
    "128",
]
RUN = [
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--lr",
    "1e-3",
    "--min-lr",
    "0",
    "--lr-warmup-iters",
    "1",
    "--log-interval",
    "1",
    "--eval-iters",
    "1",
    "--eval-interval",
    "1000",
    "--seed",
    "1234",
]


@dataclass
class Run:
    name: str
    returncode: int
    log: str
    records: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        return [r[key] for r in self.records if key in r]

    def by_iteration(self) -> dict[int, dict]:
        return {r["iteration"]: r for r in self.records}


def synthetic_flags(tmp: Path, problems: int = 60) -> list[str]:
    return ["--synthetic-num-problems", str(problems), "--synthetic-cache-dir", str(Path(tmp) / "synthetic")]


def train(
    tmp: Path,
    name: str,
    nproc: int,
    flags: Sequence[str],
    timeout: float = 600,
    expect_rc: int = 0,
    env: dict[str, str] | None = None,
) -> Run:
    """Run the trainer with `flags` (plus --metrics-file) on `nproc` local ranks."""
    out = Path(tmp) / name
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    if nproc == 1:
        launch = [sys.executable, "-m", "megatron_sed.train"]
    else:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "megatron_sed.train",
        ]
    cmd = [*launch, *flags, "--metrics-file", str(metrics)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    res = subprocess.run(cmd, cwd=out, env=full_env, capture_output=True, text=True, timeout=timeout)
    log = res.stdout + res.stderr
    (out / "log.txt").write_text(log)
    if res.returncode != expect_rc:
        raise AssertionError(
            f"run {name} exited with {res.returncode} (expected {expect_rc}):\n"
            f"{' '.join(cmd)}\n--- last lines:\n" + "\n".join(log.splitlines()[-60:])
        )
    run = Run(name, res.returncode, log)
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            split = any(k.startswith(("valid_", "test_")) for k in rec)
            (run.valid if split else run.records).append(rec)
    return run


def assert_close(a: Run, b: Run, keys: Sequence[str], atol: float, iterations=None) -> float:
    """Same iterations, every key within atol (relative to 1); returns the worst |diff|."""
    ra, rb = a.by_iteration(), b.by_iteration()
    its = sorted(ra) if iterations is None else list(iterations)
    assert its and all(i in rb for i in its), (a.name, sorted(ra), b.name, sorted(rb))
    worst = 0.0
    for i in its:
        for k in keys:
            x, y = ra[i][k], rb[i][k]
            worst = max(worst, abs(x - y))
            assert abs(x - y) <= atol * max(1.0, abs(x)), (a.name, b.name, i, k, x, y)
    return worst
