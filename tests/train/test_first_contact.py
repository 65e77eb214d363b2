"""What a new user meets in the first hour: --help, the warnings every command starts
with, a --seq-length that cuts every response, --load of something that is not a
readable checkpoint, --eval-iters 0, the validation and memory log lines. Each either
works or stops with exit status 2 and a message naming the culprit and the fix."""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sed.flags import ArgumentError
from tests.helpers.engine import RUN, TINY_MODEL, synthetic_flags, train

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend's first contact")

SHOW_WARNINGS = {"PYTHONWARNINGS": "default"}  # the helper hides them by default
FALLBACK_NOTE = "note: no GPU here, and no "


def _with(flags: list[str], name: str, value: str) -> list[str]:
    out = list(flags)
    out[out.index(name) + 1] = value
    return out


def _base(tmp: Path) -> list[str]:
    return [*TINY_MODEL, *RUN, *synthetic_flags(tmp), "--loss-type", "sed", "--sed-threshold", "0.9"]


def test_help_works_and_the_cpu_fallback_warnings_are_one_line():
    """megatron-core 0.19.2's help of --moe-paged-stash-buffer-size-factor-cuda holds a bare
    '%' ("10%"): argparse failed on it. The Transformer Engine / Apex fallback warnings
    of a CPU machine: one line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **SHOW_WARNINGS)
    res = subprocess.run(
        [sys.executable, "-m", "megatron_sed.train", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--moe-paged-stash-buffer-size-factor-cuda" in res.stdout and "10%" in res.stdout
    assert "--sed-mask-ratio" in res.stdout and "--metrics-file" in res.stdout
    assert res.stderr.count(FALLBACK_NOTE) == 1, res.stderr
    for hidden in ("Apex is not installed", "Transformer Engine and Apex are not installed", "supports MoE"):
        assert hidden not in res.stderr, res.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """2 iterations, a checkpoint after each, a validation at the end, warnings shown."""
    tmp = tmp_path_factory.mktemp("first_contact")
    save = tmp / "ckpt"
    flags = [*_base(tmp), "--train-iters", "2", "--save", str(save), "--save-interval", "1"]
    run = train(tmp, "saved", 1, flags, env=SHOW_WARNINGS)
    return tmp, save, run


def test_log_lines_say_what_they_mean(saved):
    """PPL only for losses on the validation line; resident memory on CPU, not zeros."""
    _, _, run = saved
    lines = run.log.splitlines()
    at = next(i for i, line in enumerate(lines) if "validation loss at" in line)
    line = lines[at]
    assert "lm loss PPL:" in line and "ce loss PPL:" in line
    for key in ("sed reg", "sed mask rate", "top1 acc", "sed threshold", "entropy", "target prob"):
        assert f"{key} value:" in line and f"{key} PPL" not in line, line
    assert lines[at - 1] == lines[at + 1] == "-" * (len(line) + 1)  # Megatron's rule, fitted
    memory = [x for x in lines if "memory (MB)" in x]
    assert memory and all("resident:" in x and "allocated: 0.00" not in x for x in memory), memory
    resident = float(memory[0].split("resident:")[1].split("|")[0])
    assert resident > 100  # MB: a Python process with torch and Megatron loaded
    assert run.log.count(FALLBACK_NOTE) == 1 and "Apex is not installed" not in run.log
    # the trainer's logging format, set before megatron.training's import-time basicConfig
    assert not re.search(r"^(INFO|WARNING):megatron\.", run.log, re.M), run.log[:3000]


def _refused(path, flag="--load", step=None) -> str:
    from megatron_sed.train.load_check import check_checkpoint_dir

    with pytest.raises(ArgumentError) as err:
        check_checkpoint_dir(str(path), flag, step)
    return str(err.value)


def test_load_refuses_what_it_cannot_read(saved, tmp_path):
    """A non-empty --load without a readable checkpoint used to train from random weights
    (Megatron's one WARNING) or end in a traceback; missing / empty still start fresh."""
    from megatron_sed.train.load_check import check_checkpoint_dir

    _, save, _ = saved
    for fine in (save, tmp_path / "missing", tmp_path):  # tmp_path: empty
        check_checkpoint_dir(str(fine), "--load", None)
    first = tmp_path / "first_save_killed" / "iter_0000001"  # requeued before any complete save
    first.mkdir(parents=True)
    (first / "__0_0.distcp").write_bytes(b"x")
    check_checkpoint_dir(str(first.parent), "--load", None)

    bridge = tmp_path / "bridge"
    (bridge / "iter_0000010").mkdir(parents=True)
    (bridge / "latest_train_state.pt").write_bytes(b"")
    (bridge / "iter_0000010" / "run_config.yaml").write_text("model: {}\n")
    msg = _refused(bridge)
    assert "Megatron-Bridge" in msg and "latest_train_state.pt" in msg and "hf-to-mcore" in msg

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    assert "Hugging Face model folder" in _refused(hf, "--pretrained-checkpoint")

    parent = tmp_path / "run"
    shutil.copytree(save, parent / "checkpoints")
    (parent / "metrics.jsonl").write_text("")
    assert f"did you mean --load {parent / 'checkpoints'}" in _refused(parent)

    no_tracker = tmp_path / "no_tracker"
    shutil.copytree(save, no_tracker)
    (no_tracker / "latest_checkpointed_iteration.txt").unlink()
    msg = _refused(no_tracker)
    assert "half-copied" in msg and "--ckpt-step 2" in msg

    no_metadata = tmp_path / "no_metadata"
    shutil.copytree(save, no_metadata)
    (no_metadata / "iter_0000002" / ".metadata").unlink()
    msg = _refused(no_metadata)
    assert "iter_0000002" in msg and "not a torch_dist checkpoint" in msg and "--ckpt-step 1" in msg

    torch_format = tmp_path / "torch_format"
    (torch_format / "iter_0000005" / "mp_rank_00").mkdir(parents=True)
    (torch_format / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    (torch_format / "latest_checkpointed_iteration.txt").write_text("5")
    msg = _refused(torch_format)
    assert "torch-format checkpoint" in msg and "--ckpt-convert-format torch_dist" in msg

    assert "does not exist" in _refused(save, step=7)
    assert f"pass --load {save} --ckpt-step 2" in _refused(save / "iter_0000002")


@pytest.fixture(scope="module")
def truncated(saved, tmp_path_factory):
    _, save, _ = saved
    bad = tmp_path_factory.mktemp("truncated") / "ckpt"
    shutil.copytree(save, bad)
    shard = next((bad / "iter_0000002").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return bad, shard


def test_truncated_shard_names_file_iteration_and_the_previous_checkpoint(saved, truncated):
    """It ended in a bare EOFError traceback inside Megatron's load."""
    tmp, _, _ = saved
    bad, shard = truncated
    msg = _refused(bad)
    assert str(shard) in msg and "iteration 2" in msg and "--ckpt-step 1" in msg
    flags = [*_base(tmp), "--train-iters", "3", "--load", str(bad)]
    run = train(tmp, "load_truncated", 1, flags, expect_rc=2)
    assert "megatron-sed-train: error: the checkpoint of iteration 2" in run.log
    assert "Traceback" not in run.log and "EOFError" not in run.log
    assert not run.records  # refused before training


def test_no_supervised_token_is_refused_and_counted_exactly(saved, monkeypatch):
    """--seq-length shorter than every prompt trained on nothing (lm loss NaN, exit 0)."""
    import megatron_sed.data.reader as reader
    from megatron_sed.train.data import check_supervised

    tmp, _, _ = saved
    prefix = str(next((tmp / "synthetic").glob("*.json"))).removesuffix(".json")
    data = reader.SFTIndexedData(prefix)
    docs = np.arange(len(data))
    for seq in (60, 64, 100, 128):
        ds = reader.SFTDataset(data, docs, seq, 1234)
        brute = sum(int(data.get(d)[1][1 : p + 1].sum()) for d, p in zip(ds.doc_ids, ds.pairs))
        monkeypatch.setattr(reader, "_CHUNK_BYTES", 300)  # many chunks: their seams count too
        assert reader.count_supervised(data, ds.doc_ids, ds.pairs) == brute
        monkeypatch.undo()
        assert ds.supervised_tokens() == brute
        if seq == 60:
            assert brute == 0
            with pytest.raises(ArgumentError) as err:
                check_supervised(ds, argparse.Namespace(seq_length=seq))
            assert "--seq-length 60" in str(err.value) and "prompts" in str(err.value)
        else:
            assert brute > 0
            check_supervised(ds, argparse.Namespace(seq_length=seq))
    flags = _with(_with(_base(tmp), "--seq-length", "60"), "--eval-iters", "0") + ["--train-iters", "2"]
    run = train(tmp, "seq60", 1, flags, expect_rc=2)
    assert "holds no supervised token within --seq-length 60" in run.log and "Traceback" not in run.log


def test_eval_iters_0_and_a_batch_without_supervised_token(saved):
    """--eval-iters 0 crashed (AssertionError: no sample to consume: 0). At --seq-length
    64 the set keeps a few supervised tokens, and iteration 2's global batch has none: it
    logged NaN for every report key; now 0 (and the loss and grad are 0 as before)."""
    tmp, _, _ = saved
    flags = _with(_with(_base(tmp), "--seq-length", "64"), "--eval-iters", "0") + ["--train-iters", "3"]
    run = train(tmp, "eval_off", 1, flags)
    assert [r["iteration"] for r in run.records] == [1, 2, 3] and not run.valid
    logged = [x for x in run.log.splitlines() if "lm loss:" in x]
    assert len(logged) == 3 and not any(re.search(r":\s*nan", x, re.IGNORECASE) for x in logged), logged
    for rec in run.records:
        assert all(math.isfinite(v) for v in rec.values() if isinstance(v, float)), rec
    empty = [r for r in run.records if r["grad_norm"] == 0.0]
    assert empty and all(r["lm_loss"] == 0.0 and r["sed_mask_rate"] == 0.0 for r in empty)
    assert any(r["lm_loss"] > 1.0 for r in run.records)  # the other batches: a real loss
