"""The GPU check's registry: what a check is, what it returns, and the list of all of them
(benchmarks/gpu_check.py runs the list and writes the report from it).

A check is declared once, as Check(section, name, fn); its name is the report's row, and
nothing else writes it. `fn(ctx)` verifies or measures one thing and returns an Outcome;
an exception it raises becomes a FAIL row (the runner's job, so no check catches its own
errors). Each check module declares its checks in `checks(dry_run)`, whose names may
depend on the dry run's tiny shapes and on nothing else:

- gpu_check_loss: the SED loss op (kernels: exactness vs float64; timing);
- gpu_check_fused: the output layer fused with the loss (fused: exactness and timing);
- gpu_check_runtime: the trainer's runtime (kernels: the THD context-parallel split;
  syncs: no host syncs; engine: megatron-sed-train on the device).

Checks of one section share expensive work through `Context.once` (the kernel cases the
ulp row sums up, the trainer run the finetune row loads): computed by whichever check
asks first, forgotten when the section ends.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

# the report's sections, in the order they run (and appear) unless --sections says otherwise
SECTIONS = ("kernels", "timing", "syncs", "fused", "engine")
PASS, FAIL, INFO, SKIP = "PASS", "FAIL", "INFO", "SKIP"


@dataclass(frozen=True)
class Outcome:
    """One row's verdict: PASS / FAIL (a check), INFO (a measurement), SKIP (detail: why)."""

    result: str
    value: str = ""
    detail: str = ""

    def __post_init__(self):
        if self.result not in (PASS, FAIL, INFO, SKIP):
            raise ValueError(f"result {self.result!r} is none of PASS, FAIL, INFO, SKIP")


def verdict(ok: bool, value: str, detail: str) -> Outcome:
    return Outcome(PASS if ok else FAIL, value, detail)


def info(value: str, detail: str) -> Outcome:
    return Outcome(INFO, value, detail)


def skip(reason: str) -> Outcome:
    return Outcome(SKIP, "", reason)


@dataclass
class Context:
    """What every check gets: the device, the run's options, and the section's shared work."""

    device: Any  # torch.device
    dry_run: bool
    iters: int  # timed iterations per measurement (1 on a dry run)
    warmup: int
    shared: dict = field(default_factory=dict)

    def once(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """make() on the first call with `key` in this section; its value afterwards. A
        make() that raises stores nothing (the next check asking tries again)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def latest(self, slot: str, key: Hashable, make: Callable[[], Any]) -> Any:
        """Like once(), but the slot holds one value: a new key frees the previous value
        before make() runs (inputs of several GiB, one token count after the other)."""
        held = self.shared.get(slot)
        if held is None or held[0] != key:
            self.shared.pop(slot, None)
            del held
            self.free_device_memory()
            self.shared[slot] = (key, make())
        return self.shared[slot][1]

    def end_section(self) -> None:
        self.shared.clear()
        self.free_device_memory()

    def free_device_memory(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Check:
    section: str
    name: str
    fn: Callable[[Context], Outcome]

    def __post_init__(self):
        if self.section not in SECTIONS:
            raise ValueError(f"check {self.name!r}: section {self.section!r} is none of {SECTIONS}")


def declared_checks(dry_run: bool) -> list[Check]:
    """Every check, in declaration order (the runner orders them by section)."""
    # imported here, not at the top: they import torch and megatron_sed, and the runner
    # must set TRITON_INTERPRET for a dry run first
    import gpu_check_fused
    import gpu_check_loss
    import gpu_check_runtime

    return [
        *gpu_check_loss.checks(dry_run),
        *gpu_check_runtime.checks(dry_run),
        *gpu_check_fused.checks(dry_run),
    ]
