"""Mixture of experts, expert parallelism and multi-token prediction through Megatron's loop.

From the converted tiny Qwen3-MoE (QK-norm, 4 experts, top-2; tests/helpers/hf.py):
expert-parallel 1 and 2 give the same losses; a checkpoint saved at EP 1 resumes at EP 2
(a requeued job on another layout) with the uninterrupted run's losses; eval rebuilds the
trained model from the checkpoint and export writes a Qwen3-MoE that transformers runs to
the same logits. Multi-token prediction trains at TP 1 and TP 2 (a TP 1 checkpoint
resumed at TP 2 continues the uninterrupted run, MTP loss included), and its heads keep
Megatron's CE: their loss is the same under --loss-type ce and sed.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests.helpers.engine import RUN, TINY_MODEL, assert_close, synthetic_flags, train

KEYS = ("lm_loss", "ce_loss", "sed_reg", "grad_norm")


def _moe_flags(model, *extra):
    return [
        "--pretrained-checkpoint",
        str(model.converted),
        "--data-path",
        model.data,
        "--split",
        "90,10,0",
        "--seq-length",
        "128",
        *RUN,
        "--train-iters",
        "4",
        "--lr-warmup-iters",
        "0",
        # Megatron keeps expert parameters in an optimizer of their own only at EP > 1, so it
        # cannot load an EP 1 run's optimizer state at EP 2 (the trainer says so): plain SGD
        # with a constant learning rate has no optimizer state, so the resumed run below
        # (--no-load-optim) must still continue the uninterrupted one exactly.
        "--optimizer",
        "sgd",
        "--sgd-momentum",
        "0",
        "--lr",
        "0.05",
        "--lr-decay-style",
        "constant",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--moe-aux-loss-coeff",
        "0.01",
        "--loss-type",
        "sed",
        "--sed-threshold",
        "0.9",
        *extra,
    ]


@pytest.fixture(scope="module")
def moe_runs(tiny_qwen3_moe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    ep1_dir, resumed_dir = tmp / "ep1_ckpt", tmp / "resumed_ckpt"
    ep1 = train(tmp, "ep1", 1, _moe_flags(tiny_qwen3_moe, "--save", str(ep1_dir), "--save-interval", "2"))
    ep2 = train(tmp, "ep2", 2, _moe_flags(tiny_qwen3_moe, "--expert-model-parallel-size", "2"))
    # the EP 1 checkpoint of iteration 2, resumed by a job at EP 2
    resumed = train(
        tmp,
        "ep2_resumed",
        2,
        _moe_flags(
            tiny_qwen3_moe,
            "--expert-model-parallel-size",
            "2",
            "--load",
            str(ep1_dir),
            "--ckpt-step",
            "2",
            "--no-load-optim",
            "--save",
            str(resumed_dir),
            "--save-interval",
            "100",
        ),
    )
    # ... which needs --no-load-optim: without it the trainer refuses before Megatron fails
    refused = train(
        tmp,
        "ep2_with_optimizer",
        1,
        _moe_flags(
            tiny_qwen3_moe, "--expert-model-parallel-size", "2", "--load", str(ep1_dir), "--ckpt-step", "2"
        ),
        expect_rc=2,
    )
    return dict(ep1=ep1, ep2=ep2, resumed=resumed, refused=refused, resumed_dir=resumed_dir, tmp=tmp)


def test_moe_is_built_and_logs_the_router_aux_loss(moe_runs):
    ep1 = moe_runs["ep1"]
    # Megatron's own MoE log entry, in the training line
    lines = [x for x in ep1.log.splitlines() if "consumed samples" in x]
    assert lines and all("load_balancing_loss:" in x for x in lines), lines[:1]
    aux = [float(re.search(r"load_balancing_loss: (\S+)", x).group(1)) for x in lines]
    assert all(a > 0 for a in aux), aux
    assert [r["iteration"] for r in ep1.records] == [1, 2, 3, 4]


def test_expert_parallel_2_matches_1(moe_runs):
    worst = assert_close(moe_runs["ep1"], moe_runs["ep2"], KEYS, atol=2e-5)
    print(f"EP1 vs EP2: worst |diff| {worst:.2e}")


def test_ep1_checkpoint_resumes_at_ep2(moe_runs):
    assert "--no-load-optim" in moe_runs["refused"].log and "Traceback" not in moe_runs["refused"].log
    resumed = moe_runs["resumed"]
    assert [r["iteration"] for r in resumed.records] == [3, 4]
    worst = assert_close(moe_runs["ep1"], resumed, KEYS, atol=2e-5, iterations=[3, 4])
    print(f"EP1 uninterrupted vs EP1 -> EP2 resumed: worst |diff| {worst:.2e}")


def test_trained_moe_checkpoint_evaluates_and_exports_as_qwen3_moe(moe_runs, tiny_qwen3_moe):
    """eval rebuilds the trained model from the checkpoint's args (MoE, QK-norm included);
    export writes a Qwen3-MoE whose logits, computed by transformers, equal eval's."""
    import transformers

    from megatron_sed.convert import convert_mcore_to_hf
    from tests.helpers.eval import checkpoint_logits

    out = moe_runs["tmp"] / "exported"
    convert_mcore_to_hf(moe_runs["resumed_dir"], out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["head_dim"] == 24
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == 4 and cfg["norm_topk_prob"] is True
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    ours = checkpoint_logits(moe_runs["resumed_dir"], tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    original = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_qwen3_moe.hf_dir), dtype=torch.float32
    )
    with torch.no_grad():
        ref, before = hf(tokens).logits, original(tokens).logits
    diff = (ours[..., : ref.shape[-1]] - ref).abs().max().item()
    print(f"eval vs exported Qwen3-MoE in transformers: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert (ref - before).abs().max() > 1e-3  # it trained: the export is not the input model


def _mtp_losses(run) -> dict[int, float]:
    """{iteration: mtp_1 loss} as Megatron's training line prints it."""
    out = {}
    for line in run.log.splitlines():
        m = re.search(r"iteration\s+(\d+)/.*\| mtp_1 loss: (\S+) \|", line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def mtp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtp")
    base = [*TINY_MODEL, *RUN, *synthetic_flags(tmp), "--train-iters", "3", "--mtp-num-layers", "1"]
    sed = ["--loss-type", "sed", "--sed-threshold", "0.9"]
    ckpt = tmp / "mtp_sed_ckpt"
    runs = dict(
        ce=train(tmp, "mtp_ce", 1, [*base, "--loss-type", "ce"]),
        sed=train(tmp, "mtp_sed", 1, [*base, *sed, "--save", str(ckpt), "--save-interval", "1"]),
    )
    # the TP 1 checkpoint of iteration 1 resumed at TP 2, at the same padded vocabulary
    # (the padding multiple is --make-vocab-size-divisible-by x TP): MTP at TP 2, with the
    # output layer fused with the loss (the MTP heads keep Megatron's CE on that path too)
    tp2 = [*base, *sed, "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]
    tp2 += ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
    runs["sed_tp2"] = train(tmp, "mtp_sed_tp2", 2, [*tp2, "--load", str(ckpt), "--ckpt-step", "1"])
    return runs


def test_mtp_trains_at_tp1_and_tp2(mtp_runs):
    """The MTP block is built and trained at both sizes (TP 2 resuming the TP 1 run's
    iteration 1): Megatron logs its loss every iteration, the metrics file too, and it
    falls."""
    for name, its in (("sed", [1, 2, 3]), ("sed_tp2", [2, 3])):
        run = mtp_runs[name]
        assert sorted(_mtp_losses(run)) == its, (name, run.log[-2000:])
        mtp = run.series("mtp_1_loss")
        assert len(mtp) == len(its) and all(map(math.isfinite, mtp)) and mtp[-1] < mtp[0], (name, mtp)
        assert "Number of parameters in mtp block" in run.log


def test_mtp_heads_keep_megatron_ce_under_sed(mtp_runs):
    """At iteration 1 (same weights, same batch) the MTP heads' loss is the same under ce
    and sed, while the main head's loss differs by the SED regulariser."""
    ce, sed = _mtp_losses(mtp_runs["ce"]), _mtp_losses(mtp_runs["sed"])
    assert ce[1] == pytest.approx(sed[1], rel=1e-6), (ce[1], sed[1])
    main_ce, main_sed = mtp_runs["ce"].records[0], mtp_runs["sed"].records[0]
    assert main_sed["sed_reg"] > 1e-3 and main_sed["lm_loss"] > main_ce["lm_loss"] + 1e-3
    # what an MTP head with SED would have printed: CE + the regulariser, far off
    assert abs(sed[1] - ce[1]) < 0.01 * main_sed["sed_reg"]


def test_mtp_checkpoint_resumes_at_tp2_with_the_uninterrupted_losses(mtp_runs):
    """A TP 1 MTP checkpoint (iteration 1) resumed at TP 2, with the output layer fused with
    the loss, continues the uninterrupted (materialised) TP 1 run: main and MTP losses and
    grad norms per iteration. The metrics file carries
    Megatron's per-iteration `mtp_1 loss` (its training line is no reference after a
    start: Megatron does not reset its accumulators after a job's first iteration, so the
    line of iteration 2 averages iterations 1 and 2, about 1e-2 away from a job resumed
    at 1, whose first line is iteration 2 alone)."""
    straight, resumed = mtp_runs["sed"], mtp_runs["sed_tp2"]
    assert [r["iteration"] for r in resumed.records] == [2, 3]
    assert "gradient computed in the forward" in resumed.log
    keys = ("lm_loss", "ce_loss", "sed_reg", "grad_norm", "mtp_1_loss")
    worst = assert_close(straight, resumed, keys, atol=1e-5, iterations=[2, 3])
    print(f"MTP TP 1 -> TP 2 resume vs uninterrupted TP 1: max |diff| {worst:.2e}")
    # the metrics file's value is the line's where the line's window is one iteration
    line, rec = _mtp_losses(straight), straight.by_iteration()
    for it in (1, 3):
        assert rec[it]["mtp_1_loss"] == pytest.approx(line[it], abs=1e-5), (it, rec[it], line[it])
    assert line[2] == pytest.approx((rec[1]["mtp_1_loss"] + rec[2]["mtp_1_loss"]) / 2, abs=1e-5)
    assert _mtp_losses(resumed)[2] == pytest.approx(rec[2]["mtp_1_loss"], abs=1e-5)
