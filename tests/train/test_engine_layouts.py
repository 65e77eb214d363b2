"""Megatron's own loop with the SED plugin on CPU: the same SED-SFT training at every
parallel layout, and fine-tuning a converted HF Llama that keeps the loaded model.

All runs start from the same weights (the tiny pretrained Llama, converted), so every
layout must reproduce the single rank's losses, SED statistics and gradient norms (tensor
parallelism splits matmuls and the loss's vocabulary sums across ranks, context
parallelism the sequence: the difference is fp32 summation order, measured |diff|
~1e-7; tolerance 1e-5). Layouts share launches where they are independent: sequence
parallelism and selective recompute ride on TP 2, full recompute on DP 2, the interleaved
pipeline on TP 2 x PP 2 with the distributed optimizer.

Packed samples with context parallelism take the THD layout, as on a GPU with Transformer
Engine: the reader pads each sample to a multiple of 2 x CP, every CP rank keeps chunks r
and 2CP-1-r of each sample (TE's thd_get_partitioned_indices layout), RoPE is Megatron's
THD RoPE and the local CP attention masks per sample. Their reference is the single rank
with the same padding (--sft-pad-granularity 4) and the block-causal mask: no THD, no
split.

The interleaved pipeline needs two model chunks per pipeline rank; the tiny model has two
layers, so the embedding and the loss count as pipeline layers
(--account-for-embedding-in-pipeline-split / --account-for-loss-in-pipeline-split): four
virtual stages of one "layer" each, rank 0 running the embedding and layer 2, rank 1
layer 1 and the loss."""

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


VPP = [
    "--account-for-embedding-in-pipeline-split",
    "--account-for-loss-in-pipeline-split",
    "--num-layers-per-virtual-pipeline-stage",
    "1",
]
RECOMPUTE_FULL = [
    "--recompute-granularity",
    "full",
    "--recompute-method",
    "uniform",
    "--recompute-num-layers",
    "1",
]
CP2 = ["--context-parallel-size", "2"]
TP2 = ["--tensor-model-parallel-size", "2"]

# name: (ranks, flags, the single-rank run it must reproduce)
LAYOUTS = {
    "tp2_sp_selective_recompute": (
        2,
        [*TP2, "--sequence-parallel", "--recompute-granularity", "selective"],
        "tp1",
    ),
    "dp2_full_recompute": (2, RECOMPUTE_FULL, "tp1"),
    "tp2pp2vpp2_distopt": (
        4,
        [
            *TP2,
            "--pipeline-model-parallel-size",
            "2",
            *VPP,
            "--use-distributed-optimizer",
            "--overlap-grad-reduce",
            "--overlap-param-gather",
        ],
        "tp1",
    ),
    # packed + CP: each sample padded to a multiple of 2 x CP (the reader's default at
    # CP 2), THD per-sample split; the single rank packs with the same padding
    "cp2_packed": (2, CP2, "tp1_pad4"),
    "cp2_padded": (2, [*CP2, "--no-pack"], "tp1_padded"),
    "cp2tp2_sp": (4, [*CP2, *TP2, "--sequence-parallel"], "tp1_pad4"),
}


@pytest.fixture(scope="module")
def layouts(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    runs = {
        "tp1": train(tmp, "tp1", 1, _flags(tiny_llama)),
        "tp1_padded": train(tmp, "tp1_padded", 1, _flags(tiny_llama, "--no-pack")),
        # block-causal mask over samples padded as at CP 2 (no THD, no split)
        "tp1_pad4": train(tmp, "tp1_pad4", 1, _flags(tiny_llama, "--sft-pad-granularity", "4")),
    }
    for name, (n, extra, _) in LAYOUTS.items():
        runs[name] = train(tmp, name, n, _flags(tiny_llama, *extra))
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sed_losses_agree_across_layouts(layouts, layout):
    reference = LAYOUTS[layout][2]
    worst = assert_close(layouts[reference], layouts[layout], KEYS, atol=1e-5)
    assert len(layouts[reference].records) == ITERS
    # the evaluation after training (forward only, its reports reduced over DP x CP too)
    ref_valid, valid = layouts[reference].valid, layouts[layout].valid
    assert len(valid) == len(ref_valid) >= 1
    for a, b in zip(ref_valid, valid):
        for k in KEYS[:-1]:  # no grad norm in evaluation
            assert abs(a[f"valid_{k}"] - b[f"valid_{k}"]) <= 1e-5 * max(1.0, abs(a[f"valid_{k}"])), (k, a, b)
    print(f"{layout} vs {reference}: max |diff| {worst:.2e}")


def test_layouts_are_what_the_flags_say(layouts):
    """Each run used the layout it is named for (Megatron's own log lines), and packing
    mattered: the padded stream differs from the packed one, and padding each packed
    sample to a multiple of 4 (CP 2's default, --sft-pad-granularity 4 at CP 1) packs
    differently again."""
    assert "Number of virtual stages per pipeline stage: 2" in layouts["tp2pp2vpp2_distopt"].log
    for name in ("cp2_packed", "cp2_padded", "cp2tp2_sp"):
        assert "context-parallel size: 2" in layouts[name].log, name
    assert layouts["tp1"].series("lm_loss") != layouts["tp1_padded"].series("lm_loss")
    padded_samples = "(packed, each sample padded to a multiple of 4)"
    for name in ("tp1_pad4", "cp2_packed", "cp2tp2_sp"):
        assert padded_samples in layouts[name].log, name
    assert padded_samples not in layouts["tp1"].log
    assert layouts["tp1"].series("lm_loss") != layouts["tp1_pad4"].series("lm_loss")


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
        # TP 1 on the last of 2 pipeline stages; chunks of 100 tokens: several per
        # micro-batch of 2 x 128, one uneven
        "pp2": train(
            tmp,
            "pp2",
            2,
            _flags(
                tiny_llama,
                *LINEAR_FUSION,
                "--pipeline-model-parallel-size",
                "2",
                "--sed-fused-chunk-tokens",
                "100",
            ),
        ),
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


@pytest.mark.parametrize("layout", ["pp2", "tp2sp"])
def test_linear_fusion_reproduces_the_materialised_run(layouts, fused_layouts, layout):
    """The fused output layer + loss (chunked, logit-free; at TP 1 on the last pipeline
    stage, and at TP 2 with sequence parallelism, where the fused op gathers the hidden
    states and reduce-scatters their gradient) trains exactly like the materialised
    single-rank run: losses, every statistic, gradient norm."""
    worst = assert_close(layouts["tp1"], fused_layouts[layout], KEYS, atol=1e-5)
    assert len(fused_layouts[layout].records) == ITERS
    log = fused_layouts[layout].log
    # the trainer hands the op the loss mask: the gradient is computed in the forward (3
    # GEMMs), and the backward found the upstream gradient proportional to it
    assert "output layer fused with the loss" in log and "gradient computed in the forward" in log
    assert "not proportional to grad_hint" not in log
    print(f"fused {layout} vs materialised tp1: max |diff| {worst:.2e}")
