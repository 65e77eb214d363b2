"""The sbatch examples: valid bash, and DRY_RUN=1 prints the launch command the knobs
describe (no SLURM needed; `scontrol` is used for the node list when installed)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "slurm"
GPU = ["sed_sft_llama3_3b.sbatch", "sed_sft_qwen25_math_7b.sbatch"]


def _dry(script, *args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(DRY_RUN="1", **env)
    res = subprocess.run(
        ["bash", str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=EXAMPLES.parents[1],
    )
    return res


def _cmd(res):
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout.strip().splitlines()[-1])


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize(
    "script",
    sorted(p.name for p in EXAMPLES.glob("*.sbatch"))
    + ["sed_sft_gpu_launch.sh", "lib/rendezvous.sh", "lib/rank.sh", "lib/requeue.sh"],
)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(EXAMPLES / script)]).returncode == 0


@pytest.mark.parametrize("script,tp", [(GPU[0], 1), (GPU[1], 2)])
def test_gpu_dry_run_our_trainer(script, tp, tmp_path):
    nodes = {"SLURM_NNODES": "4", "SLURM_JOB_ID": "4242"}
    if shutil.which("scontrol"):  # expands the node list; needs only a minimal config
        conf = tmp_path / "slurm.conf"
        # No controller runs: a port nothing listens on and a 1 s timeout make the script's
        # `scontrol show node` fail at once (else it retries for ~9 s per launch).
        conf.write_text("ClusterName=dry\nSlurmctldHost=localhost\nSlurmctldPort=1\nMessageTimeout=1\n")
        nodes.update(SLURM_JOB_NODELIST="gpu[007-010]", SLURM_CONF=str(conf))
    res = _dry(script, "--lr", "3e-5", RUN_DIR=str(tmp_path), INIT_CKPT="/ckpt/base", **nodes)
    cmd = _cmd(res)
    # one task per GPU, each a rank started by lib/rank.sh (rendezvous + env:// from SLURM)
    assert cmd[:2] == ["srun", "--ntasks-per-node=8"] and cmd[3:5] == [
        "bash",
        str(EXAMPLES / "lib" / "rank.sh"),
    ]
    host = "gpu007" if "SLURM_JOB_NODELIST" in nodes else "localhost"
    assert f"rendezvous {host}:{20000 + 4242}" in res.stdout
    assert cmd[cmd.index("-m") + 1] == "megatron_sed.train"
    assert _flag(cmd, "--tensor-model-parallel-size") == str(tp)
    assert ("--sequence-parallel" in cmd) == (tp > 1)
    dp = 32 // tp
    assert f"DP={dp}," in res.stdout and _flag(cmd, "--global-batch-size") == str(dp * 8)
    assert "--bf16" in cmd and "--fp8-format" not in cmd
    assert _flag(cmd, "--loss-type") == "sed" and _flag(cmd, "--sed-mask-ratio") == "0.3"
    # Megatron's resume logic: --load RUN's checkpoints, else fine-tune the base model
    assert _flag(cmd, "--load") == str(tmp_path / "checkpoints")
    assert _flag(cmd, "--pretrained-checkpoint") == "/ckpt/base"
    assert _flag(cmd, "--save") == str(tmp_path / "checkpoints")
    assert "--exit-signal-handler" in cmd and _flag(cmd, "--exit-signal") == "SIGUSR1"
    assert _flag(cmd, "--distributed-timeout-minutes") == "5"  # a hung rank fails the job
    assert cmd[-2:] == ["--lr", "3e-5"]  # "$@" last, so it wins over the defaults

    cmd = _cmd(
        _dry(script, RUN_DIR=str(tmp_path), PRECISION="fp8", SED_THRESHOLD="0.9", TRAIN_ITERS="10", **nodes)
    )
    assert _flag(cmd, "--fp8-format") == "hybrid" and _flag(cmd, "--sed-threshold") == "0.9"
    assert "--sed-mask-ratio" not in cmd and _flag(cmd, "--train-iters") == "10"
    assert "--pretrained-checkpoint" not in cmd
    cmd = _cmd(_dry(script, RUN_DIR=str(tmp_path), DIST_TIMEOUT_MIN="20", **nodes))
    assert _flag(cmd, "--distributed-timeout-minutes") == "20"


@pytest.mark.parametrize("script", GPU)
def test_gpu_dry_run_megatron_lm(script, tmp_path):
    env = dict(LAUNCHER="megatron-lm", MEGATRON_LM_DIR="/opt/Megatron-LM", RUN_DIR=str(tmp_path))
    # No SED_THRESHOLD: tau is calibrated (--sed-mask-ratio), except with PP > 1.
    cmd = _cmd(_dry(script, PP="1", SED_MASK_RATIO="0.25", **env))
    assert _flag(cmd, "--sed-mask-ratio") == "0.25" and "--sed-threshold" not in cmd
    res = _dry(script, PP="2", **env)
    assert res.returncode == 1 and "SED_THRESHOLD" in res.stderr and "PP=2" in res.stderr
    cmd = _cmd(_dry(script, SED_THRESHOLD="0.9", INIT_CKPT="/ckpt/base", **env))
    assert "/opt/Megatron-LM/pretrain_gpt.py" in cmd and "--exit-signal-handler" in cmd
    assert _flag(cmd, "--load") == str(tmp_path / "checkpoints")
    assert _flag(cmd, "--pretrained-checkpoint") == "/ckpt/base"
    assert _flag(cmd, "--loss-type") == "sed" and "--sed-mask-ratio" not in cmd


def test_gpu_dry_run_rejects_bad_layouts():
    res = _dry(GPU[1], TP="3", SLURM_NNODES="1")
    assert res.returncode == 1 and "not divisible by TP=3" in res.stderr
    res = _dry(GPU[0], GLOBAL_BATCH="12")
    assert res.returncode == 1 and "GLOBAL_BATCH=12" in res.stderr
    res = _dry(GPU[0], PRECISION="fp4")
    assert res.returncode == 1 and "PRECISION" in res.stderr


def test_cpu_dry_run(tmp_path):
    cmd = _cmd(_dry("sed_sft_cpu.sbatch", "--seed", "7", RUN_DIR=str(tmp_path), TP_SIZE="2"))
    assert cmd[0] == "srun" and "megatron_sed.train" in cmd and str(EXAMPLES / "lib" / "rank.sh") in cmd
    assert _flag(cmd, "--loss-type") == "sed" and _flag(cmd, "--exit-signal") == "SIGUSR1"
    assert _flag(cmd, "--tensor-model-parallel-size") == "2"
    assert _flag(cmd, "--load") == _flag(cmd, "--save") == str(tmp_path / "checkpoints")
    assert _flag(cmd, "--distributed-timeout-minutes") == "2"
    assert cmd[-2:] == ["--seed", "7"]


def _report(ckpt):
    lib = EXAMPLES / "lib" / "requeue.sh"
    res = subprocess.run(
        ["bash", "-c", f'source "{lib}"; sed_checkpoint_report "$0"', str(ckpt)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout, res.stderr


def test_checkpoint_report(tmp_path):
    """lib/requeue.sh's sed_checkpoint_report (run before every launch): what --load finds."""
    ckpt = tmp_path / "checkpoints"
    out, _ = _report(ckpt)  # no directory yet: silent
    assert out == ""
    ckpt.mkdir()
    out, _ = _report(ckpt)
    assert "no complete checkpoint" in out and "starts at iteration 0" in out
    for it, files in (
        (4, ["__0_0.distcp", "__1_0.distcp", ".metadata", "metadata.json"]),
        (8, ["__1_0.distcp"]),
    ):
        d = ckpt / f"iter_{it:07d}"
        d.mkdir()
        for f in files:
            (d / f).write_text("x")
    # a save of iteration 8 that never finished: Megatron did not write the tracker
    out, _ = _report(ckpt)
    assert "iter_0000004 is incomplete" in out and "iter_0000008 is incomplete" in out
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4\n")
    out, err = _report(ckpt)
    lines = out.splitlines()
    assert len(lines) == 2 and err == ""
    assert (
        "checkpoint iter_0000008 is incomplete (a save that did not finish, 1 file(s); the tracker names 4)"
        in lines[0]
    )
    assert "--load ignores it" in lines[0]
    assert lines[1].endswith("last complete checkpoint: iteration 4: --load resumes there")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("8")
    (ckpt / "iter_0000008" / "metadata.json").write_text("x")
    out, _ = _report(ckpt)
    assert out.splitlines()[-1].endswith("iteration 8: --load resumes there") and "incomplete" not in out
    (ckpt / "iter_0000008" / "metadata.json").unlink()
    _, err = _report(ckpt)
    assert "no metadata.json" in err
    (ckpt / "latest_checkpointed_iteration.txt").write_text("12")
    _, err = _report(ckpt)
    assert "iter_0000012 does not exist" in err


def test_megatron_lm_example_syntax():
    for script in (EXAMPLES.parents[0] / "megatron_lm").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
