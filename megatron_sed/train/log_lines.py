"""Two of Megatron's log lines, made to say what they mean for this plugin's reports.

- The validation line prints `KEY value: x | KEY PPL: exp(x)` for every report key; for
  `sed mask rate`, `top1 acc`, `sed threshold`, ... a "PPL" means nothing. Only losses
  (keys ending in "loss") keep theirs: the other keys' PPL fields, known exactly once
  `evaluate` returned, are cut from the line (and from the dashes around it).
- On the CPU backend `torch.cuda.memory_allocated()` and friends are zeros, so the memory
  line read "allocated: 0.00 | max allocated: 0.00 ..."; there it reports the process's
  resident memory (now and peak) instead.

`megatron.training.training` looks `evaluate`, `print_rank_last` and `report_memory` up in
its own namespace on every call, so wrapping them there changes nothing else.
"""

from __future__ import annotations

import math
import resource

import megatron.training.training as loop
import psutil
import torch

from megatron_sed.backend import cpu as cpu_backend

_MB = 1024.0 * 1024.0


def is_loss(key: str) -> bool:
    return key.endswith("loss")


def _ppl_field(key: str, value: float) -> str:
    # exactly as megatron.training.training.evaluate_and_print_results writes it
    return f"{key} PPL: {math.exp(min(20, value)):.6E} | "


def resident_memory_line(name: str) -> str:
    rss = psutil.Process().memory_info().rss / _MB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    return f"{name} memory (MB) | resident: {rss:.2f} | max resident: {max(peak, rss):.2f}"


def install_log_line_fixes() -> None:
    """Wrap loop.evaluate / loop.print_rank_last (and, on the CPU backend,
    loop.report_memory); idempotent."""
    if getattr(loop, "_megatron_sed_log_lines", False):
        return
    cut: list[str] = []  # PPL fields to cut from the next validation line
    rules = [0]  # dashed rules printed around that line so far (2: done)
    plain_evaluate, plain_print = loop.evaluate, loop.print_rank_last

    def evaluate(*a, **kw):
        result = plain_evaluate(*a, **kw)
        total = result[0] if result else None
        cut[:] = [_ppl_field(k, float(v)) for k, v in (total or {}).items() if not is_loss(k)]
        rules[0] = 0
        return result

    def print_rank_last(message):
        if cut and isinstance(message, str):
            if message and set(message) == {"-"}:  # the rules above and below the line
                message = "-" * max(1, len(message) - sum(len(c) for c in cut))
                rules[0] += 1
            else:
                for field in cut:
                    message = message.replace(field, "", 1)
        plain_print(message)
        if rules[0] >= 2:
            cut.clear()

    loop.evaluate = evaluate
    loop.print_rank_last = print_rank_last

    if cpu_backend.is_active():

        def report_memory(name, process_group=None, *a, **kw):
            from megatron.core import parallel_state as mpu  # noqa: PLC0415 (initialised by now)

            rank0 = (
                torch.distributed.get_rank(process_group) == 0
                if process_group is not None
                else mpu.get_data_parallel_rank() == 0
            )
            if rank0:
                print(f"[Rank {torch.distributed.get_rank()}] {resident_memory_line(name)}", flush=True)

        loop.report_memory = report_memory
    loop._megatron_sed_log_lines = True
