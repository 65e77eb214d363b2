"""--sed-mask-ratio inside Megatron-LM's `pretrain_gpt.py`: tau before training.

Megatron-LM has no hook between building the model and the first training step, so the
threshold is resolved lazily, in the first `forward_step` (the patch calls
`install_sed_loss` there with pretrain_gpt's own `forward_step` and
`train_valid_test_datasets_provider`), by the model's megatron_sed.calibration.SEDRuntime
with the rule megatron-sed-train uses (megatron_sed.calibration.resolve_threshold):
explicit --sed-threshold; a resumed run's tau, read from the loaded checkpoint's args
(`sed_threshold_state`: Megatron-LM saves `args` with every checkpoint); or calibration,
`calibrate_in_pretrain_gpt`:

1. the validation dataset is built with Megatron-LM's own provider (so --data-path,
   --split, --sft, the tokenizer, ... mean what they mean for training);
2. the first --sed-calibration-samples rows run through pretrain_gpt's own
   `forward_step` in eval mode without gradients (TP broadcast, context-parallel slicing
   and packed sequences are pretrain_gpt's); rows are what its dataset yields: sequences
   of --seq-length tokens, several SFT samples each with --sft packing;
3. tau is the exact quantile over the supervised tokens, gathered over DP x CP
   (megatron_sed.calibration.loop, the loop megatron-sed-train uses).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Optional

import torch

from megatron_sed.calibration import CalibrationResult, calibrate_with_forward_step
from megatron_sed.calibration.recipes import recipe_from_args

# Megatron-LM's SFT dataset marks prompt targets with -100 (megatron.training.datasets.sft_dataset).
IGNORE_INDEX = -100

__all__ = ["calibrate_in_pretrain_gpt"]


class _EveryPosition(torch.utils.data.Dataset):
    """The authors' recipe on pretrain_gpt's dataset: the loss mask marks every position
    whose target is a token (supervised, or a prompt token: label -100), padding stays
    out. Rows are what that dataset yields: Megatron-LM's SFT dataset packs conversations
    into --seq-length rows, and the position after a row's last token has no target."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        item = dict(self.dataset[idx])
        labels = torch.as_tensor(item["labels"])
        mask = torch.as_tensor(item["loss_mask"])
        item["loss_mask"] = ((mask > 0) | (labels == IGNORE_INDEX)).to(mask.dtype)
        # The loss op zeroes the statistics of ignored labels: any valid id gives the
        # prompt positions theirs (the calibration forwards' loss is not used).
        item["labels"] = labels.clamp(min=0)
        return item


def calibrate_in_pretrain_gpt(
    args: argparse.Namespace,
    model,
    forward_step: Optional[Callable],
    datasets_provider: Optional[Callable],
) -> CalibrationResult:
    """tau from pretrain_gpt's own validation dataset and forward_step."""
    if forward_step is None or datasets_provider is None:
        raise ValueError(
            "--sed-mask-ratio needs the patched pretrain_gpt.py of this megatron-sed "
            "version (install_sed_loss(..., forward_step=..., datasets_provider=...)); "
            "re-apply scripts/apply_megatron_patch.sh or pass --sed-threshold"
        )

    every_position = recipe_from_args(args).all_positions

    def heldout(num_rows):
        # Ranks that hold no data (TP rank > 0) get None from Megatron's builder and receive
        # the batch from TP rank 0 inside forward_step.
        valid = datasets_provider([1, num_rows, 1])[1]
        return _EveryPosition(valid) if every_position and valid is not None else valid

    return calibrate_with_forward_step(args, model, forward_step, heldout)
