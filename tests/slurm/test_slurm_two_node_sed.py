"""examples/slurm/sed_sft_cpu.sbatch across two real SLURM nodes (conftest.py's `two_nodes`:
two network namespaces joined by a veth pair, see two_node_harness.py), one gloo rank per
node, TP 2 across the nodes (the SED loss is vocab-parallel, so every forward and backward
step all-reduces across the link), --loss-type sed, checkpoints every SAVE_INTERVAL:

- reference (module fixture): the job uninterrupted; it completes;
- A: `scancel --signal=USR1 --batch` mid-run -> both ranks save at the end of the current
  iteration -> the job requeues itself -> resumes there on both nodes -> its per-iteration
  metrics equal the reference's exactly (losses, SED statistics, grad norms, lr);
- B: one rank SIGKILLed mid-step -> the job is FAILED within seconds and its output names
  the lost task and node (srun) and the lost peer's address (gloo on the surviving rank);
- C: node 2 dies during a checkpoint save (every process in its namespace SIGKILLed while
  iter_<2*SAVE_INTERVAL>/ exists and the tracker still names SAVE_INTERVAL) -> slurmctld
  declares it DOWN and requeues the job -> the node comes back -> the next run reports the
  partial directory, resumes from the previous complete checkpoint and ends with the
  reference's metrics exactly;
- D: the reference's 2-rank (TP 2) checkpoint resumed by a 1-rank job (TP 1): Megatron's
  torch_dist checkpoint reshards; the run resumes at that iteration, says it ignores the
  RNG state, follows the reference's schedule exactly, its losses within LOSS_TOL and its
  final validation loss within VALID_TOL.

Dropout stays on (hidden and attention), so the resumes are exact only if Megatron's RNG
tracker state comes back on both ranks: on CPU the attention dropout draws from it too
(megatron_sed/model/attention.py), not from torch's CPU generator.

Wall time on this 2-core machine: 158 s for the module when it is quiet, 235 s when other
work loads it (times printed with -s; docs/slurm.md lists them). Test E (a hung rank,
opt-in: SED_SLURM_HANG_TEST=1) adds ~90 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "sed_sft_cpu.sbatch"
TRAIN_ITERS = 12
SAVE_INTERVAL = 4
EXACT = (
    "lm_loss",
    "ce_loss",
    "sed_reg",
    "sed_mask_rate",
    "entropy",
    "target_prob",
    "top1_acc",
    "grad_norm",
    "lr",
    "consumed_samples",
)
# Test D: TP 1 after TP 2 draws other hidden-dropout masks (Megatron ignores the RNG state
# when TP changes, and TP 1 draws them differently anyway), so training losses differ by
# the dropout noise (measured: at most 4.8e-3); the final validation loss has no dropout
# (measured: 6.4e-5). A resume that lost the weights is off by far more (a fresh model's
# loss is 0.8 higher); the exact lr and consumed-samples checks cover the schedule and data.
LOSS_TOL = 2e-2
VALID_TOL = 1e-3
TRACKER = "latest_checkpointed_iteration.txt"


def _env(run_dir: Path, **kw) -> dict:
    env = {
        "PYTHON": sys.executable,
        "RUN_DIR": str(run_dir),
        "TRAIN_ITERS": str(TRAIN_ITERS),
        "SAVE_INTERVAL": str(SAVE_INTERVAL),
        "PYTHONPATH": str(REPO),
        "TRITON_INTERPRET": "1",
        "SED_EXAMPLES_DIR": str(SBATCH.parent),
        "TP_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _submit(c, tmp: Path, env: dict, nodes: int = 2) -> tuple[int, Path]:
    out = tmp / "job.out"
    job = c.sbatch(
        [
            "--nodes",
            nodes,
            "--ntasks",
            nodes,
            "--ntasks-per-node",
            1,
            "--output",
            out,
            "--chdir",
            tmp,
            SBATCH,
        ],
        env=env,
    )
    return job, out


def _text(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def _train_rows(metrics: Path) -> list[dict]:
    rows = []
    for line in _text(metrics).splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "lm_loss" in rec:
            rows.append(rec)
    return rows


def _last(rows: list[dict]) -> dict[int, dict]:
    """Iteration -> its last logged row (a resumed run re-logs the iterations it redoes)."""
    return {r["iteration"]: r for r in rows}


def _valid(metrics: Path) -> dict:
    recs = [
        json.loads(x) for x in _text(metrics).splitlines() if x.strip().startswith("{") and '"valid_' in x
    ]
    return recs[-1] if recs else {}


def _wait_for(cond, timeout: float, what: str, c=None, job=None, out=None, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while not cond():
        if c is not None and job is not None:
            state = c.job_state(job).get("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
                f"job {job} is {state} while waiting for {what}:\n{_text(out)[-6000:]}\n{c.logs()}"
            )
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{_text(out)[-6000:]}"
        time.sleep(poll)


def _assert_same_as_reference(rows: dict[int, dict], ref: dict[int, dict], iterations):
    for it in iterations:
        for key in EXACT:
            assert rows[it][key] == ref[it][key], (it, key, rows[it][key], ref[it][key])


def _idle(c, timeout: float = 60):
    c._wait(c.node_idle, timeout, "both nodes idle")


@pytest.fixture(scope="module")
def reference(two_nodes, tmp_path_factory):
    """The job at --nodes 2, TP 2, not interrupted: the losses a resumed run must reproduce.
    The same script, flags and cluster as the runs it is compared with (a local torchrun
    would compute the same numbers, TP 2 over gloo either way, but would not prove that the
    two-node job completes)."""
    c = two_nodes
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    t = time.monotonic()
    job, out = _submit(c, tmp, _env(run_dir))
    info = c.wait_job(job, timeout=300)
    log = _text(out)
    print(f"\nreference job {job}: {info.get('JobState')} in {time.monotonic() - t:.1f} s")
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}\n{c.logs()}"
    assert "on sednode[1-2]" in log and "restart 0 " in log
    assert "[ t 1/2," in log  # Megatron's save line: TP rank 1 of 2
    rows = _train_rows(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, TRAIN_ITERS + 1)), rows
    last = rows[-1]
    assert "sed mask rate" in log and 0.0 < last["sed_mask_rate"] <= 1.0
    assert all(r["lm_loss"] == r["lm_loss"] for r in rows)  # no NaN
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"]  # it learns
    ckpt = run_dir / "checkpoints"
    assert (ckpt / TRACKER).read_text().strip() == str(TRAIN_ITERS)
    # one TP shard per node in every checkpoint
    assert sorted(p.name for p in (ckpt / f"iter_{TRAIN_ITERS:07d}").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    return {"rows": _last(rows), "valid": _valid(run_dir / "metrics.jsonl"), "ckpt": ckpt}


def test_A_preempted_requeued_resumes_with_the_reference_losses(two_nodes, reference, tmp_path):
    c = two_nodes
    run_dir = tmp_path / "run"
    t = time.monotonic()
    job, out = _submit(c, tmp_path, _env(run_dir))
    tracker = run_dir / "checkpoints" / TRACKER
    _wait_for(tracker.exists, 240, "first checkpoint", c, job, out)
    # Preempt: what --signal=B:USR1@60 sends before the time limit.
    c.run(["scancel", "--signal=USR1", "--batch", str(job)])
    t_sig = time.monotonic()
    c.wait_restarted(job, timeout=120)
    t_req = time.monotonic()
    info = c.wait_job(job, timeout=300)
    log = _text(out)
    print(
        f"\njob {job}: first checkpoint after {t_sig - t:.1f} s, requeued and running again "
        f"{t_req - t_sig:.1f} s after USR1, {info.get('JobState')} after {time.monotonic() - t:.1f} s in all"
    )
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}\n{c.logs()}"

    assert "caught USR1: ranks save a checkpoint and stop" in log
    assert "restart 1 on sednode[1-2]" in log  # the requeued run has both nodes again
    starts = [int(m) for m in re.findall(r"successfully loaded checkpoint from .* at iteration (\d+)", log)]
    assert len(starts) == 1 and SAVE_INTERVAL <= starts[0] < TRAIN_ITERS, log[-6000:]
    k = starts[0]
    assert f"last complete checkpoint: iteration {k}: --load resumes there" in log
    print(f"preempted after iteration {k}, resumed there")

    rows = _train_rows(run_dir / "metrics.jsonl")
    # The first run stopped after iteration k, having saved it; the requeued run did k+1.. .
    assert [r["iteration"] for r in rows] == list(range(1, TRAIN_ITERS + 1)), rows
    # Exact: rank 1 (node 2) holds half of every TP-sharded tensor and its own RNG state, so
    # a rank that did not resume exactly would change every number after iteration k.
    _assert_same_as_reference(_last(rows), reference["rows"], range(1, TRAIN_ITERS + 1))
    valid = _valid(run_dir / "metrics.jsonl")
    assert valid and valid["valid_lm_loss"] == reference["valid"]["valid_lm_loss"]
    assert tracker.read_text().strip() == str(TRAIN_ITERS)


def test_B_killed_rank_fails_the_job_fast_naming_it(two_nodes, tmp_path):
    c = two_nodes
    _idle(c)
    run_dir = tmp_path / "run"
    t = time.monotonic()
    # Long enough not to finish, no checkpoint on the way.
    job, out = _submit(c, tmp_path, _env(run_dir, TRAIN_ITERS=10000, SAVE_INTERVAL=10000))
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: len(_train_rows(metrics)) >= 3, 240, "third iteration", c, job, out)
    pids = c.rank_pids(1)
    assert len(pids) == 1, f"rank processes on {c.nodes[1]}: {pids}"
    done = len(_train_rows(metrics))
    # The loop is almost all train steps (~0.25 s each), so this lands inside one.
    os.kill(pids[0], signal.SIGKILL)
    t_kill = time.monotonic()
    info = c.wait_job(job, timeout=120, poll=0.2)
    dt = time.monotonic() - t_kill
    log = _text(out)
    print(
        f"\njob {job}: rank 1 on {c.nodes[1]} SIGKILLed {t_kill - t:.1f} s after submission "
        f"(after iteration {done}); job {info.get('JobState')} {dt:.1f} s later"
    )
    assert info["JobState"] == "FAILED", f"{info}\n{log[-6000:]}"
    # Bounded: the survivor's collective fails as soon as the peer's socket is reset, srun
    # (--kill-on-bad-exit) ends the step; KillWait (2 s here, 30 s by default) for the rest.
    assert dt < 30, f"{dt:.1f} s from the kill to FAILED\n{log[-6000:]}"
    assert re.search(rf"srun: error: {c.nodes[1]}: task 1: Killed", log), log[-6000:]
    peer = [x for x in log.splitlines() if c.addrs[1] in x and "by peer" in x]
    assert peer, f"rank 0's gloo error does not name {c.addrs[1]}:\n{log[-6000:]}"
    print(f"srun: {re.search(r'srun: error: .*task 1: Killed', log).group(0)}\nrank 0: {peer[0][-220:]}")
    assert "training failed: srun exited with" in log
    _idle(c)  # the cluster is usable for the next job


def test_C_node_killed_during_save_resumes_from_previous_checkpoint(two_nodes, reference, tmp_path):
    c = two_nodes
    _idle(c)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    target = ckpt / f"iter_{2 * SAVE_INTERVAL:07d}"
    t = time.monotonic()
    job, out = _submit(c, tmp_path, _env(run_dir))
    _wait_for((ckpt / TRACKER).exists, 240, "first checkpoint", c, job, out)
    pids = c.rank_pids(1)
    assert len(pids) == 1, f"rank processes on {c.nodes[1]}: {pids}"
    # Rank 0 creates the directory as the save of iteration 8 begins; freeze node 2's rank
    # right then (before it can take part in the save's collectives, which the tracker write
    # follows), look, and let node 2 die.
    _wait_for(target.exists, 120, target.name, poll=0.002)
    os.kill(pids[0], signal.SIGSTOP)
    partial = sorted(p.name for p in target.iterdir())
    assert (ckpt / TRACKER).read_text().strip() == str(SAVE_INTERVAL)
    killed = c.kill_node(1)
    t_kill = time.monotonic()
    print(
        f"\njob {job}: node 2 killed ({len(killed)} processes) {t_kill - t:.1f} s after submission, "
        f"during the save of iteration {2 * SAVE_INTERVAL}: {target.name}/ held {partial or 'nothing yet'}, "
        f"tracker {SAVE_INTERVAL}"
    )

    # slurmctld finds node 2 silent, sets it DOWN and requeues the job (--requeue).
    _wait_for(lambda: c.job_state(job).get("Restarts", "0") != "0", 90, "requeue after the node failure")
    t_req = time.monotonic()
    assert (ckpt / TRACKER).read_text().strip() == str(SAVE_INTERVAL)
    c.restart_slurmd(1)  # node 2 is back
    t_back = time.monotonic()
    c.wait_restarted(job, timeout=120)
    info = c.wait_job(job, timeout=300)
    log = _text(out)
    print(
        f"requeued {t_req - t_kill:.1f} s after the kill, node 2 back {t_back - t_req:.1f} s later, "
        f"job {info.get('JobState')} {time.monotonic() - t_back:.1f} s after that ({time.monotonic() - t:.1f} s in all)"
    )
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}\n{c.logs()}"
    assert re.search(rf"Node failure on {c.nodes[1]}|DUE TO NODE FAILURE", log), log[-6000:]
    first, second = log.split("restart 1 on ", 1)
    assert f"checkpoint {target.name} is incomplete" not in first
    report = [x for x in second.splitlines() if f"checkpoint {target.name} is incomplete" in x]
    assert report, second[:3000]
    print(report[0])
    assert f"last complete checkpoint: iteration {SAVE_INTERVAL}: --load resumes there" in second
    starts = re.findall(r"successfully loaded checkpoint from .* at iteration (\d+)", second)
    assert starts == [str(SAVE_INTERVAL)], second[-6000:]

    rows = _train_rows(run_dir / "metrics.jsonl")
    its = [r["iteration"] for r in rows]
    # first run: 1..8 (8 is logged before its save); the requeued one redoes 5..12
    assert its == list(range(1, 2 * SAVE_INTERVAL + 1)) + list(range(SAVE_INTERVAL + 1, TRAIN_ITERS + 1)), its
    _assert_same_as_reference(_last(rows), reference["rows"], range(1, TRAIN_ITERS + 1))
    assert (ckpt / TRACKER).read_text().strip() == str(TRAIN_ITERS)
    assert (target / "metadata.json").exists()  # the requeued run saved iteration 8 over the partial one


def test_D_two_rank_checkpoint_resumed_by_one_rank(two_nodes, reference, tmp_path):
    c = two_nodes
    _idle(c)
    k = 2 * SAVE_INTERVAL
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(reference["ckpt"] / f"iter_{k:07d}", ckpt / f"iter_{k:07d}")
    (ckpt / TRACKER).write_text(str(k))
    t = time.monotonic()
    job, out = _submit(c, tmp_path, _env(run_dir, TP_SIZE=1), nodes=1)
    info = c.wait_job(job, timeout=300)
    log = _text(out)
    print(
        f"\njob {job} (1 node, 1 rank, TP 1) from the 2-rank TP 2 checkpoint of iteration {k}: "
        f"{info.get('JobState')} in {time.monotonic() - t:.1f} s"
    )
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}\n{c.logs()}"
    assert re.findall(r"successfully loaded checkpoint from .* at iteration (\d+)", log) == [str(k)]
    assert (
        "(TP, PP) mismatch after resume ((1, 1) vs (2, 1) from checkpoint): RNG state will be ignored" in log
    )
    rows = _train_rows(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(k + 1, TRAIN_ITERS + 1)), rows
    ref = reference["rows"]
    worst = 0.0
    for r in rows:
        it = r["iteration"]
        # optimizer-scheduler state and data position come back exactly
        assert r["lr"] == ref[it]["lr"] and r["consumed_samples"] == ref[it]["consumed_samples"], (r, ref[it])
        diff = abs(r["lm_loss"] - ref[it]["lm_loss"])
        worst = max(worst, diff)
        print(
            f"iteration {it}: lm loss {r['lm_loss']:.6f} (reference {ref[it]['lm_loss']:.6f}, |diff| {diff:.2e})"
        )
        assert diff < LOSS_TOL, (it, r["lm_loss"], ref[it]["lm_loss"])
    valid = _valid(run_dir / "metrics.jsonl")
    vdiff = abs(valid["valid_lm_loss"] - reference["valid"]["valid_lm_loss"])
    print(
        f"max |lm loss diff| {worst:.2e}; final validation loss {valid['valid_lm_loss']:.6f} "
        f"(reference {reference['valid']['valid_lm_loss']:.6f}, |diff| {vdiff:.2e})"
    )
    assert vdiff < VALID_TOL
    # saved again at the new layout: one shard
    assert sorted(p.name for p in (ckpt / f"iter_{TRAIN_ITERS:07d}").glob("*.distcp")) == ["__0_0.distcp"]


@pytest.mark.skipif(
    os.environ.get("SED_SLURM_HANG_TEST") != "1",
    reason="a rank that hangs costs the 1-minute collective timeout: SED_SLURM_HANG_TEST=1 runs it",
)
def test_E_hung_rank_fails_the_job_after_the_collective_timeout(two_nodes, tmp_path):
    """A rank that stops without dying (SIGSTOP: a wedged node or device) is what
    --distributed-timeout-minutes (DIST_TIMEOUT_MIN) is for: the surviving rank's collective
    times out, it exits, srun ends the step. Megatron takes whole minutes; 1 here."""
    c = two_nodes
    _idle(c)
    run_dir = tmp_path / "run"
    t = time.monotonic()
    job, out = _submit(c, tmp_path, _env(run_dir, TRAIN_ITERS=10000, SAVE_INTERVAL=10000, DIST_TIMEOUT_MIN=1))
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: len(_train_rows(metrics)) >= 3, 240, "third iteration", c, job, out)
    pids = c.rank_pids(1)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGSTOP)
    t_stop = time.monotonic()
    info = c.wait_job(job, timeout=240, poll=0.5)
    dt = time.monotonic() - t_stop
    log = _text(out)
    timeout_lines = [x for x in log.splitlines() if "imed out" in x or "imeout" in x and "rank0" in x]
    print(
        f"\njob {job}: rank 1 on {c.nodes[1]} stopped {t_stop - t:.1f} s after submission; "
        f"job {info.get('JobState')} {dt:.1f} s later\n" + "\n".join(x[-250:] for x in timeout_lines[:3])
    )
    assert info["JobState"] == "FAILED", f"{info}\n{log[-6000:]}"
    assert 55 < dt < 120, f"{dt:.1f} s\n{log[-6000:]}"
    assert timeout_lines, log[-6000:]
    _idle(c)
