"""A one-process gloo group for offline tools (converters) that call dist_checkpointing,
which needs torch.distributed even when a single process does all the work."""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch.distributed as dist


@contextlib.contextmanager
def single_process_group(scratch_dir=None):
    """Initialise a world-size-1 gloo group (a FileStore, no port) unless one exists;
    tear it down on exit only if this call created it."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(dir=scratch_dir) as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
