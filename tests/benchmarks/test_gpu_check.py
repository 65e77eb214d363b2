"""benchmarks/gpu_check.py --dry-run: every code path of the GPU check on CPU at tiny
sizes (Triton interpreter, CPU backend for the engine runs); the report has every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_writes_every_row(tmp_path):
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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    got = {(r["section"], r["check"]): r for r in report["rows"]}
    md = (tmp_path / "gpu_check.md").read_text()
    expected = gpu_check.expected_rows(gpu_check.parse_args(["--dry-run"]))
    assert len(expected) == len(report["rows"]), (sorted(got), expected)
    for section, check in expected:
        assert (section, check) in got, (section, check, sorted(got))
        assert f"| {section} | {check} |" in md
    assert not [r for r in report["rows"] if r["result"] == "FAIL"], log
    assert report["meta"]["dry_run"] is True
