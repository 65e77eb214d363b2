"""Megatron's `pretrain()` with the plugin's pieces: the Megatron half of megatron-sed-train.

Importing this module imports megatron-core and megatron.training, so megatron_sed.train.entry
imports it only after installing the CPU backend (see there); everything Megatron-side of
the trainer is imported here, at the top, in one place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.global_vars import get_args

from megatron_sed.train import megatron_fixes
from megatron_sed.train.arguments import parse_and_validate
from megatron_sed.train.data import check_tokenizer_matches_data, train_valid_test_datasets_provider
from megatron_sed.train.log_lines import install_log_line_fixes
from megatron_sed.train.metrics import install_metrics_observer
from megatron_sed.train.model_provider import model_provider
from megatron_sed.train.step import forward_step
from megatron_sed.train.threshold import install_checkpoint_sync
from megatron_sed.utils import fallbacks


def run(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the flags and train (raises on bad flags: see megatron_sed.train.arguments)."""
    if int(os.environ.get("RANK", "0")) == 0:
        fallbacks.report()  # after megatron-core's imports: one line for their CPU warnings
    args = parse_and_validate(argv)
    check_tokenizer_matches_data(args)
    if args.rank == args.world_size - 1:
        install_metrics_observer(args.metrics_file)
    megatron_fixes.apply(args)
    install_log_line_fixes()
    install_checkpoint_sync()  # the EMA's device-side tau reaches the checkpoint's args
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )


def args_parsed() -> bool:
    """Whether Megatron has parsed and validated the flags (set its global args)."""
    try:
        get_args()
    except AssertionError:  # megatron.training's "args is not initialized"
        return False
    return True
