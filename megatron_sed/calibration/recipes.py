"""How tau is calibrated from held-out samples (--sed-calibration): which statistic, over
which positions, and which order statistic.

authors     the SED-SFT authors' code (pppa2019/SED-SFT, train.py compute_cumsum_threshold):
            the top-k mass with k = --sed-calibration-top-k (their default 10, while their
            loss uses k = 2), at EVERY position of the first N held-out samples, unpacked
            (prompt, chat template and the position after the last token included), and
            tau = sorted(x)[-int(c * len(x))] with cumsum_ratio c = 1 - --sed-mask-ratio
            (their 0.7 is --sed-mask-ratio 0.3). The default: what a user reproducing the
            paper's numbers runs. The share of supervised tokens it regularises in
            training is not the ratio (measured on the add3 toy: 7.5% at ratio 0.3); the
            training log's `sed mask rate` shows it.
supervised  the statistic the loss masks with (same k, --sed-mask topk_mass or entropy)
            over the supervised tokens only, tau its linear-interpolation quantile: exactly
            a fraction --sed-mask-ratio of the held-out supervised tokens is regularised.
            What --sed-threshold-update ema tracks per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sed.calibration.quantile import authors_order_statistic, exact_quantile, quantile_level
from megatron_sed.flags import AUTHORS_CALIBRATION_TOP_K, RECIPES


@dataclass(frozen=True)
class CalibrationRecipe:
    name: str  # one of megatron_sed.flags.RECIPES
    top_k: int  # k of the calibration's top-k mass
    mask: str  # the statistic: "topk_mass" or "entropy"
    ratio: float  # --sed-mask-ratio

    @property
    def all_positions(self) -> bool:
        """Every position of the held-out samples, not only the supervised tokens."""
        return self.name == "authors"

    @property
    def positions(self) -> str:
        return "positions" if self.all_positions else "supervised tokens"

    def threshold(self, values: torch.Tensor) -> float:
        """tau from the statistic at every counted position of every rank (gathered)."""
        if values.numel() == 0:
            raise ValueError(f"cannot calibrate tau on zero {self.positions} (no supervised tokens?)")
        if self.name == "authors":
            return authors_order_statistic(values, self.ratio)
        return exact_quantile(values, quantile_level(self.mask, self.ratio))


def recipe_from_args(args) -> CalibrationRecipe:
    """The recipe the flags describe (namespaces without the newer flags: supervised, as
    megatron-sed < 0.2 calibrated)."""
    name = getattr(args, "sed_calibration", None) or "supervised"
    if name not in RECIPES:
        raise ValueError(f"--sed-calibration must be one of {', '.join(RECIPES)}, got {name!r}")
    k = getattr(args, "sed_calibration_top_k", None)
    if k is None:
        k = AUTHORS_CALIBRATION_TOP_K if name == "authors" else int(args.sed_top_k)
    return CalibrationRecipe(name=name, top_k=int(k), mask=args.sed_mask, ratio=float(args.sed_mask_ratio))
