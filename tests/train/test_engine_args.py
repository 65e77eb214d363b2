"""megatron-sed-train's argument phase: Megatron's flags and validation plus megatron-sed's
checks, each bad combination failing with a message that names the flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.engine import RUN, TINY_MODEL, synthetic_flags

DRIVER = Path(__file__).with_name("parse_driver.py")
LINEAR = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
FP8 = ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid", "--bf16"]


@pytest.fixture(scope="module")
def parsed(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("args")
    base = [*TINY_MODEL, *RUN, *synthetic_flags(tmp), "--train-iters", "4", "--loss-type", "sed"]
    conv = [
        "--load",
        str(tiny_llama.converted),
        "--finetune",
        "--data-path",
        tiny_llama.data,
        *RUN,
        "--train-iters",
        "4",
        "--seq-length",
        "128",
    ]
    cases = [
        ("cpu_defaults", base),
        ("te_on_cpu", [*base, "--transformer-impl", "transformer_engine"]),
        ("fp8_on_cpu", [*base, "--fp8-format", "hybrid", "--bf16"]),
        ("nccl_on_cpu", [*base, "--distributed-backend", "nccl"]),
        ("ratio_with_pp", [*base, "--sed-mask-ratio", "0.3", "--pipeline-model-parallel-size", "2"]),
        ("negative_coef", [*base, "--sed-coef", "-1"]),
        ("bad_ratio", [*base, "--sed-mask-ratio", "1.5"]),
        ("warmup_too_long", [*base, "--lr-warmup-iters", "4"]),
        (
            "hf_tokenizer_on_byte_data",
            [*base, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tiny_llama.hf_dir)],
        ),
        ("cp_seq_length", [*base, "--context-parallel-size", "2", "--seq-length", "126"]),
        ("hybrid_cp", [*base, "--context-parallel-size", "2", "--hybrid-context-parallel"]),
        ("cp_sample_padding", [*base, "--context-parallel-size", "2", "--sft-pad-granularity", "6"]),
        ("sample_padding_seq_length", [*base, "--sft-pad-granularity", "5"]),
        ("converted", conv),
        ("linear_fusion", [*base, *LINEAR, "--sed-fused-chunk-tokens", "64"]),
        ("linear_without_fusion", [*base, "--cross-entropy-fusion-impl", "linear"]),
        ("chunk_without_linear", [*base, "--sed-fused-chunk-tokens", "64"]),
        ("linear_no_sed_stats", [*base, *LINEAR, "--loss-type", "ce", "--no-sed-stats"]),
        ("converted_mismatch", [*conv, "--num-layers", "3", "--hidden-size", "32"]),
        ("converted_dense_moe_flag", [*conv, "--num-experts", "4"]),
        ("mla", [*base, "--multi-latent-attention"]),
        ("sliding_window_local", [*base, "--window-size", "32,0"]),
        # megatron-sed-train's main(): exit status 2 and the message, no traceback
        ("cli_bare_assert", [*base, "--save", str(tmp / "save")], {"cli": True}),
        ("cli_ours", [*base, "--sed-coef", "-1"], {"cli": True}),
        # the GPU-only checks, as on a GPU of that compute capability
        *(
            (
                f"{recipe}_on_sm{major}{minor}",
                [*base, *FP8, "--fp8-recipe", recipe],
                {"gpu_capability": [major, minor]},
            )
            for recipe, (major, minor) in (
                ("mxfp8", (9, 0)),
                ("mxfp8", (8, 9)),
                ("mxfp8", (10, 0)),
                ("delayed", (9, 0)),
            )
        ),
    ]
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    res = subprocess.run(
        [sys.executable, str(DRIVER), str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONWARNINGS": "ignore", **__import__("os").environ},
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULTS ")]
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(line[-1][len("RESULTS ") :])


def test_cpu_defaults_and_byte_tokenizer(parsed):
    r = parsed["cpu_defaults"]
    assert r["ok"], r
    assert r["distributed_backend"] == "gloo" and r["transformer_impl"] == "local"
    assert r["gradient_accumulation_fusion"] is False and r["use_cpu_initialization"] is True
    assert r["tokenizer_type"] == "NullTokenizer" and r["sft_tokenizer_type"] == "byte"
    assert r["vocab_size"] == 262 and r["padded_vocab_size"] == 384  # Megatron pads to 128
    # Megatron's --fp8-amax-* defaults are the ones model.config falls back to without them.
    from megatron_sed.model import config

    assert r["fp8_amax_history_len"] == config.FP8_AMAX_HISTORY_LEN
    assert r["fp8_amax_compute_algo"] == config.FP8_AMAX_COMPUTE_ALGO


@pytest.mark.parametrize(
    "case,message",
    [
        ("te_on_cpu", "--transformer-impl transformer_engine needs a GPU"),
        ("fp8_on_cpu", "--fp8-format hybrid needs Transformer Engine"),
        ("nccl_on_cpu", "--distributed-backend nccl needs GPUs"),
        ("ratio_with_pp", "only the last pipeline stage"),
        ("negative_coef", "--sed-coef must be >= 0"),
        ("bad_ratio", "--sed-mask-ratio must lie in (0, 1)"),
        ("warmup_too_long", "--lr-warmup-iters (4) must be smaller than --lr-decay-iters (4"),
        ("hf_tokenizer_on_byte_data", "was tokenized with byte"),
        ("converted_mismatch", "--num-layers 3 (checkpoint: 2)"),
        ("cp_seq_length", "--seq-length 126 must be a multiple of 2 x --context-parallel-size (4)"),
        ("hybrid_cp", "--hybrid-context-parallel is not supported"),
        (
            "cp_sample_padding",
            "--sft-pad-granularity 6 must be a multiple of 2 x --context-parallel-size (4)",
        ),
        (
            "sample_padding_seq_length",
            "--sft-pad-granularity 5 must be a positive divisor of --seq-length 128",
        ),
        ("converted_dense_moe_flag", "--num-experts 4 (checkpoint: None)"),
        ("mla", "--multi-latent-attention (multi-latent attention (MLA)) is not supported"),
        ("sliding_window_local", "--window-size (sliding-window attention) is not supported on the local"),
    ],
)
def test_bad_flags_fail_naming_them(parsed, case, message):
    r = parsed[case]
    assert not r["ok"] and message in r["error"], r


def test_linear_cross_entropy_fusion(parsed):
    """--cross-entropy-fusion-impl linear (a choice megatron-core 0.19 lacks) parses and
    selects the plugin's fused output layer + loss; its misuses are named."""
    r = parsed["linear_fusion"]
    assert r["ok"], r
    assert r["cross_entropy_fusion_impl"] == "linear" and r["sed_fused_chunk_tokens"] == 64
    assert "only acts with --cross-entropy-loss-fusion" in parsed["linear_without_fusion"]["error"]
    assert (
        "needs --cross-entropy-loss-fusion --cross-entropy-fusion-impl linear"
        in (parsed["chunk_without_linear"]["error"])
    )
    assert "drop --no-sed-stats" in parsed["linear_no_sed_stats"]["error"]


