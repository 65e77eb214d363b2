"""The one checkpoint writer outside Megatron's training loop: the converter (a release
checkpoint), RL checkpoints and the test fixtures write through it, in the layout
Megatron's `save_checkpoint` writes with --ckpt-format torch_dist
(megatron_sed.checkpointing.layout), so Megatron's `load_checkpoint` (--load,
--pretrained-checkpoint, --finetune), eval, export and RL read them alike:

    SAVE/iter_NNNNNNN/ (or release/)        a dist checkpoint (torch_dist) of the state:
                                            the model's sharded state dict under "model",
                                            the common state beside it (Megatron's `args`,
                                            checkpoint_version, iteration, ...)
    SAVE/latest_checkpointed_iteration.txt  the iteration (or "release"), written last and
                                            atomically: a crash mid-save leaves the previous
                                            checkpoint the one that loads

The tensors are written synchronously (SyncTorchDistSaveStrategy: no CUDA, no async
writer), in the same files Megatron's own strategy writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_sed.checkpointing.layout import (
    CHECKPOINT_VERSION,
    RELEASE,
    TRACKER,
    CheckpointError,
    iteration_dir,
)
from megatron_sed.checkpointing.torch_dist_sync import SyncTorchDistSaveStrategy
from megatron_sed.utils.files import atomic_write_text

Tag = Union[int, str]  # an iteration, or RELEASE


def checkpoint_state(model: Optional[dict], args, iteration: int, **extra) -> dict:
    """The state Megatron's save_checkpoint writes (its generate_state_dict's keys that
    loaders read): `model` (the model's sharded state dict; None: no weights, args only),
    Megatron's `args`, checkpoint_version, iteration; `extra` entries beside them
    (readers that do not know them ignore them)."""
    state = dict(args=args, checkpoint_version=CHECKPOINT_VERSION, iteration=iteration, **extra)
    if model is not None:
        state["model"] = model
    return state


def checkpoint_dir(root: Union[str, os.PathLike], tag: Tag) -> Path:
    """SAVE/iter_NNNNNNN, or SAVE/release for Megatron's release tag."""
    return Path(root) / RELEASE if tag == RELEASE else iteration_dir(root, int(tag))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_checkpoint(root: Union[str, os.PathLike], tag: Tag, state: dict, sharded_strategy=None) -> Path:
    """Write `state` (see checkpoint_state) to SAVE/iter_NNNNNNN (tag: an iteration) or
    SAVE/release, then point the tracker at it; returns the checkpoint directory.

    Under torch.distributed every rank calls it with its shards (dist checkpointing's
    collective save); rank 0 makes the directory and writes the tracker. An existing
    non-empty checkpoint directory is never overwritten. `sharded_strategy`: a
    SyncTorchDistSaveStrategy (e.g. with a streaming planner); the default one otherwise."""
    out = checkpoint_dir(root, tag)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} already exists; refusing to overwrite it")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(state, str(out), sharded_strategy=sharded_strategy or SyncTorchDistSaveStrategy())
    _barrier()  # every rank's files are complete before the tracker names them
    if rank0:
        atomic_write_text(Path(root) / TRACKER, str(tag))  # what Megatron writes: the bare tag
    _barrier()
    return out
