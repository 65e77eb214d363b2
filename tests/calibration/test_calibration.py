"""Threshold calibration (--sed-mask-ratio) and the EMA tracker.

The quantile over masses gathered from DP ranks must equal the single-process quantile over
the same samples (worlds 1, 2 and 4; world 4 also shards the vocabulary with TP=2), and the
top-k masses must match a float64 full-vocab reference."""

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from megatron_sed.calibration import (
    ThresholdEMA,
    calibrate_threshold,
    exact_quantile,
    fraction_below,
    threshold_from_masses,
    topk_masses,
)

SEQ, VOCAB, TOPK, ROWS, NUM_SAMPLES, RATIO = 6, 16, 2, 24, 19, 0.3


def _dataset():
    """ROWS global rows: logits [ROWS, SEQ, VOCAB] fp32, labels and loss masks [ROWS, SEQ]."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(ROWS, SEQ, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    loss_mask = (torch.rand(ROWS, SEQ, generator=g) > 0.3).float()
    loss_mask[:, 0] = 0.0  # a "prompt" position
    return logits, labels, loss_mask


def _reference_tau():
    """float64 full-vocab top-k masses of the first NUM_SAMPLES rows, numpy's quantile."""
    logits, _, loss_mask = _dataset()
    p = torch.softmax(logits[:NUM_SAMPLES].double(), dim=-1)
    mass = p.topk(TOPK, dim=-1).values.sum(-1)[loss_mask[:NUM_SAMPLES].bool()]
    return float(np.quantile(mass.numpy(), RATIO)), mass


def _batches(dp_rank, dp_size, mbs, tp_rank=0, tp_size=1):
    """This DP rank's micro-batches in Megatron's sample order, vocab shard of this TP rank."""
    logits, labels, loss_mask = _dataset()
    shard = VOCAB // tp_size
    step = dp_size * mbs
    for start in range(0, ROWS, step):
        rows = slice(start + dp_rank * mbs, start + (dp_rank + 1) * mbs)
        yield {
            "logits": logits[rows, :, tp_rank * shard : (tp_rank + 1) * shard].transpose(0, 1),
            "labels": labels[rows],
            "loss_mask": loss_mask[rows],
        }


def test_exact_quantile_matches_numpy():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        v = torch.rand(n, generator=g)
        for q in (0.0, 0.1, 0.3, 0.5, 0.97, 1.0):
            assert exact_quantile(v, q) == pytest.approx(float(np.quantile(v.double().numpy(), q)), abs=1e-12)
    v = torch.arange(10, dtype=torch.float32)  # 0..9: fraction below the 0.3-quantile is 3/10
    tau = exact_quantile(v, 0.3)
    assert tau == pytest.approx(2.7) and fraction_below(v, tau) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="zero values"):
        exact_quantile(torch.zeros(0), 0.3)
    with pytest.raises(ValueError, match="not finite"):
        exact_quantile(torch.tensor([0.5, float("nan")]), 0.3)
    with pytest.raises(ValueError, match="quantile level"):
        threshold_from_masses(v, 1.0)


