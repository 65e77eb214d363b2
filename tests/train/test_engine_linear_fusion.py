"""--cross-entropy-fusion-impl linear through the trainer with a tied output weight (the
embedding's) and --loss-type ce (CE through the fused SED op, statistics included): the
fused run reproduces the materialised run at TP 2 + sequence parallelism (the same layout:
a random initialisation depends on it). The untied, --loss-type sed runs, which compare
with TP 1 from a converted checkpoint: test_engine_layouts.py."""

from __future__ import annotations

import pytest

from tests.helpers.engine import RUN, TINY_MODEL, assert_close, synthetic_flags, train

LINEAR_FUSION = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
KEYS = ("lm_loss", "ce_loss", "entropy", "target_prob", "topk_mass", "top1_acc", "grad_norm")
ITERS = 2


@pytest.fixture(scope="module")
def tied_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tied")
    tied = [f for f in TINY_MODEL if f != "--untie-embeddings-and-output-weights"]
    base = [*tied, *RUN, *synthetic_flags(tmp), "--train-iters", str(ITERS), "--loss-type", "ce"]
    base += ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    return {
        "materialised": train(tmp, "materialised", 2, base),
        # the default chunk (1/16 of the tokens, at least 256) is the whole micro-batch here
        "fused": train(tmp, "fused", 2, [*base, *LINEAR_FUSION]),
    }


def test_tied_ce_linear_fusion_reproduces_the_materialised_run(tied_runs):
    ref, fused = tied_runs["materialised"], tied_runs["fused"]
    assert len(ref.records) == len(fused.records) == ITERS
    assert "output layer fused with the loss" in fused.log and "sequence-parallel" in fused.log
    assert "output layer fused with the loss" not in ref.log
    worst = assert_close(ref, fused, KEYS, atol=1e-5)
    # the weights moved (the comparison is not of a frozen model) and statistics are live
    assert ref.records[1]["lm_loss"] != ref.records[0]["lm_loss"]
    assert 0.0 < fused.records[0]["entropy"] and 0.0 < fused.records[0]["target_prob"] < 1.0
    print(f"fused tied ce tp2+sp vs materialised, tp2+sp: max |diff| {worst:.2e}")