def test_packed_thd_with_context_parallelism_runs_and_unfused_te_is_refused():
    """Packed THD batches with CP on Transformer Engine are accepted (each sample padded to
    a multiple of 2 x CP, TE's per-sample split: megatron_sed.train.data.model_inputs);
    TE's unfused attention has no CP: refused (not reachable through the command line on
    CPU, where TE itself is refused first)."""
    import argparse

    from megatron_sed.train.arguments import ArgumentError, _check_context_parallel
    from megatron_sed.train.data import sample_pad_multiple

    args = argparse.Namespace(
        context_parallel_size=2, seq_length=128, pack=True, transformer_impl="transformer_engine"
    )
    for ok in (dict(), dict(pack=False), dict(transformer_impl="local"), dict(context_parallel_size=1)):
        _check_context_parallel(argparse.Namespace(**{**vars(args), **ok}))
    assert sample_pad_multiple(args) == 4  # Megatron-LM's SFT rule: 2 x CP
    assert sample_pad_multiple(argparse.Namespace(context_parallel_size=1, sft_pad_granularity=None)) == 1
    assert sample_pad_multiple(argparse.Namespace(context_parallel_size=2, sft_pad_granularity=8)) == 8
    # TE's unfused attention has no CP
    from megatron.core.transformer.enums import AttnBackend

    unfused = argparse.Namespace(**{**vars(args), "pack": False, "attention_backend": AttnBackend.unfused})
    with pytest.raises(ArgumentError, match="--attention-backend unfused"):
        _check_context_parallel(unfused)
    _check_context_parallel(argparse.Namespace(**{**vars(unfused), "attention_backend": AttnBackend.auto}))


def test_converted_checkpoint_supplies_shape_rope_scaling_and_tokenizer(parsed):
    r = parsed["converted"]
    assert r["ok"], r
    assert (r["num_layers"], r["hidden_size"], r["position_embedding_type"]) == (2, 64, "rope")
    assert r["use_rope_scaling"] is True and r["rope_scaling_factor"] == 32.0
    assert r["tokenizer_type"] == "HuggingFaceTokenizer" and r["sft_tokenizer_type"] == "hf"
    assert r["padded_vocab_size"] == 400
    assert "--hidden-size 32 (checkpoint: 64)" in parsed["converted_mismatch"]["error"]


def test_bare_assert_is_reported_with_its_condition(parsed):
    """Megatron's validate_args has many message-less asserts (here --save without
    --save-interval); the CLI shows the failing condition instead of an empty error."""
    r = parsed["cli_bare_assert"]
    assert r["rc"] == 2 and "Traceback" not in r["error"], r
    assert "megatron-sed-train: error: AssertionError in arguments.py:" in r["error"], r
    assert r["error"].rstrip().endswith("assert args.save_interval is not None"), r
    r = parsed["cli_ours"]  # a message of ours passes as it is (the `python -m` process's exit
    # status 2 is checked on a real run: tests/train/test_first_contact.py)
    assert (
        r["rc"] == 2 and r["error"].strip() == "megatron-sed-train: error: --sed-coef must be >= 0, got -1.0"
    ), r


def test_mxfp8_needs_blackwell(parsed):
    """MXFP8 is refused below compute capability 10 (Transformer Engine would fail inside
    the first GEMM); the other FP8 recipes, and MXFP8 on Blackwell, pass that check."""
    refusal = "--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x)"
    for case, shown in (("mxfp8_on_sm90", "this GPU is 9.0"), ("mxfp8_on_sm89", "this GPU is 8.9")):
        r = parsed[case]
        assert not r["ok"] and refusal in r["error"] and shown in r["error"], r
    for case in ("mxfp8_on_sm100", "delayed_on_sm90"):
        assert parsed[case]["ok"], parsed[case]