def test_topk_masses_match_float64_reference():
    logits, labels, loss_mask = _dataset()
    lg = logits[:3].transpose(0, 1).contiguous()  # [s, b, V]
    before = lg.clone()
    masses = topk_masses(lg, labels[:3], loss_mask[:3], TOPK)
    assert torch.equal(lg, before), "calibration must not overwrite the caller's logits"
    # the masses come in [s, b] order (the logits' layout)
    ref = torch.softmax(before.double(), -1).topk(TOPK, -1).values.sum(-1)[loss_mask[:3].t().bool()]
    torch.testing.assert_close(masses.double(), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[b, s\]"):
        topk_masses(lg, labels[:3].t(), loss_mask[:3], TOPK)


def test_calibrate_single_process_and_too_few_samples():
    ref_tau, ref_mass = _reference_tau()
    res = calibrate_threshold(lambda b: b["logits"], _batches(0, 1, 4), ratio=RATIO, top_k=TOPK,
                              num_samples=NUM_SAMPLES)
    assert res.tau == pytest.approx(ref_tau, abs=1e-6)
    assert res.num_samples == NUM_SAMPLES and res.num_tokens == ref_mass.numel()
    assert abs(res.fraction_below - RATIO) <= 1.0 / ref_mass.numel() + 1e-9
    assert "tau=" in res.log_line()
    with pytest.raises(ValueError, match="only 24 samples"):
        calibrate_threshold(lambda b: b["logits"], _batches(0, 1, 4), ratio=RATIO, top_k=TOPK,
                            num_samples=100)


def test_entropy_mask_selects_the_top_ratio():
    """--sed-mask entropy regularises tokens ABOVE tau: tau is the (1 - ratio) quantile."""
    logits, _, loss_mask = _dataset()
    p = torch.softmax(logits[:NUM_SAMPLES].double(), dim=-1)
    ent = -(p * p.log()).sum(-1)[loss_mask[:NUM_SAMPLES].bool()]
    res = calibrate_threshold(lambda b: b["logits"], _batches(0, 1, 4), ratio=RATIO, top_k=TOPK,
                              num_samples=NUM_SAMPLES, mask="entropy")
    assert res.tau == pytest.approx(float(np.quantile(ent.numpy(), 1 - RATIO)), abs=1e-5)
    assert abs(res.fraction_selected - RATIO) <= 1.0 / ent.numel() + 1e-9
    assert "entropy" in res.log_line()
    with pytest.raises(ValueError, match="topk_mass or entropy"):
        calibrate_threshold(lambda b: b["logits"], _batches(0, 1, 4), ratio=RATIO, top_k=TOPK,
                            num_samples=4, mask="all")


def test_calibrate_model_on_gptmodel():
    """calibrate_model runs a Megatron-Core GPTModel in eval mode over trainer-style batches
    and matches the float64 quantile of that model's own logits."""
    import argparse

    from megatron.core import parallel_state as ps

    from megatron_sed.calibration import calibrate_model
    from megatron_sed.checkpointing import single_process_group
    from megatron_sed.model import build_gpt_model

    args = argparse.Namespace(
        num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
        group_query_attention=False, num_query_groups=2, normalization="LayerNorm", swiglu=False,
        disable_bias_linear=False, seq_length=12, max_position_embeddings=12,
        position_embedding_type="rope", rotary_base=10000, untie_embeddings_and_output_weights=True,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
        vocab_size=64, padded_vocab_size=64, transformer_impl="local", device="cpu",
        hidden_dropout=0.5, attention_dropout=0.5,  # eval mode must switch these off
    )
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (6, 12), generator=g)
    batches = [{"tokens": tokens[i:i + 2], "position_ids": torch.arange(12).repeat(2, 1),
                "attention_mask": None, "labels": torch.roll(tokens[i:i + 2], -1, 1),
                "loss_mask": (torch.rand(2, 12, generator=g) > 0.4).float()} for i in (0, 2, 4)]
    with single_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            torch.manual_seed(0)
            model = build_gpt_model(args)
            with torch.no_grad():
                model.output_layer.weight.mul_(20)
            model.train()
            res = calibrate_model(model, batches, ratio=0.4, top_k=3, num_samples=5)
            assert model.training, "calibrate_model must restore train mode"
            model.eval()
            with torch.no_grad():
                logits = torch.cat([model(b["tokens"], b["position_ids"], None) for b in batches])
        finally:
            ps.destroy_model_parallel()
    mask = torch.cat([b["loss_mask"] for b in batches])[:5].bool()
    mass = torch.softmax(logits[:5].double(), -1).topk(3, -1).values.sum(-1)[mask]
    assert res.num_samples == 5 and res.num_tokens == int(mask.sum())
    assert res.tau == pytest.approx(float(np.quantile(mass.numpy(), 0.4)), abs=1e-5)


