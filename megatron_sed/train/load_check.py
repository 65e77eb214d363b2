"""What --load (and --pretrained-checkpoint) will read, checked before Megatron runs.

Megatron starts from random weights, with one WARNING in a long log, whenever the load
directory has no `latest_checkpointed_iteration.txt`; that is right for an empty or
missing directory (`--load` = `--save` on a job's first run) and a silent disaster for
anything else: a Megatron-Bridge save, a Hugging Face folder, the parent of the save
directory, a half-copied directory. A torch-format save and a truncated shard end in a
traceback deep inside the load. Here every rank looks at the directory first and raises
ArgumentError (exit 2, no traceback) saying what it found and what to do:

- a non-empty directory without a checkpoint Megatron would load: what is there, and
  how to convert it (Megatron-Bridge, HF) or which path was meant;
- the tracker (or --ckpt-step) names a checkpoint that is missing or is not torch_dist
  (Megatron-LM's torch format: how to get torch_dist);
- a shard (or `.metadata`) of that checkpoint shorter than its `.metadata` says: the
  file, the iteration, and the previous complete checkpoint (--ckpt-step N).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint import FileSystemReader

from megatron_sed.checkpointing.layout import RELEASE, TRACKER, iteration_dir, read_tracker
from megatron_sed.flags import ArgumentError

_ITER = re.compile(r"^iter_(\d{7})$")
BRIDGE_FILES = ("latest_train_state.pt", "run_config.yaml", "train_state.pt")


def incomplete_file(ckpt_dir: Path) -> Optional[str]:
    """Why the torch_dist checkpoint in ckpt_dir cannot be read whole (a file missing or
    shorter than `.metadata` says), or None when every shard is complete."""
    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as err:  # noqa: BLE001 - a truncated or garbled .metadata
        return f"{ckpt_dir / '.metadata'} cannot be read ({type(err).__name__})"
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for name, end in sorted(need.items()):
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size < end:
            return f"{path} holds {size} bytes, its .metadata expects at least {end}"
    return None


def _iterations(root: Path) -> list[int]:
    found = (_ITER.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def _complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / ".metadata").is_file() and incomplete_file(ckpt_dir) is None


def _previous_complete(root: Path, below: Optional[int]) -> str:
    for it in reversed(_iterations(root)):
        if (below is None or it < below) and _complete(iteration_dir(root, it)):
            return f"resume from the previous complete checkpoint with --ckpt-step {it}"
    return "there is no earlier complete checkpoint in it"


def _foreign(root: Path, flag: str) -> str:
    """What a directory without a tracker holds, and what to do with it."""
    names = sorted(os.listdir(root))
    shown = ", ".join(n + ("/" if (root / n).is_dir() else "") for n in names[:8])
    found = f"found {shown}{', ...' if len(names) > 8 else ''}"
    m = _ITER.match(root.name)
    if (root / ".metadata").is_file() and m:
        return f"{found}: one checkpoint of a save directory; pass {flag} {root.parent} --ckpt-step {int(m.group(1))}"
    nested = [p for p in sorted(root.iterdir()) if p.is_dir() and (p / TRACKER).is_file()]
    if nested:
        return f"{found}; {nested[0]} is a save directory: did you mean {flag} {nested[0]}?"
    if any((root / n).exists() for n in BRIDGE_FILES) or any(
        (root / n / "run_config.yaml").is_file() for n in names
    ):
        return (
            f"{found}: a Megatron-Bridge save, which megatron-sed-train does not read. Export "
            "it to a Hugging Face folder with Megatron-Bridge (AutoBridge.export_ckpt) and "
            "convert that with `megatron-sed-convert hf-to-mcore --hf HF_FOLDER --out CKPT`, "
            "then pass --pretrained-checkpoint CKPT"
        )
    if (root / "config.json").is_file() and any(n.endswith((".safetensors", ".bin")) for n in names):
        return (
            f"{found}: a Hugging Face model folder. Convert it with `megatron-sed-convert "
            f"hf-to-mcore --hf {root} --out CKPT`, then pass --pretrained-checkpoint CKPT"
        )
    its = _iterations(root)
    if its:
        good = [it for it in its if _complete(iteration_dir(root, it))]
        pick = f"pass --ckpt-step {good[-1]} (its latest complete checkpoint)" if good else "none is complete"
        return f"{found}: checkpoints without their {TRACKER} (a half-copied save?); {pick}"
    return (
        f"{found}. Pass the directory a run saved to (--save), the output of "
        "`megatron-sed-convert hf-to-mcore`, or an empty or new directory to start fresh"
    )


def _interrupted_first_save(root: Path) -> bool:
    """Only iter_* directories, none complete: what a job killed in its first save leaves."""
    entries = list(root.iterdir())
    return all(p.is_dir() and _ITER.match(p.name) for p in entries) and not any(_complete(p) for p in entries)


def _torch_format(ckpt_dir: Path) -> bool:
    return any(p.name.startswith("mp_rank_") for p in ckpt_dir.iterdir() if p.is_dir())


def check_checkpoint_dir(path: Optional[str], flag: str, ckpt_step: Optional[int]) -> None:
    """Raise ArgumentError unless `path` is missing, empty, or holds a complete torch_dist
    checkpoint where its tracker (or --ckpt-step) points."""
    if not path:
        return
    root = Path(path)
    if not root.exists():
        return  # a first run: Megatron starts fresh and --save creates it
    if not root.is_dir():
        raise ArgumentError(f"{flag} {path} is a file; pass a checkpoint directory")
    if not any(root.iterdir()):
        return
    tag = read_tracker(root)
    if tag is None and not ckpt_step and _interrupted_first_save(root):
        return  # a job killed during its first save, requeued: Megatron starts it afresh
    if tag is None and not ckpt_step:
        raise ArgumentError(
            f"{flag} {path} holds no checkpoint ({TRACKER} is missing): {_foreign(root, flag)}"
        )
    if ckpt_step:
        iteration: Optional[int] = int(ckpt_step)
        sub, what = iteration_dir(root, iteration), f"--ckpt-step {ckpt_step}"
    elif tag == RELEASE:
        iteration, sub, what = None, root / RELEASE, f"{root / TRACKER} ('release')"
    else:
        try:
            iteration = int(tag)
        except ValueError:
            raise ArgumentError(f"{root / TRACKER} holds {tag!r}, not an iteration number") from None
        sub, what = iteration_dir(root, iteration), f"{root / TRACKER} (iteration {iteration})"
    if not sub.is_dir():
        raise ArgumentError(
            f"{what} names {sub}, which does not exist (a half-copied save?): "
            f"{_previous_complete(root, iteration)}"
        )
    if not (sub / ".metadata").is_file():
        if _torch_format(sub):
            raise ArgumentError(
                f"{sub} is a torch-format checkpoint (mp_rank_*/model_optim_rng.pt: Megatron-LM's "
                "--ckpt-format torch, as its tools/checkpoint converter writes it); "
                "megatron-sed-train reads torch_dist. Convert it with Megatron-LM: "
                f"`pretrain_gpt.py MODEL_FLAGS --load {root} --ckpt-format torch "
                "--ckpt-convert-format torch_dist --ckpt-convert-save NEW_DIR` writes "
                f"NEW_DIR/torch_dist; pass that to {flag}"
            )
        raise ArgumentError(
            f"{what} names {sub}, which is not a torch_dist checkpoint (no .metadata: "
            f"an interrupted save or a partial copy?): {_previous_complete(root, iteration)}"
        )
    problem = incomplete_file(sub)
    if problem is not None:
        at = f"iteration {iteration}" if iteration is not None else "the release checkpoint"
        raise ArgumentError(
            f"the checkpoint of {at} in {root} is incomplete: {problem} (a save interrupted "
            f"by a full disk or a partial copy?): {_previous_complete(root, iteration)}"
        )


def check_load_dirs(args) -> None:
    """--load, then --pretrained-checkpoint (Megatron's fine-tuning source)."""
    step = getattr(args, "ckpt_step", None)
    check_checkpoint_dir(getattr(args, "load", None), "--load", step)
    check_checkpoint_dir(getattr(args, "pretrained_checkpoint", None), "--pretrained-checkpoint", None)
