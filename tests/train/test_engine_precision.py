"""Mixed precision and loss normalisation through Megatron's loop: --fp16 (dynamic loss
scaling) trains like --bf16, and --calculate-per-token-loss gives the same losses and
gradients at DP 1 and DP 2."""

from __future__ import annotations

from tests.helpers.engine import RUN, TINY_MODEL, assert_close, synthetic_flags, train


def _flags(tmp, *extra):
    return [*TINY_MODEL, *RUN, *synthetic_flags(tmp), "--loss-type", "sed", "--sed-threshold", "0.9", *extra]


def test_fp16_trains_like_bf16(tmp_path):
    """Megatron's fp16 loss scaling: the scale starts at 2^32 and halves on overflow (those
    iterations are skipped, as in Megatron), then the run learns as the bf16 run does. If
    the scale never reached the gradients (unscaled by 2^-32) or an overflow crashed the
    run, the fp16 loss would not move."""
    common = ["--train-iters", "30", "--lr", "3e-3", "--log-interval", "5"]
    bf16 = train(tmp_path, "bf16", 1, _flags(tmp_path, *common, "--bf16"))
    fp16 = train(tmp_path, "fp16", 1, _flags(tmp_path, *common, "--fp16", "--initial-loss-scale", "65536"))
    first, last = bf16.records[0]["lm_loss"], bf16.records[-1]["lm_loss"]
    assert last < first - 0.5, (first, last)
    f_last = fp16.records[-1]["lm_loss"]
    assert abs(f_last - last) < 0.1 * last, (f_last, last)
    assert fp16.records[-1]["loss_scale"] >= 1.0
    assert sum(r["skipped_iterations"] for r in fp16.records) < 10


def test_per_token_loss_is_the_same_at_dp1_and_dp2(tmp_path):
    """--calculate-per-token-loss normalises by the supervised tokens of the whole global
    batch. Megatron's DDP must then not divide the gradients by the DP size as well: a
    double division would halve DP 2's gradient norm."""
    flags = _flags(tmp_path, "--train-iters", "3", "--calculate-per-token-loss")
    dp1 = train(tmp_path, "dp1", 1, flags)
    dp2 = train(tmp_path, "dp2", 2, flags)
    worst = assert_close(dp1, dp2, ("lm_loss", "ce_loss", "sed_reg", "grad_norm"), atol=1e-5)
    print(f"per-token loss DP2 vs DP1: max |diff| {worst:.2e}")
