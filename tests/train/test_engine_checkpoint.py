"""Checkpoints through Megatron's loop: a run stopped after a save and resumed with --load
continues bit for bit; with overlapped parameter gathering the checkpoint holds the live
weights; a RoPE-scaled converted Llama keeps its scaling through train -> requeue ->
resume -> eval -> export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.engine import RUN, TINY_MODEL, assert_close, synthetic_flags, train

KEYS = ("lm_loss", "ce_loss", "sed_reg", "sed_mask_rate", "grad_norm", "lr", "consumed_samples")


def _flags(tmp, *extra):
    return [
        *TINY_MODEL,
        *RUN,
        *synthetic_flags(tmp),
        "--loss-type",
        "sed",
        "--sed-threshold",
        "0.9",
        "--train-iters",
        "6",
        "--bf16",
        *extra,
    ]


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"],
        ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"],
    ],
    ids=["tp2_distopt", "dp2_overlap_param_gather"],
)
def test_stop_after_save_then_load_continues_identically(tmp_path, layout):
    """6 iterations saving at 3 and 6 vs. a new job that loads iteration 3 (--ckpt-step):
    its iterations 4-6 equal the uninterrupted ones exactly (same data position, weights,
    Adam state and step count, scheduler, RNG: hidden and attention dropout are on, so the
    tracker's per-TP-rank states must come back). With --overlap-param-gather the
    parameters are gathered lazily in the next forward; a checkpoint saved without forcing
    that gather would hold iteration N-1's weights for the other shards' parameters. (A job
    that stops after its save, --exit-interval, is the requeue test below.)"""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    ck = tmp_path / "ck"
    straight = train(
        tmp_path,
        "straight",
        2,
        _flags(tmp_path, *layout, *dropout, "--save", str(ck), "--save-interval", "3"),
    )
    assert [r["iteration"] for r in straight.records] == [1, 2, 3, 4, 5, 6]
    assert (ck / "iter_0000003").is_dir()
    resumed = train(
        tmp_path, "resumed", 2, _flags(tmp_path, *layout, *dropout, "--load", str(ck), "--ckpt-step", "3")
    )
    assert [r["iteration"] for r in resumed.records] == [4, 5, 6]
    worst = assert_close(straight, resumed, KEYS, atol=0.0, iterations=[4, 5, 6])
    assert worst == 0.0


def test_rope_scaled_llama_survives_requeue_resume_eval_and_export(tiny_llama, tmp_path):
    """SFT from the converted Llama-3-style model (llama3 RoPE scaling, factor 32) the way a
    SLURM job runs it: --pretrained-checkpoint CONVERTED --save/--load RUN. The first job
    stops after a save (as at a preemption), the requeued job resumes from RUN (its args
    come from RUN's checkpoint, not the converted one), then eval and export read what the
    trainer saved. At --lr 0 the exported model must be the original HF model exactly, and
    the rebuilt model's logits must equal transformers' (which apply the scaling)."""
    import transformers

    from megatron_sed.convert import convert_mcore_to_hf

    run_dir = tmp_path / "run"
    flags = [
        "--pretrained-checkpoint",
        str(tiny_llama.converted),
        "--load",
        str(run_dir),
        "--save",
        str(run_dir),
        "--save-interval",
        "100",
        "--data-path",
        tiny_llama.data,
        "--split",
        "90,10,0",
        "--seq-length",
        str(tiny_llama.seq_length),
        *RUN,
        "--lr",
        "0",
        "--min-lr",
        "0",
        "--lr-warmup-iters",
        "0",
        "--train-iters",
        "4",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--loss-type",
        "sed",
        "--sed-threshold",
        "0.9",
    ]
    first = train(tmp_path, "job1", 1, [*flags, "--exit-interval", "2"])
    assert [r["iteration"] for r in first.records] == [1, 2]
    second = train(tmp_path, "job1_requeued", 1, flags)
    assert [r["iteration"] for r in second.records] == [3, 4]
    from megatron_sed.checkpointing import layout

    common = layout.read_common_state(layout.resolve_dist_ckpt_dir(run_dir))
    assert common["iteration"] == 4
    assert common["args"].use_rope_scaling and common["args"].rope_scaling_factor == 32.0

    # eval rebuilds the model from RUN's args: logits equal transformers' (RoPE scaling on)
    from tests.helpers.eval import checkpoint_logits

    tokens = torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(3))
    ours = checkpoint_logits(run_dir, tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama.hf_dir), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (ours[..., : ref.shape[-1]] - ref).abs().max() < 1e-4

    out = tmp_path / "exported"
    convert_mcore_to_hf(run_dir, out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg.get("rope_scaling") or cfg["rope_parameters"]  # transformers 4.x / 5.x names
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    from safetensors.torch import load_file

    a = load_file(str(Path(tiny_llama.hf_dir) / "model.safetensors"))
    b = {}
    for f in sorted(out.glob("*.safetensors")):
        b.update(load_file(str(f)))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k].to(a[k].dtype)), k
