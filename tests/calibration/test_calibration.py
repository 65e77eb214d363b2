"""Threshold calibration (--sed-mask-ratio) and the EMA tracker.

The engine (megatron_sed.calibration.calibrate_with_forward_step) runs micro-batches
through a Megatron-style forward_step whose model computes SED (stats stashed, loss mask
in the returned partial): the quantile over masses gathered from DP ranks must equal the
single-process float64 quantile over the same samples (worlds 1, 2 and 4; world 4 also
shards the vocabulary with TP=2), and every rank runs the same number of forwards."""

import argparse
from functools import partial

import numpy as np
import pytest
import torch

from megatron_sed.calibration import (
    ThresholdEMA,
    calibrate_with_forward_step,
    exact_quantile,
    fraction_below,
    recipe_from_args,
    threshold_from_masses,
)
from megatron_sed.calibration.quantile import authors_order_statistic
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.compat

SEQ, VOCAB, TOPK, ROWS, NUM_SAMPLES, RATIO = 6, 16, 2, 24, 19, 0.3
AUTHORS_K = (
    5  # --sed-calibration-top-k here (their default 10 exceeds a TP-2 shard of this 16-token vocabulary)
)


def _dataset():
    """ROWS global rows: logits [ROWS, SEQ, VOCAB] fp32, labels and loss masks [ROWS, SEQ]."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(ROWS, SEQ, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    loss_mask = (torch.rand(ROWS, SEQ, generator=g) > 0.3).float()
    loss_mask[:, 0] = 0.0  # a "prompt" position
    return logits, labels, loss_mask


def _authors_reference(k=AUTHORS_K):
    """Their code: top-k mass at every position of the first NUM_SAMPLES rows (float64,
    full vocabulary), tau = sorted(x)[-int(0.7 * len(x))] in plain Python."""
    logits, _, _ = _dataset()
    p = torch.softmax(logits[:NUM_SAMPLES].double(), dim=-1)
    x = p.topk(k, dim=-1).values.sum(-1).reshape(-1).tolist()
    return sorted(x)[-int(0.7 * len(x))], len(x)


def _reference_tau():
    """float64 full-vocab top-k masses of the first NUM_SAMPLES rows, numpy's quantile."""
    logits, _, loss_mask = _dataset()
    p = torch.softmax(logits[:NUM_SAMPLES].double(), dim=-1)
    mass = p.topk(TOPK, dim=-1).values.sum(-1)[loss_mask[:NUM_SAMPLES].bool()]
    return float(np.quantile(mass.numpy(), RATIO)), mass


