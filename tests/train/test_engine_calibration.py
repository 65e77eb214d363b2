"""--sed-mask-ratio in megatron-sed-train: tau calibrated in the first forward_step on the
first --sed-calibration-samples held-out SFT samples (counted as samples although training
packs several per sequence), exact under data parallelism, reused on resume,
recalibrated on --finetune; --sed-threshold-update ema
tracks it per global batch and resumes on the same trajectory."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.helpers.engine import RUN, TINY_MODEL, assert_close, synthetic_flags, train

N = 5  # odd: at DP 2 x micro-batch 2 the second step's rows 7, 8 are padding


def _llama_flags(llama, *extra):
    return [
        "--finetune",
        "--load",
        str(llama.converted),
        "--data-path",
        llama.data,
        "--split",
        "90,10,0",
        "--seq-length",
        str(llama.seq_length),
        *RUN,
        "--train-iters",
        "1",
        "--lr-warmup-iters",
        "0",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--loss-type",
        "sed",
        "--sed-top-k",
        "2",
        "--sed-mask-ratio",
        "0.3",
        "--sed-calibration-samples",
        str(N),
        *extra,
    ]


def _logged_tau(log: str) -> float:
    m = re.search(
        r"calibrated SED threshold tau=([0-9.eE+-]+) .*?(?:on|all) (\d+) (?:supervised tokens|positions) of (\d+)",
        log,
    )
    assert m, log[-3000:]
    return float(m.group(1)), int(m.group(2)), int(m.group(3))


def _reference(llama, recipe):
    """tau from transformers' model in float64 on the first N held-out samples (corpus
    order, one sample per sequence): supervised = numpy's 0.3 quantile of the top-2 mass
    of the supervised tokens; authors = their code's sorted(x)[-int(0.7 * len(x))] over
    the top-10 mass at every position of the whole sample (its last token included)."""
    import transformers

    from megatron_sed.data.reader import build_sft_datasets

    _, valid, _ = build_sft_datasets(
        [llama.data], split="90,10,0", seq_length=llama.seq_length, seed=1234, pack=False
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama.hf_dir), dtype=torch.float64)
    masses = []
    with torch.no_grad():
        for i in range(N):
            s = valid[i]
            keep = s["segment_ids"] >= 0
            ids = s["tokens"][keep]
            if recipe == "authors":
                last = s["labels"][keep][-1]
                assert last >= 0  # the sample's final token (its end-of-turn) is a target
                ids = torch.cat([ids, last.view(1)])
            probs = torch.softmax(model(ids[None]).logits[0], -1)
            if recipe == "authors":
                masses.append(probs.topk(10, -1).values.sum(-1))
            else:
                masses.append(probs.topk(2, -1).values.sum(-1)[s["loss_mask"][keep].bool()])
    masses = torch.cat(masses).tolist()
    if recipe == "authors":
        return sorted(masses)[-int(0.7 * len(masses))], len(masses)
    return float(np.quantile(masses, 0.3)), len(masses)


LINEAR_FUSION = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]

# (with --calculate-per-token-loss: the layout tests cover CP without it)
EMA = [
    "--train-iters",
    "2",
    "--sed-threshold-update",
    "ema",
    "--sed-threshold-ema",
    "0.5",
    "--calculate-per-token-loss",
]


def test_calibration_is_exact_and_the_same_at_dp1_and_dp2(tiny_llama, tmp_path):
    """tau equals a transformers float64 reference for the authors' recipe (the default) at
    DP 1 and DP 2 and for the supervised recipe at DP 2 and at CP 2. The DP 1 / DP 2 runs
    also train two iterations with --calculate-per-token-loss, which normalises by the
    supervised tokens of the whole global batch: Megatron's DDP must then not divide the
    gradients by the DP size as well (a double division would halve DP 2's gradient norm).
    The supervised runs track tau with the EMA for two iterations, with per-token loss:
    context parallelism (each CP rank holds part of every sample: THD, per-sample split)
    must give the same calibrated tau, the same EMA step, losses and grad norm as data
    parallelism over whole sequences (packed with the same per-sample padding), also with
    the CP run's output layer fused with the loss."""
    runs = {}
    for name, n, recipe, extra in (
        ("dp1", 1, "authors", ["--train-iters", "2", "--calculate-per-token-loss"]),
        ("dp2", 2, "authors", ["--train-iters", "2", "--calculate-per-token-loss"]),
        # packed + CP 2 pads each sample to a multiple of 4: DP 2 packs the same way
        ("dp2_sup", 2, "supervised", [*EMA, "--sft-pad-granularity", "4"]),
        # ... and with the output layer fused with the loss: calibration forwards, the EMA
        # and the per-token loss through the fused path
        ("cp2_sup", 2, "supervised", [*EMA, "--context-parallel-size", "2", *LINEAR_FUSION]),
    ):
        flags = _llama_flags(tiny_llama, "--sed-calibration", recipe, *extra)
        run = train(tmp_path, name, n, flags)
        tau, tokens, samples = _logged_tau(run.log)
        ref_tau, ref_tokens = _reference(tiny_llama, recipe)
        assert samples == N and tokens == ref_tokens, (name, tokens, ref_tokens)
        assert tau == pytest.approx(ref_tau, rel=1e-5, abs=1e-6), (name, tau, ref_tau)
        assert run.records[0]["sed_threshold"] == pytest.approx(tau, rel=1e-5)
        runs[name] = (tau, run)
    assert runs["dp1"][0] == runs["dp2"][0]
    assert runs["dp2_sup"][0] != runs["dp2"][0]  # the recipes differ (k, positions, statistic)
    assert runs["cp2_sup"][0] == pytest.approx(runs["dp2_sup"][0], rel=1e-6)
    assert "gradient computed in the forward" in runs["cp2_sup"][1].log
    ema_taus = runs["dp2_sup"][1].series("sed_threshold")
    assert len(ema_taus) == 2 and ema_taus[1] != ema_taus[0]  # the EMA moved tau
    worst_cp = assert_close(
        runs["dp2_sup"][1],
        runs["cp2_sup"][1],
        ("sed_threshold", "lm_loss", "ce_loss", "sed_reg", "sed_mask_rate", "grad_norm"),
        atol=1e-5,
    )
    print(f"EMA at CP2 vs DP2: max |diff| {worst_cp:.2e}")
    worst = assert_close(
        runs["dp1"][1], runs["dp2"][1], ("lm_loss", "ce_loss", "sed_reg", "grad_norm"), atol=1e-5
    )
    print(f"per-token loss DP2 vs DP1: max |diff| {worst:.2e}")


def _flags(tmp, *extra):
    return [
        *TINY_MODEL,
        *RUN,
        *synthetic_flags(tmp, problems=60),
        "--split",
        "80,20,0",
        "--loss-type",
        "sed",
        "--sed-mask-ratio",
        "0.3",
        "--sed-calibration-samples",
        "8",
        *extra,
    ]


def test_resume_reuses_tau_and_finetune_recalibrates(tmp_path):
    """(--sed-threshold winning over --sed-mask-ratio is resolve_threshold's rule, tested in
    tests/calibration.)"""
    ck = tmp_path / "ck"
    first = train(
        tmp_path,
        "first",
        1,
        _flags(
            tmp_path, "--train-iters", "4", "--save", str(ck), "--save-interval", "2", "--exit-interval", "2"
        ),
    )
    tau, _, _ = _logged_tau(first.log)
    resumed = train(tmp_path, "resumed", 1, _flags(tmp_path, "--train-iters", "4", "--load", str(ck)))
    assert "calibrated SED threshold" not in resumed.log
    assert f"continues with SED threshold tau={tau:.6g}" in resumed.log
    assert all(r["sed_threshold"] == pytest.approx(tau, rel=1e-5) for r in resumed.records)
    finetuned = train(
        tmp_path, "finetuned", 1, _flags(tmp_path, "--train-iters", "2", "--load", str(ck), "--finetune")
    )
    tau_ft, _, _ = _logged_tau(finetuned.log)
    assert tau_ft != tau  # the trained model's masses differ from the initial model's


def test_ema_tracks_the_batch_quantile_and_resumes_on_the_same_trajectory(tmp_path):
    """6 iterations saving at 3 vs. a new job loading iteration 3 (--ckpt-step): the EMA
    state comes back with the checkpoint's args, so tau and the losses continue exactly."""
    ema = ["--sed-threshold-update", "ema", "--sed-threshold-ema", "0.5", "--train-iters", "6"]
    ema += ["--sed-calibration", "supervised"]  # the EMA tracks the supervised quantile
    ck = tmp_path / "ck"
    straight = train(
        tmp_path, "straight", 2, _flags(tmp_path, *ema, "--save", str(ck), "--save-interval", "3")
    )
    taus = straight.series("sed_threshold")
    assert len(set(round(t, 9) for t in taus)) == len(taus), taus  # moves every iteration
    part2 = train(tmp_path, "part2", 2, _flags(tmp_path, *ema, "--load", str(ck), "--ckpt-step", "3"))
    assert "calibrated SED threshold" not in part2.log
    assert part2.series("sed_threshold") == taus[3:]
    assert part2.series("lm_loss") == straight.series("lm_loss")[3:]
