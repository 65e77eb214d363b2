"""A fixed-size, log-spaced histogram of the SED mask statistic: the EMA tracker's
quantile without host syncs and with one all-reduce of a few kB per iteration.

The statistic is mapped to u, increasing in it and spread over many decades:

- top-k mass m in (0, 1]: u = -log(1 - m). The masses that matter crowd below 1
  (0.9, 0.99, 0.999 ...); u spreads them evenly on a log axis (m = 1 is u = inf, the
  last bin);
- entropy H >= 0 nats: u = H.

NUM_BINS bins of log(u) span [U_LO, U_HI) (values outside fall into the first / last
bin). Each bin is U_STEP = ln(U_HI / U_LO) / NUM_BINS ~ 0.36% wide in relative terms;
inside a bin the CDF is interpolated linearly in log(u). The fraction of tokens the
resulting tau selects then differs from the requested ratio by at most the weight of the
one bin tau falls in (the exact quantile has the same error where values tie), i.e.
well under 1 percentage point for any spread-out distribution
(tests/calibration/test_histogram.py checks random and skewed ones against
megatron_sed.calibration.quantile.exact_quantile).

The all-reduce is NUM_BINS float64 = 64 kB. Counts are float64 sums of the loss-mask weights (exact for 0/1 weights up to 2^53
tokens), accumulated with index_add_: no boolean indexing, no data-dependent shapes.
"""

from __future__ import annotations

import math

import torch

NUM_BINS = 8192
U_LO, U_HI = 1e-12, 64.0
LOG_LO = math.log(U_LO)
U_STEP = (math.log(U_HI) - LOG_LO) / NUM_BINS


def to_u(values: torch.Tensor, mask: str) -> torch.Tensor:
    v = values.to(torch.float64)
    return -torch.log1p(-v) if mask == "topk_mass" else v


def from_u(u: torch.Tensor, mask: str) -> torch.Tensor:
    return -torch.expm1(-u) if mask == "topk_mass" else u


def accumulate(hist: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, mask: str) -> None:
    """hist[bin(v)] += w for every value (any shape; `weights` the same shape, e.g. the
    loss mask). Non-finite statistics (a NaN logit) get weight 0."""
    v = values.reshape(-1)
    w = weights.reshape(-1).to(torch.float64) * torch.isfinite(v).to(torch.float64)
    u = torch.nan_to_num(to_u(v, mask), nan=U_LO, posinf=U_HI, neginf=U_LO)
    pos = (torch.log(u.clamp(U_LO, U_HI)) - LOG_LO) / U_STEP
    idx = pos.floor().clamp_(0, NUM_BINS - 1).to(torch.int64)
    hist.index_add_(0, idx, w)


def quantile(hist: torch.Tensor, level: float, mask: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the `level` quantile of the histogrammed statistic, the total weight), both 0-dim
    float64 tensors on hist's device; the quantile is meaningless where total == 0."""
    cdf = torch.cumsum(hist, dim=0)
    total = cdf[-1]
    t = (total * level).reshape(1)
    i = torch.searchsorted(cdf, t).clamp_(0, NUM_BINS - 1)  # first bin with cdf >= t
    count = hist.gather(0, i)
    below = cdf.gather(0, i) - count
    frac = ((t - below) / count.clamp_min(1e-300)).clamp_(0.0, 1.0)
    log_u = LOG_LO + (i.to(torch.float64) + frac) * U_STEP
    return from_u(torch.exp(log_u), mask).reshape(()), total
