"""The EMA tracker's histogram quantile against the exact one, its one all-reduce under
data parallelism, and the tracker's EMA semantics."""

from __future__ import annotations

import pytest
import torch

from megatron_sed.calibration import ThresholdEMA, histogram
from megatron_sed.calibration.quantile import exact_quantile, quantile_level
from tests.helpers.dist import run_distributed


def _distributions():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    u = torch.rand(n, generator=g, dtype=torch.float64)
    yield "topk_mass", "uniform", u.clamp_min(1e-6)
    yield "topk_mass", "near one", 1.0 - 10.0 ** (-6.0 * u)  # 0 .. 0.999999, log-uniform gap
    yield "topk_mass", "beta-like", u**0.05  # most mass just below 1
    yield "topk_mass", "with exact ones", torch.where(u < 0.3, torch.ones_like(u), u**0.2)
    yield "entropy", "exponential", -torch.log(u.clamp_min(1e-12)) * 0.7
    yield "entropy", "lognormal", torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 2.0 - 1.0)
    yield "entropy", "near zero", u**8 * 1e-3


def _mask_rate(values32: torch.Tensor, tau: torch.Tensor, mask: str) -> float:
    # the SED op compares float32 statistics with tau (partials.combine_partials)
    sel = values32 < tau if mask == "topk_mass" else values32 > tau
    return float(sel.double().mean())


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.9])
def test_histogram_tau_selects_the_ratio_within_one_point(ratio):
    for mask, name, values in _distributions():
        v32 = values.float()
        hist = torch.zeros(histogram.NUM_BINS, dtype=torch.float64)
        histogram.accumulate(hist, v32, torch.ones_like(v32), mask)
        tau, total = histogram.quantile(hist, quantile_level(mask, ratio), mask)
        assert float(total) == v32.numel()
        exact = exact_quantile(v32, quantile_level(mask, ratio))
        rate = _mask_rate(v32, tau, mask)
        exact_rate = _mask_rate(v32, torch.tensor(exact), mask)
        if name == "with exact ones" and ratio > 0.7:  # 30% ties at 1.0: no tau can split them
            assert abs(rate - exact_rate) <= 0.01, (name, ratio, rate, exact_rate)
            continue
        assert abs(rate - ratio) <= 0.01, (mask, name, ratio, rate, float(tau), exact)


def test_loss_mask_weights_replace_boolean_indexing():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(64, 4, generator=g)
    keep = torch.rand(64, 4, generator=g) < 0.6
    a = torch.zeros(histogram.NUM_BINS, dtype=torch.float64)
    b = torch.zeros_like(a)
    histogram.accumulate(a, values, keep.float(), "topk_mass")
    histogram.accumulate(b, values[keep], torch.ones(int(keep.sum())), "topk_mass")
    assert torch.equal(a, b)
    nan = values.clone()
    nan[0, 0] = float("nan")
    c = torch.zeros_like(a)
    histogram.accumulate(c, nan, torch.ones_like(nan), "topk_mass")
    assert float(c.sum()) == nan.numel() - 1  # a NaN statistic is left out


def test_ema_tracker():
    ema = ThresholdEMA(ratio=0.5, decay=0.75, tau=0.8)
    q = exact_quantile(torch.tensor([0.1, 0.2, 0.4]), 0.5)
    assert ema.update(torch.tensor([0.1, 0.2, 0.4])) == pytest.approx(0.75 * 0.8 + 0.25 * q, abs=2e-3)
    tau1 = ema.tau
    assert ema.update(torch.zeros(0)) == tau1  # no supervised token: unchanged
    assert ema.update(torch.tensor([0.3, 0.9]), weights=torch.zeros(2)) == tau1  # all masked out
    assert ema.num_updates == 1
    ema.update(torch.tensor([1.0, 1.0]))
    assert ema.tau == pytest.approx(0.75 * tau1 + 0.25)
    resumed = ThresholdEMA(ratio=0.5, decay=0.75, tau=0.9)
    resumed.load_state_dict(ema.state_dict())
    batch = torch.tensor([0.3, 0.6])
    assert resumed.update(batch) == ema.update(batch)  # bit-exact after a round trip
    assert resumed.num_updates == 3
    # entropy mask: tracks the (1 - ratio) quantile, tau not limited to (0, 1]
    ent = ThresholdEMA(ratio=0.25, decay=0.0, tau=3.0, mask="entropy")
    assert ent.update(torch.arange(1.0, 401.0) / 80) == pytest.approx(3.75, rel=1e-2)
    for bad in (
        dict(ratio=0.0, decay=0.5, tau=0.5),
        dict(ratio=0.3, decay=1.0, tau=0.5),
        dict(ratio=0.3, decay=0.5, tau=0.0),
        dict(ratio=0.3, decay=0.5, tau=0.5, mask="all"),
    ):
        with pytest.raises(ValueError):
            ThresholdEMA(**bad)


def _union():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(1000 + 700 * r, generator=g) ** 0.3 for r in range(2)]


def _dp_worker(rank, world_size):
    import torch.distributed as dist

    calls = []
    plain = dist.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return plain(*a, **k)

    dist.all_reduce = counting
    try:
        ema = ThresholdEMA(ratio=0.3, decay=0.5, tau=1.0)
        local = _union()[rank]
        half = local.numel() // 2  # two micro-batches, then one step
        ema.observe(local[:half])
        ema.observe(local[half:])
        tau = ema.step().clone()
    finally:
        dist.all_reduce = plain
    assert len(calls) == 1, calls
    single = ThresholdEMA(ratio=0.3, decay=0.5, tau=1.0)
    single.observe(torch.cat(_union()))
    assert torch.equal(tau, single.step()), (tau, single.tau_tensor)
    taus = [torch.zeros((), dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(taus, tau)
    assert torch.equal(taus[0], taus[1])


@pytest.mark.compat
def test_one_all_reduce_gives_every_rank_the_single_process_tau():
    run_distributed(_dp_worker, 2)
