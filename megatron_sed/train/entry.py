"""megatron-sed-train: Megatron's `pretrain()` with the SED-SFT plugin.

    torchrun --nproc-per-node 8 -m megatron_sed.train [Megatron-LM flags] --loss-type sed ...

On a machine without a GPU the CPU backend (megatron_sed.backend.cpu) is installed first,
so the same Megatron code (schedules, DDP, optimizers, checkpointing, logging) runs on
CPU tensors with gloo. Then megatron_sed.train.launch runs: Megatron parses the flags (plus
megatron-sed's, see megatron_sed.train.arguments) and `megatron.training.pretrain` runs
with the plugin's pieces: the model provider, the dataset provider, forward_step /
loss_func, and the --metrics-file observer. Nothing of Megatron's loop is reimplemented
here. This module sets up the process and turns bad flags into an error line, exit 2.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Optional

from megatron_sed.backend import cpu as cpu_backend
from megatron_sed.flags import ArgumentError


def _single_process_defaults() -> None:
    """`python -m megatron_sed.train` without torchrun/srun: a world of one on localhost."""
    if "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not cpu_backend.gpu_present():
        cpu_backend.install()
    _single_process_defaults()
    # Like Megatron: warnings and informational output from rank 0 only.
    if int(os.environ.get("RANK", "0")) != 0:
        warnings.filterwarnings("ignore")
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING, format="%(message)s"
    )
    # The one deferred import. launch imports megatron-core and megatron.training, which
    # must come after the set-up above: the CPU backend in place before any of Megatron's
    # code runs, warnings off on ranks other than 0 before Megatron's import-time ones, and
    # our logging format before megatron.training's own logging.basicConfig at import
    # (which would otherwise win: "INFO:megatron.core....:" on every line of Megatron's).
    from megatron_sed.train import launch  # noqa: PLC0415

    try:
        launch.run(argv)
    except (ArgumentError, AssertionError, ValueError) as err:
        if not isinstance(err, ArgumentError) and launch.args_parsed():
            raise  # Megatron had accepted the flags: a failure in training, not bad flags
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
