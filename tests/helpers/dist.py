"""Spawn real gloo process groups for distributed tests.

run_distributed(fn, world_size, *args) starts `world_size` processes, initialises a
gloo group on a free localhost port in each, calls fn(rank, world_size, *args) and
re-raises the first rank failure (with its traceback) in the parent.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, errors):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        # Only when the rank imported it: importing Megatron just to find out costs seconds.
        parallel_state = sys.modules.get("megatron.core.parallel_state")
        try:
            if parallel_state is not None and parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; fn must be picklable
    (a module-level function)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            failures.append((-1, f"rank process {p.pid} hung and was killed"))
    if failures:
        rank, tb = sorted(failures)[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"rank processes exited with codes {bad}")
