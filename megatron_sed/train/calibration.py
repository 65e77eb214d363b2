"""--sed-mask-ratio in megatron-sed-train: the held-out samples the calibration runs.

tau is decided in the first forward_step (Megatron's loop has no hook between loading the
checkpoint and the first step) by the run's megatron_sed.calibration.SEDRuntime, with the
rule the Megatron-LM glue uses too (megatron_sed.calibration.resolve_threshold). When it
calibrates, `calibrate_in_trainer` runs the validation split of the run's own data, one
sample per sequence (so that --sed-calibration-samples counts samples), through this
plugin's forward_step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_sed.calibration import CalibrationResult, calibrate_with_forward_step
from megatron_sed.calibration.recipes import recipe_from_args
from megatron_sed.train.data import build_datasets


class _EveryPosition(torch.utils.data.Dataset):
    """The authors' calibration positions: every position of each sample, prompt and
    template tokens and the position after its last token included (the loss mask marks
    them all; padding stays out)."""

    def __init__(self, dataset):
        self.dataset = dataset
        for part in getattr(dataset, "datasets", [dataset]):  # a blend's components
            part.final_position = True

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        item = dict(self.dataset[idx])
        item["loss_mask"] = (item["segment_ids"] >= 0).to(item["loss_mask"].dtype)
        return item


def calibrate_in_trainer(args, model, forward_step: Callable) -> CalibrationResult:
    """tau from the run's held-out samples through `forward_step` (the plugin's, bound to
    the runtime that is calibrating)."""
    every_position = recipe_from_args(args).all_positions

    def unpacked_heldout(num_rows):
        # One sample per row (so rows count samples), one pass: its length is the number
        # of held-out samples there are.
        valid = build_datasets(args, (1, None, 1), pack=False)[1]
        return _EveryPosition(valid) if every_position and valid is not None else valid

    return calibrate_with_forward_step(args, model, forward_step, unpacked_heldout)
