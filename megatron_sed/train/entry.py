"""megatron-sed-train: Megatron's `pretrain()` with the SED-SFT plugin.

    torchrun --nproc-per-node 8 -m megatron_sed.train [Megatron-LM flags] --loss-type sed ...

On a machine without a GPU the CPU backend (megatron_sed.backend.cpu) is installed first,
so the same Megatron code (schedules, DDP, optimizers, checkpointing, logging) runs on
CPU tensors with gloo. Then Megatron parses the flags (plus megatron-sed's, see
megatron_sed.train.arguments) and `megatron.training.pretrain` runs with the plugin's
pieces: the model provider, the dataset provider, forward_step / loss_func, and the
--metrics-file observer. Nothing of Megatron's loop is reimplemented here.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Optional

from megatron_sed.backend import cpu as cpu_backend
from megatron_sed.utils import fallbacks


def _single_process_defaults() -> None:
    """`python -m megatron_sed.train` without torchrun/srun: a world of one on localhost."""
    if "MASTER_ADDR" in os.environ:
        return
    import socket  # noqa: PLC0415 (after the CPU backend is installed)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )


def run(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the flags and train (raises on bad flags: see megatron_sed.train.arguments)."""
    from megatron.core.enums import ModelType  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron.training import pretrain  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: PLC0415 (after the CPU backend is installed)

    from megatron_sed.train import megatron_fixes  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron_sed.train.arguments import parse_and_validate  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron_sed.train.data import check_tokenizer_matches_data, train_valid_test_datasets_provider  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron_sed.train.log_lines import install_log_line_fixes  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron_sed.train.metrics import install_metrics_observer  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron_sed.train.model_provider import model_provider  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron_sed.train.step import forward_step  # noqa: PLC0415 (after the CPU backend is installed)
    from megatron_sed.train.threshold import install_checkpoint_sync  # noqa: PLC0415 (after the CPU backend is installed)

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not cpu_backend.gpu_present():
        cpu_backend.install()
    _single_process_defaults()
    # Like Megatron: warnings and informational output from rank 0 only.
    if int(os.environ.get("RANK", "0")) != 0:
        import warnings  # noqa: PLC0415 (after the CPU backend is installed)

        warnings.filterwarnings("ignore")
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING, format="%(message)s"
    )
    from megatron_sed.flags import ArgumentError  # noqa: PLC0415 (after the CPU backend is installed)

    try:
        run(argv)
    except (ArgumentError, AssertionError, ValueError) as err:
        if not _is_argument_phase_error(err):
            raise
        print(f"megatron-sed-train: error: {_describe(err)}", file=sys.stderr)
        return 2
    return 0


def _describe(err: BaseException) -> str:
    """The message; for a bare `assert` (Megatron's validate_args has many) the failing
    check itself, file and line, so the user sees which condition the flags broke."""
    if str(err):
        return str(err)
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{type(err).__name__} in {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line}"


def _is_argument_phase_error(err: BaseException) -> bool:
    """Bad flags (ours, or Megatron's asserts in validate_args) before training started."""
    from megatron_sed.flags import ArgumentError  # noqa: PLC0415 (after the CPU backend is installed)

    if isinstance(err, ArgumentError):
        return True
    try:
        from megatron.training.global_vars import get_args  # noqa: PLC0415 (after the CPU backend is installed)

        get_args()
    except Exception:  # noqa: BLE001 - args not set yet: still parsing/validating
        return True
    return False
