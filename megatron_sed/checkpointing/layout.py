"""Where things live in a Megatron checkpoint directory, in one place: the trainer, the
converter, eval and export all read and write through these names.

A save directory (--save / --load), Megatron-LM's layout:

    SAVE/
      latest_checkpointed_iteration.txt   the iteration to resume from, or "release"
      iter_0000100/                       a Megatron-Core dist checkpoint (torch_dist):
                                          .metadata, __<rank>_<n>.distcp, metadata.json;
                                          the non-tensor "common" state (Megatron's `args`,
                                          iteration, scheduler, ...) inside the .distcp files
                                          (megatron-core >= 0.19) or in common.pt (older)

A converted HF model (megatron_sed.convert) is a save directory too:

    OUT/
      latest_checkpointed_iteration.txt   "release" (Megatron-LM's marker for converted
                                          weights: load them, start at iteration 0)
      release/                            Megatron-Core dist checkpoint (torch_dist):
                                          .metadata, __0_0.distcp, common.pt, metadata.json
      megatron_sed_model.json             model shape, Megatron args, source HF config
      hf/                                 the source's tokenizer + chat template files,
                                          config.json and generation_config.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version (common.pt)
RELEASE = "release"
MODEL_METADATA = "megatron_sed_model.json"
HF_ASSETS = "hf"


class CheckpointError(ValueError):
    """A model folder or checkpoint that cannot be used (missing, truncated or mismatched
    files / tensors); the message says which and why."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{int(iteration):07d}"


def read_tracker(root: str | os.PathLike) -> Optional[str]:
    """The tracker's content ("release" or an iteration number as text), None without one."""
    tracker = Path(root) / TRACKER
    return tracker.read_text().strip() if tracker.is_file() else None


def has_checkpoint(root: str | os.PathLike | None) -> bool:
    return bool(root) and (Path(root) / TRACKER).is_file()


def resolve_dist_ckpt_dir(
    path: str | os.PathLike, iteration: Optional[int] = None, flag: str = "--ckpt-step"
) -> Path:
    """The directory holding `.metadata` for a --load style path: a save dir with a
    tracker file (-> release/ or iter_NNNNNNN/), or the checkpoint directory itself.

    The one resolver of checkpoint paths (training's checkpoint args, calibration, the
    converter and the evaluator's --load/--iteration). `iteration` (Megatron's
    --ckpt-step, the evaluator's --iteration: `flag` names it in errors) picks
    iter_NNNNNNN of a save dir instead of the tracker's; given, it is never ignored."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if iteration is not None:
        sub = iteration_dir(path, int(iteration))
        if (sub / ".metadata").is_file():
            return sub
        raise FileNotFoundError(f"{flag} {iteration}: {sub} is not a torch_dist checkpoint")
    if (path / ".metadata").is_file():
        return path
    tracker = path / TRACKER
    tag = read_tracker(path)
    if tag is not None:
        try:
            sub = path / RELEASE if tag == RELEASE else iteration_dir(path, int(tag))
        except ValueError:
            raise ValueError(f"{tracker} holds {tag!r}, not an iteration number") from None
        if (sub / ".metadata").is_file():
            return sub
        raise FileNotFoundError(
            f"{tracker} points to {sub}, which is not a torch_dist "
            "checkpoint (no .metadata file: an interrupted save?)"
        )
    raise FileNotFoundError(
        f"{path} is neither a torch_dist checkpoint (no .metadata) nor a Megatron save "
        f"directory (no {TRACKER})"
    )


def read_common_state(ckpt_dir: str | os.PathLike) -> dict:
    """The non-tensor state of a dist checkpoint directory (Megatron's `args`, iteration,
    ...), in either layout; Megatron `args` stored as a dict become a Namespace."""

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir} is not a torch_dist checkpoint (no .metadata)")
    try:
        if (ckpt_dir / "common.pt").is_file():  # megatron-core < 0.19 layout
            state = torch.load(ckpt_dir / "common.pt", map_location="cpu", weights_only=False)
        else:
            state = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    except Exception as err:  # noqa: BLE001 - corrupt files or pickled classes we lack
        raise CheckpointError(
            f"cannot read the common state of {ckpt_dir}: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt_dir}: unexpected common state {type(state).__name__}")
    if isinstance(state.get("args"), dict):
        state["args"] = argparse.Namespace(**state["args"])
    return state


def read_checkpoint_args(path: str | os.PathLike, iteration: Optional[int] = None):
    """Megatron's `args` saved with the checkpoint of a --load style path (None if none);
    `iteration` is Megatron's --ckpt-step, which its loader reads as unset when 0."""
    args = read_common_state(resolve_dist_ckpt_dir(path, iteration or None)).get("args")
    return args if args is not None and hasattr(args, "__dict__") else None


def find_model_metadata(path: str | os.PathLike) -> Optional[dict]:
    """The converter's metadata for a --load path (save dir or checkpoint dir), or None
    for checkpoints written by something else (e.g. Megatron-LM)."""
    path = Path(path)
    for d in (path, path.parent):
        f = d / MODEL_METADATA
        if f.is_file():
            meta = json.loads(f.read_text())
            meta["_root"] = str(d)
            return meta
    return None
