"""On a machine without a GPU, say once what is missing instead of ten warnings.

Importing megatron-core on a CPU machine prints about ten warnings: Transformer Engine
and Apex are not installed (fallbacks to torch optimizers, norms, multi-tensor kernels,
local MoE layers), and torch's "No CUDA runtime is found". There they are expected and
say one thing. `collect()` (run when megatron_sed is imported, only where no CUDA device
is usable) hides exactly those messages and records what they were about; the CLIs call
`report()` once, which prints one line naming what is missing and what it means. Every
other warning is shown as before; on a machine with a GPU nothing is hidden (there a
missing Transformer Engine is news).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

import torch

# (pattern of an expected fallback message, what it says is missing)
EXPECTED = (
    (re.compile(r"Transformer Engine and Apex are not installed"), "Transformer Engine, Apex"),
    (re.compile(r"Apex is not installed"), "Apex"),
    (
        re.compile(r"Only transformer-engine>=[\d.]+ supports MoE experts, but your version is 0\.0\.0"),
        "Transformer Engine",
    ),
    (re.compile(r"No CUDA runtime is found"), "CUDA runtime"),
)
_seen: dict[str, int] = {}  # missing component -> hidden messages about it
_state = {"installed": False, "reported": False}


def _expected(message: str):
    for pattern, missing in EXPECTED:
        if pattern.search(message):
            return missing
    return None


def _record(missing: str) -> None:
    for part in missing.split(", "):
        _seen[part] = _seen.get(part, 0) + 1


class _CppExtensionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        missing = _expected(record.getMessage())
        if missing is None:
            return True
        _record(missing)
        return False


def collect() -> None:
    """Hide (and record) the expected fallback warnings; no-op where a GPU is usable."""
    if _state["installed"] or torch.cuda.is_available():
        return
    _state["installed"] = True
    plain = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        missing = _expected(str(message))
        if missing is None:
            return plain(message, category, filename, lineno, file, line)
        _record(missing)

    warnings.showwarning = showwarning
    logging.getLogger("torch.utils.cpp_extension").addFilter(_CppExtensionFilter())


def summary() -> str | None:
    """The one line, or None when nothing was hidden."""
    if not _seen:
        return None
    order = [m for m in ("CUDA runtime", "Transformer Engine", "Apex") if m in _seen]
    n = sum(_seen.values())
    return (
        f"note: no GPU here, and no {', '.join(order)}: Megatron uses its CPU/torch fallbacks "
        "(local layers, torch norms and optimizers), as expected on CPU "
        f"({n} warning{'s' if n != 1 else ''} about this hidden)"
    )


def report(stream=None) -> None:
    """Print summary() once per process (call it from a CLI after its imports)."""
    if _state["reported"]:
        return
    line = summary()
    if line is not None:
        _state["reported"] = True
        print(line, file=stream or sys.stderr, flush=True)
