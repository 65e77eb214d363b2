"""Two of Megatron's log lines, made to say what they mean for this plugin's reports.

- The validation line prints `KEY value: x | KEY PPL: exp(x)` for every report key; for
  `sed mask rate`, `top1 acc`, `sed threshold`, ... a "PPL" means nothing. Only losses
  (keys ending in "loss") keep theirs: the other keys' PPL fields, known exactly once
  `evaluate` returned, are cut from the line (and from the dashes around it).
- On the CPU backend `torch.cuda.memory_allocated()` and friends are zeros, so the memory
  line read "allocated: 0.00 | max allocated: 0.00 ..."; there it reports the process's
  resident memory (now and peak) instead.

megatron_sed.megatron_patches hooks them into `megatron.training.training`'s `evaluate`,
`print_rank_last` and (on the CPU backend) `report_memory`.
"""

from __future__ import annotations

import math
import resource

import psutil
import torch
from megatron.core import parallel_state as mpu

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


class ValidationLine:
    """Cuts the "PPL" fields of the keys that are not losses from Megatron's validation
    line (and as many dashes from the rules printed around it). `evaluated(result)` learns
    the fields from `evaluate`'s result; `rewrite(message)` is applied to each message
    Megatron's print_rank_last prints (both hooked by megatron_sed.megatron_patches)."""

    def __init__(self):
        self._cut: list[str] = []  # PPL fields to cut from the next validation line
        self._rules = 0  # dashed rules printed around that line so far (2: done)

    def evaluated(self, result) -> None:
        total = result[0] if result else None
        self._cut = [_ppl_field(k, float(v)) for k, v in (total or {}).items() if not is_loss(k)]
        self._rules = 0

    def rewrite(self, message):
        if not self._cut or not isinstance(message, str):
            return message
        if message and set(message) == {"-"}:  # the rules above and below the line
            message = "-" * max(1, len(message) - sum(len(c) for c in self._cut))
            self._rules += 1
        else:
            for field in self._cut:
                message = message.replace(field, "", 1)
        if self._rules >= 2:
            self._cut = []
        return message


def report_resident_memory(name: str, process_group=None) -> None:
    """Megatron's memory line with the process's resident memory (on the CPU backend,
    where torch.cuda's allocator statistics are zeros), printed by the same rank."""
    rank0 = (
        torch.distributed.get_rank(process_group) == 0
        if process_group is not None
        else mpu.get_data_parallel_rank() == 0
    )
    if rank0:
        print(f"[Rank {torch.distributed.get_rank()}] {resident_memory_line(name)}", flush=True)
