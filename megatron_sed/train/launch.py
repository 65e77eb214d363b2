"""Megatron's `pretrain()` with the plugin's pieces: the Megatron half of megatron-sed-train.

Importing this module imports megatron-core and megatron.training, so megatron_sed.train.entry
imports it only after installing the CPU backend (see there); everything Megatron-side of
the trainer is imported here, at the top, in one place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Optional

from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.global_vars import get_args

from megatron_sed import megatron_patches
from megatron_sed.backend import cpu as cpu_backend
from megatron_sed.calibration import SEDRuntime
from megatron_sed.train.arguments import add_trainer_args, parse_and_validate
from megatron_sed.train.data import check_tokenizer_matches_data, train_valid_test_datasets_provider
from megatron_sed.train.log_lines import ValidationLine, report_resident_memory
from megatron_sed.train.metrics import MetricsObserver
from megatron_sed.train.model_provider import model_provider
from megatron_sed.train.step import forward_step
from megatron_sed.utils import fallbacks


def run(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the flags and train (raises on bad flags: see megatron_sed.train.arguments)."""
    if int(os.environ.get("RANK", "0")) == 0:
        fallbacks.report()  # after megatron-core's imports: one line for their CPU warnings
    args = parse_and_validate(argv)
    check_tokenizer_matches_data(args)
    runtime = SEDRuntime(args)  # the run's tau, EMA tracker and calibration guard
    # Megatron's lines are printed by the last rank: it writes the --metrics-file
    last_rank = args.rank == args.world_size - 1
    metrics = MetricsObserver(args.metrics_file) if args.metrics_file and last_rank else None
    restore = megatron_patches.apply(
        args,
        runtime,
        trainer_args=add_trainer_args,
        validation_line=ValidationLine(),
        metrics=metrics,
        memory_report=report_resident_memory if cpu_backend.is_active() else None,
    )
    try:
        pretrain(
            pretrain_cfg_container_from_args(args),
            train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            partial(forward_step, runtime=runtime),
            model_provider=model_provider,
        )
    finally:
        restore()
        if metrics is not None:
            metrics.close()


def args_parsed() -> bool:
    """Whether Megatron has parsed and validated the flags (set its global args)."""
    try:
        get_args()
    except AssertionError:  # megatron.training's "args is not initialized"
        return False
    return True