class _HeldOut(torch.utils.data.Dataset):
    """The first `rows` rows of the synthetic data, one sample per row, as a data set;
    the logits stand in for the model's output on that sample (this TP rank's shard)."""

    def __init__(self, rows=ROWS, tp_rank=0, tp_size=1, all_positions=False):
        self.logits, self.labels, self.loss_mask = _dataset()
        if all_positions:  # what the callers' held-out sets mark for the authors' recipe
            self.loss_mask = torch.ones_like(self.loss_mask)
        self.rows, self.shard = rows, slice(tp_rank * VOCAB // tp_size, (tp_rank + 1) * VOCAB // tp_size)

    def __len__(self):
        return self.rows

    def __getitem__(self, i):
        return {
            "logits": self.logits[i, :, self.shard],
            "labels": self.labels[i],
            "loss_mask": self.loss_mask[i],
        }


class _Model(torch.nn.Module):
    """Counts its forwards; records train/eval mode."""

    def __init__(self):
        super().__init__()
        self.calls = 0


def _forward_step(tp_group, top_k, data_iterator, model):
    """Megatron's forward_step contract with the SED loss on the batch's logits."""
    from megatron_sed import SEDConfig, vocab_parallel_sed_loss
    from megatron_sed.model.sed_route import SEDLossContext

    batch = next(data_iterator)
    model.calls += 1
    assert not model.training, "calibration must run the model in eval mode"
    logits = batch["logits"].transpose(0, 1).contiguous()  # [s, b, V/tp]
    cfg = SEDConfig(coef=1.0, top_k=top_k, threshold=0.5)
    loss, stats = vocab_parallel_sed_loss(logits, batch["labels"].t().contiguous(), cfg, tp_group=tp_group)
    ctx = SEDLossContext(cfg)
    ctx.record(stats)  # as the model's loss hook does; loss_func gets it with the loss
    return loss.t(), partial(lambda loss_mask, out, sed=None: None, batch["loss_mask"], sed=ctx)


def _args(**over):
    a = argparse.Namespace(
        sed_calibration_samples=NUM_SAMPLES,
        micro_batch_size=3,
        sed_mask="topk_mass",
        sed_mask_ratio=RATIO,
        sed_top_k=TOPK,
        sed_calibration="supervised",
        pipeline_model_parallel_size=1,
    )
    a.__dict__.update(over)
    return a


def _calibrate(args, tp_group=None, **heldout):
    model = _Model()
    model.train()
    recipe = recipe_from_args(args)  # the callers configure the forward with the recipe's k
    heldout.setdefault("all_positions", recipe.all_positions)
    res = calibrate_with_forward_step(
        args, model, partial(_forward_step, tp_group, recipe.top_k), lambda n: _HeldOut(**heldout)
    )
    assert model.training, "calibration must restore train mode"
    return res, model


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
        threshold_from_masses(v, 1.5)


def test_calibrate_single_process_and_too_few_samples():
    ref_tau, ref_mass = _reference_tau()
    res, model = _calibrate(_args())
    assert res.tau == pytest.approx(ref_tau, abs=1e-6)
    assert res.num_samples == NUM_SAMPLES and res.num_tokens == ref_mass.numel()
    assert abs(res.fraction_below - RATIO) <= 1.0 / ref_mass.numel() + 1e-9
    assert model.calls == 7  # ceil(19 / 3): the last micro-batch holds 1 counted row of 3
    assert "tau=" in res.log_line()
    with pytest.raises(ValueError, match="has 24"):
        _calibrate(_args(sed_calibration_samples=100))


def test_authors_order_statistic_is_their_code():
    g = torch.Generator().manual_seed(1)
    for n in (2, 3, 10, 1001):
        x = torch.rand(n, generator=g)
        x[: n // 3] = x[0]  # ties
        for ratio in (0.3, 0.05, 0.5):
            c = 1 - ratio
            assert authors_order_statistic(x, ratio) == sorted(x.double().tolist())[-int(c * n)]
    with pytest.raises(ValueError, match="more held-out positions"):
        authors_order_statistic(torch.tensor([0.5]), 0.3)  # int(0.7 * 1) = 0


def test_calibrate_authors_recipe():
    """Every position of the first --sed-calibration-samples rows, k = --sed-calibration-top-k,
    the authors' order statistic; the prompt positions (loss mask 0 in the data) count."""
    ref, n = _authors_reference()
    res, _ = _calibrate(_args(sed_calibration="authors", sed_calibration_top_k=AUTHORS_K))
    assert res.recipe == "authors" and res.top_k == AUTHORS_K and res.num_tokens == n == NUM_SAMPLES * SEQ
    assert res.tau == pytest.approx(ref, abs=1e-6)
    assert "authors' recipe: top-5 mass at all 114 positions of 19 held-out samples" in res.log_line()
    sup, _ = _calibrate(_args())
    assert sup.recipe == "supervised" and sup.num_tokens < n and sup.tau != res.tau


def test_entropy_mask_selects_the_top_ratio():
    """--sed-mask entropy regularises tokens ABOVE tau: tau is the (1 - ratio) quantile."""
    logits, _, loss_mask = _dataset()
    p = torch.softmax(logits[:NUM_SAMPLES].double(), dim=-1)
    ent = -(p * p.log()).sum(-1)[loss_mask[:NUM_SAMPLES].bool()]
    res, _ = _calibrate(_args(sed_mask="entropy"))
    assert res.tau == pytest.approx(float(np.quantile(ent.numpy(), 1 - RATIO)), abs=1e-5)
    assert abs(res.fraction_selected - RATIO) <= 1.0 / ent.numel() + 1e-9
    assert "entropy" in res.log_line()
    # the flags are checked once, before anything runs (megatron_sed.flags)
    from megatron_sed.flags import ArgumentError, add_sed_args, validate_sed_args

    flags = add_sed_args(argparse.ArgumentParser()).parse_args(
        ["--loss-type", "sed", "--sed-mask-ratio", "0.3"]
    )
    flags.pipeline_model_parallel_size = 2
    with pytest.raises(ArgumentError, match="last pipeline stage"):
        validate_sed_args(flags)


def _dist_worker(rank, world_size, ref_tau, num_tokens, authors_ref):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = 2 if world_size == 4 else 1
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    dp_group = ps.get_data_parallel_group()
    dp_rank, dp_size = dist.get_rank(dp_group), dist.get_world_size(dp_group)

    res, model = _calibrate(_args(), tp_group=tp_group, tp_rank=tp_rank, tp_size=tp)
    assert abs(res.tau - ref_tau) <= 1e-6, (res.tau, ref_tau)
    assert res.num_tokens == num_tokens and res.num_samples == NUM_SAMPLES
    # every DP rank runs ceil(19 / (dp * 3)) forwards, even with no counted row left
    assert model.calls == -(-NUM_SAMPLES // (dp_size * 3))
    taus = [None] * world_size
    dist.all_gather_object(taus, res.tau)
    assert len(set(taus)) == 1, f"tau differs across ranks: {taus}"

    # Variable-length gather: rank r holds r+1 values (rank 0 may hold none in EMA steps).
    local = torch.arange(dp_rank * 10, dp_rank * 10 + dp_rank + 1, dtype=torch.float32) / 100
    everything = torch.cat(
        [torch.arange(r * 10, r * 11 + 1, dtype=torch.float32) / 100 for r in range(dp_size)]
    )
    tau, n, _ = threshold_from_masses(local, 0.3, dp_group)
    assert n == everything.numel() and tau == exact_quantile(everything, 0.3)

    res, _ = _calibrate(
        _args(sed_calibration="authors", sed_calibration_top_k=AUTHORS_K),
        tp_group=tp_group,
        tp_rank=tp_rank,
        tp_size=tp,
    )
    assert abs(res.tau - authors_ref[0]) <= 1e-6 and res.num_tokens == authors_ref[1]

    # EMA (histogram quantile: within a bin of the exact one), rank 0 without tokens
    ema = ThresholdEMA(ratio=0.3, decay=0.5, tau=1.0)
    empty_or_local = local if dp_rank else torch.zeros(0)
    union = everything[1:] if dp_size > 1 else everything
    single = ThresholdEMA(ratio=0.3, decay=0.5, tau=1.0)
    if dp_size > 1:
        assert ema.update(empty_or_local, dp_group) == single.update(union)


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.world4)])
def test_calibration_distributed_equals_single_process(world_size):
    ref_tau, ref_mass = _reference_tau()
    run_distributed(_dist_worker, world_size, ref_tau, ref_mass.numel(), _authors_reference())


