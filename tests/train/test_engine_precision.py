"""Mixed precision through Megatron's loop: --fp16 (dynamic loss scaling, with the output
layer fused with the loss) trains like --bf16. (--calculate-per-token-loss at DP 1 vs DP 2: test_engine_calibration.)"""

from __future__ import annotations

from tests.helpers.engine import RUN, TINY_MODEL, synthetic_flags, train


def _flags(tmp, *extra):
    return [*TINY_MODEL, *RUN, *synthetic_flags(tmp), "--loss-type", "sed", "--sed-threshold", "0.9", *extra]


def test_fp16_trains_like_bf16(tmp_path):
    """Megatron's fp16 loss scaling: the scale starts at 2^32 and halves on overflow (those
    iterations are skipped, as in Megatron), then the run learns as the bf16 run does. If
    the scale never reached the gradients (unscaled by 2^-32) or an overflow crashed the
    run, the fp16 loss would not move."""
    common = ["--train-iters", "30", "--lr", "3e-3", "--log-interval", "5"]
    bf16 = train(tmp_path, "bf16", 1, _flags(tmp_path, *common, "--bf16"))
    # the fp16 run on the fused output layer + loss: the loss scale reaches its gradient
    # (computed in the forward for the loss mask, scaled in the backward)
    fused = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
    fp16 = train(
        tmp_path, "fp16", 1, _flags(tmp_path, *common, *fused, "--fp16", "--initial-loss-scale", "65536")
    )
    assert "gradient computed in the forward" in fp16.log
    first, last = bf16.records[0]["lm_loss"], bf16.records[-1]["lm_loss"]
    assert last < first - 0.5, (first, last)
    f_last = fp16.records[-1]["lm_loss"]
    assert abs(f_last - last) < 0.1 * last, (f_last, last)
    assert fp16.records[-1]["loss_scale"] >= 1.0
    assert sum(r["skipped_iterations"] for r in fp16.records) < 10
