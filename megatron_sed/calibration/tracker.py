"""--sed-threshold-update ema: tau follows the --sed-mask-ratio quantile of each global
batch (the plugin updates it after a training iteration's last micro-batch).

Everything stays on the device: each micro-batch adds its supervised tokens' statistic
to a fixed-size histogram (megatron_sed.calibration.histogram, weighted by the loss mask:
no boolean indexing), the iteration's step is ONE all-reduce of that histogram over the
data-parallel group, and the quantile and the EMA are tensor math. tau is a 0-dim
float64 tensor that the SED op compares against directly (SEDConfig accepts it), updated
in place. The host reads it only through `state_dict()`: when a checkpoint is saved and
at Megatron's log interval (megatron_sed.calibration.runtime)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_sed.calibration import histogram
from megatron_sed.calibration.quantile import QUANTILE_SIDE, quantile_level


class ThresholdEMA:
    """After each batch, estimate the `ratio` quantile of the batch's supervised tokens'
    statistic (the top-k mass, or the entropy) over every DP rank, and track it:
    tau <- decay * tau + (1 - decay) * q_batch (tau clamped to (0, 1] for the top-k
    mass). The new tau applies from the next batch on (the current batch's mask was
    computed with the old one); a batch without supervised tokens leaves tau unchanged.
    The state goes into the checkpoint so a resumed run continues the same trajectory
    bit for bit (tau is float64 and survives the round trip through a Python float)."""

    def __init__(self, ratio: float, decay: float, tau: float, mask: str = "topk_mass", device=None):
        if mask not in QUANTILE_SIDE:
            raise ValueError(
                f"--sed-threshold-update ema needs --sed-mask topk_mass or entropy, got {mask!r}"
            )
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"--sed-mask-ratio must lie in (0, 1), got {ratio}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--sed-threshold-ema must lie in [0, 1), got {decay}")
        if mask == "topk_mass" and not 0.0 < tau <= 1.0:
            raise ValueError(f"initial tau must lie in (0, 1], got {tau}")
        self.mask = mask
        self.ratio = float(ratio)
        self.decay = float(decay)
        f64 = dict(dtype=torch.float64, device=device)
        self.tau_tensor = torch.tensor(float(tau), **f64)  # what SEDConfig.threshold holds
        self.num_updates_tensor = torch.zeros((), dtype=torch.int64, device=device)
        self.last_batch_quantile_tensor = torch.tensor(float("nan"), **f64)
        self._hist = torch.zeros(histogram.NUM_BINS, **f64)

    # -- device side (no host syncs) ---------------------------------------------------

    def observe(self, values: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        """Add a micro-batch's statistic (any shape) with its loss-mask `weights`."""
        values = values.detach()
        if weights is None:
            weights = torch.ones_like(values, dtype=torch.float64)
        histogram.accumulate(
            self._hist, values.to(self._hist.device), weights.to(self._hist.device), self.mask
        )

    def step(self, group=None) -> torch.Tensor:
        """End of the batch: one all-reduce of the histogram over `group` (every DP rank
        calls it), quantile, EMA; returns the (updated in place) tau tensor."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1:
            dist.all_reduce(self._hist, group=group)
        q, total = histogram.quantile(self._hist, quantile_level(self.mask, self.ratio), self.mask)
        has = total > 0
        tau = self.decay * self.tau_tensor + (1.0 - self.decay) * q
        if self.mask == "topk_mass":  # a valid probability threshold (masses are > 0 anyway)
            tau = tau.clamp(1e-12, 1.0)
        self.tau_tensor.copy_(torch.where(has, tau, self.tau_tensor))
        self.last_batch_quantile_tensor.copy_(torch.where(has, q, self.last_batch_quantile_tensor))
        self.num_updates_tensor.add_(has.to(torch.int64))
        self._hist.zero_()
        return self.tau_tensor

    # -- host side (syncs: checkpoints, logs, tests) -------------------------------------

    def update(self, values: torch.Tensor, group=None, weights: Optional[torch.Tensor] = None) -> float:
        """observe + step for one batch; returns tau as a float (a host sync)."""
        self.observe(values, weights)
        self.step(group)
        return self.tau

    @property
    def tau(self) -> float:
        return float(self.tau_tensor)

    @property
    def num_updates(self) -> int:
        return int(self.num_updates_tensor)

    @property
    def last_batch_quantile(self) -> float:
        return float(self.last_batch_quantile_tensor)

    def state_dict(self) -> dict:
        return {"tau": self.tau, "ratio": self.ratio, "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.tau_tensor.fill_(float(state["tau"]))
        self.ratio = float(state["ratio"])
        self.decay = float(state["decay"])
        self.num_updates_tensor.fill_(int(state["num_updates"]))
