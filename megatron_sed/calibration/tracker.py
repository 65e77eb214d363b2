"""--sed-threshold-update ema: tau follows the --sed-mask-ratio quantile of each global
batch (the plugin updates it after a training iteration's last micro-batch)."""

from __future__ import annotations

import torch

from megatron_sed.calibration.quantile import (
    QUANTILE_SIDE,
    exact_quantile,
    gather_variable_length,
    quantile_level,
)


class ThresholdEMA:
    """--sed-threshold-update ema: after each batch, re-estimate the `ratio` quantile of the
    top-k masses of that batch's supervised tokens (exact, gathered over DP) and track it:
    tau <- decay * tau + (1 - decay) * q_batch. The new tau applies from the next batch on
    (the current batch's mask was already computed with the old one). The state goes into
    the checkpoint so a resumed run continues the same trajectory."""

    def __init__(self, ratio: float, decay: float, tau: float, mask: str = "topk_mass"):
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
        self.tau = float(tau)
        self.num_updates = 0
        self.last_batch_quantile = float("nan")

    def update(self, local_masses: torch.Tensor, group=None) -> float:
        """Feed this rank's statistic of the batch's supervised tokens (every DP rank calls
        it: the quantile is over the union); returns the new tau."""
        everything = gather_variable_length(local_masses.detach().float().reshape(-1), group)
        if everything.numel() == 0:  # a batch without supervised tokens: nothing to learn
            return self.tau
        q = exact_quantile(everything, quantile_level(self.mask, self.ratio))
        self.last_batch_quantile = q
        tau = self.decay * self.tau + (1.0 - self.decay) * q
        if self.mask == "topk_mass":  # a valid probability threshold (masses are > 0 anyway)
            tau = min(1.0, max(1e-12, tau))
        self.tau = tau
        self.num_updates += 1
        return self.tau

    def state_dict(self) -> dict:
        return {"tau": self.tau, "ratio": self.ratio, "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.tau = float(state["tau"])
        self.ratio = float(state["ratio"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
