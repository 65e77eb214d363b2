"""Megatron's own loop with the SED plugin on CPU: the same SED-SFT training at every
parallel layout, and fine-tuning a converted HF Llama that keeps the loaded model.

All runs start from the same weights (the tiny pretrained Llama, converted), so TP, PP
and DP must reproduce TP=1's losses and gradient norms (tensor parallelism splits
matmuls and the loss's vocabulary sums across ranks: the difference is fp32 summation
order, measured |diff| ~1e-7; tolerance 1e-5)."""

from __future__ import annotations

import pytest

from tests.helpers.engine import RUN, assert_close, train
from tests.helpers.hf import hf_reference_ce

ITERS = 3
KEYS = (
    "lm_loss",
    "ce_loss",
    "sed_reg",
    "sed_mask_rate",
    "entropy",
    "target_prob",
    "topk_mass",
    "top1_acc",
    "grad_norm",
)


def _flags(llama, *extra):
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
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        *RUN,
        "--train-iters",
        str(ITERS),
        "--loss-type",
        "sed",
        "--sed-threshold",
        "0.9",
        "--sed-top-k",
        "2",
        *extra,
    ]


@pytest.fixture(scope="module")
def layouts(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    runs = {"tp1": train(tmp, "tp1", 1, _flags(tiny_llama))}
    for name, n, extra in (
        ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
        ("dp2", 2, []),
        # pipeline parallelism: inside tp2pp2_distopt (one launch fewer for the suite)
        (
            "tp2pp2_distopt",
            4,
            [
                "--tensor-model-parallel-size",
                "2",
                "--pipeline-model-parallel-size",
                "2",
                "--use-distributed-optimizer",
                "--overlap-grad-reduce",
                "--overlap-param-gather",
            ],
        ),
    ):
        runs[name] = train(tmp, name, n, _flags(tiny_llama, *extra))
    return runs


@pytest.mark.parametrize("layout", ["tp2", "dp2", "tp2pp2_distopt"])
def test_sed_losses_agree_across_layouts(layouts, layout):
    worst = assert_close(layouts["tp1"], layouts[layout], KEYS, atol=1e-5)
    assert len(layouts["tp1"].records) == ITERS
    print(f"{layout} vs tp1: max |diff| {worst:.2e}")


def test_sed_statistics_are_live(layouts):
    """The regulariser acts (tau 0.9: most tokens of a small model are below it) and the
    objective is CE + lambda * reg."""
    for r in layouts["tp1"].records:
        assert 0.05 < r["sed_mask_rate"] <= 1.0
        assert r["sed_reg"] > 0.0
        assert r["lm_loss"] == pytest.approx(r["ce_loss"] + r["sed_reg"], rel=1e-5)
        assert r["sed_threshold"] == pytest.approx(0.9)


def _finetune_lr0(tiny_llama, tmp, name, *extra):
    return train(
        tmp,
        name,
        2,
        _flags(
            tiny_llama, "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0", "--train-iters", "4", *extra
        ),
    )


@pytest.fixture(scope="module")
def reference_ce(tiny_llama):
    """transformers' CE of the HF model on each of the first 4 global batches, in the
    order Megatron's sampler draws them (global batch i = samples 8i .. 8i+7)."""
    from megatron_sed.data.reader import build_sft_datasets

    train_ds, _, _ = build_sft_datasets(
        [tiny_llama.data],
        split="90,10,0",
        seq_length=tiny_llama.seq_length,
        seed=1234,
        pack=True,
        train_samples=32,
    )
    return [
        hf_reference_ce(tiny_llama.hf_dir, [train_ds[j] for j in range(8 * i, 8 * i + 8)]) for i in range(4)
    ]


@pytest.mark.parametrize("precision,tol", [("fp32", 2e-6), ("bf16", 3e-2)])
def test_finetune_lr0_keeps_the_loaded_model(tiny_llama, tmp_path, reference_ce, precision, tol):
    """--finetune from the converted checkpoint with --lr 0 and the distributed optimizer
    (DP 2): every iteration's CE is the HF model's CE on that batch. If the optimizer's
    fp32 master weights were not reloaded from the checkpoint, the first step would write
    the random initialisation back into the model (loss ~6 instead of ~2)."""
    extra = ["--use-distributed-optimizer"] + (["--bf16"] if precision == "bf16" else [])
    run = _finetune_lr0(tiny_llama, tmp_path, precision, *extra)
    ce = run.series("ce_loss")
    assert len(ce) == 4
    for got, want in zip(ce, reference_ce):
        assert got == pytest.approx(want, rel=tol), (ce, reference_ce)
    assert max(reference_ce) < 4.0  # the pretrained model: a random one is at ~6


# --cross-entropy-fusion-impl linear: the output layer fused with the loss (no logits).
LINEAR_FUSION = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]


@pytest.fixture(scope="module")
def fused_layouts(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused_layouts")
    return {
        # chunks of 100 tokens: several per micro-batch of 2 x 128, one uneven
        "tp1": train(tmp, "tp1", 1, _flags(tiny_llama, *LINEAR_FUSION, "--sed-fused-chunk-tokens", "100")),
        "tp2sp": train(
            tmp,
            "tp2sp",
            2,
            _flags(
                tiny_llama,
                *LINEAR_FUSION,
                "--tensor-model-parallel-size",
                "2",
                "--sequence-parallel",
                "--sed-fused-chunk-tokens",
                "96",  # 3 chunks of the 256 gathered tokens, one uneven
            ),
        ),
    }


@pytest.mark.parametrize("layout", ["tp1", "tp2sp"])
def test_linear_fusion_reproduces_the_materialised_run(layouts, fused_layouts, layout):
    """The fused output layer + loss (chunked, logit-free; TP 2 with sequence parallelism:
    the fused op gathers the hidden states and reduce-scatters their gradient) trains
    exactly like the materialised TP 1 run: losses, every statistic, gradient norm."""
    worst = assert_close(layouts["tp1"], fused_layouts[layout], KEYS, atol=1e-5)
    assert len(fused_layouts[layout].records) == ITERS
    assert "output layer fused with the loss" in fused_layouts[layout].log
    print(f"fused {layout} vs materialised tp1: max |diff| {worst:.2e}")