def _resolve_args(**kw):
    base = dict(
        loss_type="sed",
        sed_threshold=None,
        sed_mask_ratio=0.3,
        load=None,
        iteration=0,
        finetune=False,
    )
    return argparse.Namespace(**{**base, **kw})


def test_resolve_threshold_precedence(monkeypatch):
    """The one rule megatron-sed-train and the Megatron-LM glue share: CE -> none;
    --sed-threshold wins; a resumed run keeps the tau in the args of the checkpoint it
    loads (read from --load at --ckpt-step); a resumed run whose checkpoint has none stops;
    --finetune and fresh runs calibrate; else the default."""
    from megatron_sed.calibration import CalibrationResult, resolve, resolve_threshold
    from megatron_sed.flags import DEFAULT_SED_THRESHOLD

    calls, reads = [], []

    def calibrate():
        calls.append(1)
        return CalibrationResult(0.42, 0.3, 2, 8, 100, 0.3)

    checkpoints = {"ck": {"tau": 0.77, "source": "ema", "ema": {"tau": 0.77}}, "bare": None}

    def read_checkpoint_args(path, iteration=None):  # the checkpoint's saved args
        reads.append((path, iteration))
        return argparse.Namespace(sed_threshold_state=checkpoints[path])

    monkeypatch.setattr(resolve, "read_checkpoint_args", read_checkpoint_args)
    resumed = dict(load="ck", iteration=5, ckpt_step=3)

    args = _resolve_args(sed_threshold=0.5, **resumed)
    assert resolve_threshold(args, calibrate).tau == 0.5 and not calls
    assert args.sed_threshold_state["source"] == "--sed-threshold"

    args = _resolve_args(**resumed)
    state = resolve_threshold(args, calibrate)
    assert (state.tau, state.source, state.ema) == (0.77, "ema", {"tau": 0.77}) and not calls
    assert reads[-1] == ("ck", 3)

    with pytest.raises(ValueError, match="holds no SED threshold.*--sed-threshold.*--finetune"):
        resolve_threshold(_resolve_args(**{**resumed, "load": "bare"}), calibrate)

    reads.clear()
    args = _resolve_args(finetune=True, **resumed)
    state = resolve_threshold(args, calibrate)
    assert (state.tau, state.source, len(calls)) == (0.42, "calibrated", 1) and not reads
    assert args.sed_threshold_state["calibration"]["num_tokens"] == 100

    assert resolve_threshold(_resolve_args(), calibrate).tau == 0.42 and len(calls) == 2
    assert resolve_threshold(_resolve_args(sed_mask_ratio=None), calibrate).tau == DEFAULT_SED_THRESHOLD
    assert resolve_threshold(_resolve_args(loss_type="ce", **resumed), calibrate).source == "ce"
    assert len(calls) == 2 and not reads
