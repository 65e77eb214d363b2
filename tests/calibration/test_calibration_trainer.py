"""--sed-mask-ratio in the trainer: tau is calibrated before the first iteration on the
held-out split (fraction selected ~ ratio), logged, stored in the checkpoint and reused on
resume; --sed-threshold overrides it; --sed-threshold-update ema moves it per batch."""

import json
import os

import pytest

from dist_utils import run_distributed


def _argv(tmp, name, *extra):
    return [
        "--loss-type", "sed", "--train-iters", "2", "--log-interval", "1",
        "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3", "--split", "70,30,0",
        "--synthetic-num-problems", "30", "--synthetic-cache-dir", os.path.join(tmp, "syn"),
        "--sed-calibration-samples", "6", "--metrics-file", os.path.join(tmp, f"{name}.jsonl"), *extra,
    ]


def _worker(rank, world, tmp):
    from megatron_sed.train.trainer import main

    ck = os.path.join(tmp, "ck")
    assert main(_argv(tmp, "cal", "--sed-mask-ratio", "0.3", "--save", ck)) == 0
    assert main(_argv(tmp, "resume", "--sed-mask-ratio", "0.3", "--load", ck, "--train-iters", "3")) == 0
    assert main(_argv(tmp, "override", "--sed-mask-ratio", "0.3", "--sed-threshold", "0.5")) == 0
    assert main(_argv(tmp, "ema", "--sed-mask-ratio", "0.3", "--sed-threshold-update", "ema",
                      "--sed-threshold-ema", "0.5", "--train-iters", "3")) == 0


def _taus(tmp, name):
    with open(os.path.join(tmp, f"{name}.jsonl")) as f:
        return [r["sed_threshold"] for r in map(json.loads, f) if "sed_threshold" in r]


def test_trainer_calibrates_stores_and_reuses_tau(tmp_path, capfd):
    tmp = str(tmp_path)
    run_distributed(_worker, 1, tmp)
    out = capfd.readouterr().out
    assert out.count("calibrated SED threshold") == 2, out  # "cal" and "ema"; not resume/override
    with open(os.path.join(tmp, "ck", "iter_0000002", "megatron_sed.json")) as f:
        sed = json.load(f)["sed"]
    cal = sed["calibration"]
    assert cal["num_samples"] == 6 and cal["top_k"] == 2 and cal["mask"] == "topk_mass"
    assert abs(cal["fraction_below"] - 0.3) <= 1.0 / cal["num_tokens"] + 1e-9
    assert sed["threshold"] == cal["tau"] and 0.0 < cal["tau"] < 1.0
    assert _taus(tmp, "cal") == [cal["tau"]] * 2
    assert _taus(tmp, "resume") == [cal["tau"]]  # iteration 3 only, same tau, no recalibration
    assert _taus(tmp, "override") == [0.5, 0.5]
    ema = _taus(tmp, "ema")
    assert len(ema) == 3 and len(set(ema)) == 3, ema  # moves every batch
