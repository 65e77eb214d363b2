"""Where things live in a converted checkpoint, and atomic creation of output folders.

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

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
MODEL_METADATA = "megatron_sed_model.json"
HF_ASSETS = "hf"


def resolve_dist_ckpt_dir(path: str | os.PathLike) -> Path:
    """The directory holding `.metadata` for a --load style path: a save dir with a
    tracker file (-> release/ or iter_NNNNNNN/), or the checkpoint directory itself."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        tag = tracker.read_text().strip()
        try:
            sub = path / (RELEASE if tag == RELEASE else f"iter_{int(tag):07d}")
        except ValueError:
            raise ValueError(f"{tracker} holds {tag!r}, not an iteration number") from None
        if (sub / ".metadata").is_file():
            return sub
        raise FileNotFoundError(f"{tracker} points to {sub}, which is not a torch_dist "
                                "checkpoint (no .metadata file: an interrupted save?)")
    raise FileNotFoundError(
        f"{path} is neither a torch_dist checkpoint (no .metadata) nor a Megatron save "
        f"directory (no {TRACKER})"
    )


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


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; rename it to `out` only if the body
    finishes. On any error the temporary folder is removed, so `out` is either absent
    (or its previous content, with --force) or complete."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output {out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