def test_ema_tracker():
    ema = ThresholdEMA(ratio=0.5, decay=0.75, tau=0.8)
    assert ema.update(torch.tensor([0.1, 0.2, 0.4])) == pytest.approx(0.75 * 0.8 + 0.25 * 0.2)
    assert ema.update(torch.zeros(0)) == pytest.approx(0.65)  # no supervised token: unchanged
    ema.update(torch.tensor([1.0, 1.0]))
    assert ema.tau == pytest.approx(0.75 * 0.65 + 0.25)
    resumed = ThresholdEMA(ratio=0.5, decay=0.75, tau=0.9)
    resumed.load_state_dict(ema.state_dict())
    batch = torch.tensor([0.3, 0.6])
    assert resumed.update(batch) == ema.update(batch)
    assert resumed.num_updates == 3
    # entropy mask: tracks the (1 - ratio) quantile, tau not limited to (0, 1]
    ent = ThresholdEMA(ratio=0.25, decay=0.0, tau=3.0, mask="entropy")
    assert ent.update(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(4.0)
    for bad in (dict(ratio=0.0, decay=0.5, tau=0.5), dict(ratio=0.3, decay=1.0, tau=0.5),
                dict(ratio=0.3, decay=0.5, tau=0.0), dict(ratio=0.3, decay=0.5, tau=0.5, mask="all")):
        with pytest.raises(ValueError):
            ThresholdEMA(**bad)


def _dist_worker(rank, world_size, ref_tau, num_tokens):
    import torch.distributed as dist

    # Megatron's layout (TP innermost) built directly with new_group: world 4 = TP 2 x DP 2.
    # (parallel_state would do the same but costs seconds of import per rank.)
    tp = 2 if world_size == 4 else 1
    tp_groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world_size, tp)]
    dp_groups = [dist.new_group(list(range(t, world_size, tp))) for t in range(tp)]
    tp_rank, tp_group = rank % tp, tp_groups[rank // tp]
    dp_group = dp_groups[tp_rank]
    dp_rank, dp_size = dist.get_rank(dp_group), dist.get_world_size(dp_group)

    res = calibrate_threshold(
        lambda b: b["logits"].contiguous(), _batches(dp_rank, dp_size, 3, tp_rank, tp),
        ratio=RATIO, top_k=TOPK, num_samples=NUM_SAMPLES, dp_group=dp_group,
        tp_group=tp_group,  # explicit, also at TP=1: None would import Megatron to look it up
    )
    assert abs(res.tau - ref_tau) <= 1e-6, (res.tau, ref_tau)
    assert res.num_tokens == num_tokens and res.num_samples == NUM_SAMPLES
    taus = [None] * world_size
    dist.all_gather_object(taus, res.tau)
    assert len(set(taus)) == 1, f"tau differs across ranks: {taus}"

    # Variable-length gather: rank r holds r+1 values (rank 0 may hold none in EMA steps).
    local = torch.arange(dp_rank * 10, dp_rank * 10 + dp_rank + 1, dtype=torch.float32) / 100
    everything = torch.cat([torch.arange(r * 10, r * 11 + 1, dtype=torch.float32) / 100 for r in range(dp_size)])
    tau, n, _ = threshold_from_masses(local, 0.3, dp_group)
    assert n == everything.numel() and tau == exact_quantile(everything, 0.3)

    ema = ThresholdEMA(ratio=0.3, decay=0.5, tau=1.0)
    empty_or_local = local if dp_rank else torch.zeros(0)
    expected = 0.5 + 0.5 * exact_quantile(everything[1:] if dp_size > 1 else everything, 0.3)
    if dp_size > 1:
        assert ema.update(empty_or_local, dp_group) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("world_size", [2, 4])
def test_calibration_distributed_equals_single_process(world_size):
    ref_tau, ref_mass = _reference_tau()
    run_distributed(_dist_worker, world_size, ref_tau, ref_mass.numel())
