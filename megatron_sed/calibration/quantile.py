"""The quantile math of the SED threshold, exact under data parallelism.

tau is a quantile of a per-token statistic (the top-k mass for --sed-mask topk_mass,
the entropy for --sed-mask entropy) over tokens that live on different data-parallel
ranks. Every rank's values are all-gathered (variable lengths) and the quantile is taken
over the union, so the result is bit-identical to one process seeing all samples. The
values are small (4 bytes per token: 100 samples of 1k tokens = 400 kB), so no histogram
approximation is needed for calibration. Tensor-parallel ranks already hold identical
values (the loss op combines the vocab shards), so gathers run over the DP group only.

Quantile: linear interpolation between order statistics (numpy's default), in float64,
so the fraction of tokens strictly below tau is the level up to one token (plus ties);
sort + index rather than torch.quantile, which refuses > 16M values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_sed.ops.config import THRESHOLD_SIDE as QUANTILE_SIDE


def quantile_level(mask: str, ratio: float) -> float:
    """topk_mass regularises tokens BELOW tau (quantile `ratio`); entropy regularises tokens
    ABOVE tau (quantile 1 - ratio). Either way a fraction `ratio` is selected."""
    return ratio if QUANTILE_SIDE[mask] == "below" else 1.0 - ratio


def exact_quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor with linear interpolation (numpy's default method),
    computed in float64."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level must lie in [0, 1], got {q}")
    v = values.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        raise ValueError("cannot take a quantile of zero values (no supervised tokens?)")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("top-k masses contain NaN/inf: the model's logits are not finite")
    v, _ = torch.sort(v)
    pos = (v.numel() - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    frac = pos - lo
    return float(v[lo] + (v[hi] - v[lo]) * frac)


def authors_order_statistic(values: torch.Tensor, ratio: float) -> float:
    """The SED-SFT authors' threshold (pppa2019/SED-SFT, train.py compute_cumsum_threshold):
    with cumsum_ratio c = 1 - ratio, tau = sorted(x)[-int(c * N)], the value with int(c*N)
    values at or above it. Exactly their order statistic, including Python's index rule."""
    v = values.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("top-k masses contain NaN/inf: the model's logits are not finite")
    keep = int((1.0 - ratio) * v.numel())
    if keep < 1:
        raise ValueError(
            f"the authors' calibration keeps int({1.0 - ratio:g} * {v.numel()}) = {keep} positions "
            "above tau: give it more held-out positions (--sed-calibration-samples)"
        )
    v, _ = torch.sort(v)
    return float(v[-keep])


def fraction_below(values: torch.Tensor, tau: float) -> float:
    """Fraction of values strictly below tau: the share of tokens the SED mask would select."""
    v = values.reshape(-1)
    return float((v < tau).to(torch.float64).mean()) if v.numel() else float("nan")


def gather_variable_length(local: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather 1-D tensors of different lengths; returns their concatenation in rank
    order on every rank. No communication when torch.distributed is not initialised or the
    group has one rank."""
    local = local.reshape(-1)
    if not dist.is_available() or not dist.is_initialized():
        return local
    world = dist.get_world_size(group=group)
    if world == 1:
        return local
    size = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(bufs, sizes)])


def threshold_from_masses(local_values: torch.Tensor, level: float, group=None) -> tuple[float, int, float]:
    """tau = the `level` quantile of the values of all ranks of `group` (the DP group).
    Returns (tau, number of values, fraction of values below tau), identical on every rank."""
    everything = gather_variable_length(local_values.detach().float(), group)
    tau = exact_quantile(everything, level)
    return tau, int(everything.numel()), fraction_below(everything, tau)
