"""benchmarks/gpu_check.py: the runner writes one row per declared check, a check that
fails (or raises) is a FAIL row saying why and makes the exit status 1; --dry-run runs
every check's code path on CPU at tiny sizes (Triton interpreter, CPU backend for the
engine runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_check_registry import SECTIONS, Check, Outcome, declared_checks, info, skip, verdict  # noqa: E402


def _report(directory: Path) -> tuple[list[dict], str, dict]:
    report = json.loads((directory / "gpu_check.json").read_text())
    return report["rows"], (directory / "gpu_check.md").read_text(), report["meta"]


def _raises(ctx):
    raise ValueError("first line\nthe reason, on the last line")


def test_failures_are_rows_and_the_exit_status(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fakes = [
        Check("kernels", "passes", lambda ctx: verdict(True, "1", "fine")),
        Check("kernels", "raises", _raises),
        Check("kernels", "returns no Outcome", lambda ctx: None),
        Check("timing", "not asked for", _raises),
        Check("syncs", "skips", lambda ctx: skip("no device here")),
        Check("engine", "measures", lambda ctx: info("3 ms", "")),
        Check("engine", "fails its criterion", lambda ctx: verdict(False, "2", "over the tolerance")),
        Check("kernels", "after the failures", lambda ctx: Outcome("PASS")),
    ]
    monkeypatch.setattr(gpu_check, "declared_checks", lambda dry_run: fakes)
    argv = ["--dry-run", "--report", str(tmp_path), "--sections", "kernels", "syncs", "engine"]
    assert gpu_check.main(argv) == 1
    rows, md, _ = _report(tmp_path)
    assert [(r["section"], r["check"], r["result"]) for r in rows] == [
        ("kernels", "passes", "PASS"),
        ("kernels", "raises", "FAIL"),
        ("kernels", "returns no Outcome", "FAIL"),
        ("kernels", "after the failures", "PASS"),
        ("syncs", "skips", "SKIP"),
        ("engine", "measures", "INFO"),
        ("engine", "fails its criterion", "FAIL"),
    ]
    raised = rows[1]
    assert raised["value"] == "ValueError"
    assert raised["detail"].startswith("the reason, on the last line at test_gpu_check.py:"), raised
    assert rows[2]["value"] == "TypeError" and "not an Outcome" in rows[2]["detail"]
    assert rows[4]["detail"] == "no device here"
    assert "| kernels | raises | FAIL | ValueError | the reason" in md

    monkeypatch.setattr(gpu_check, "declared_checks", lambda dry_run: [fakes[0], fakes[4], fakes[5]])
    assert gpu_check.main(["--dry-run", "--report", str(tmp_path)]) == 0

    monkeypatch.setattr(gpu_check, "declared_checks", lambda dry_run: [fakes[0], fakes[0]])
    with pytest.raises(ValueError, match="declared twice.*'kernels', 'passes'"):
        gpu_check.main(["--dry-run", "--report", str(tmp_path)])
    with pytest.raises(ValueError, match="section 'kernel' is none of"):
        Check("kernel", "typo", _raises)


@pytest.mark.slow
def test_dry_run_reports_every_declared_check_once(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    rows, md, meta = _report(tmp_path)
    declared = [(c.section, c.name) for c in declared_checks(dry_run=True)]
    # every section has checks; the rows are the declared checks, each once, section by section
    assert {s for s, _ in declared} == set(SECTIONS)
    assert Counter(declared) == Counter((r["section"], r["check"]) for r in rows)
    assert [(r["section"], r["check"]) for r in rows] == sorted(declared, key=lambda d: SECTIONS.index(d[0]))
    for section, check in declared:
        assert md.count(f"| {section} | {check} |") == 1, (section, check)
    assert not [r for r in rows if r["result"] == "FAIL"], log
    assert meta["dry_run"] is True
