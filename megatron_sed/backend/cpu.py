"""The CPU backend: Megatron-Core's and megatron.training's CUDA-only code on CPU tensors.

Megatron's training loop assumes a GPU everywhere: tensors are created with
``device="cuda"`` or ``torch.cuda.current_device()``, random states are CUDA generator
states, the optimizers check ``param.type() == "torch.cuda.FloatTensor"``, overlapping
communication waits on CUDA streams and events, data loaders pin memory. With the
backend installed, the same code runs on CPU tensors with gloo, so the CPU test suite and
the demo exercise Megatron's own schedules, DDP, optimizers and checkpointing instead of
a second loop.

What `install()` changes, process-wide, until `uninstall()`:

1. **Devices.** A ``TorchFunctionMode`` maps every CUDA device given to a torch function
   (``device=`` keyword, positional ``Tensor.to`` targets: ``"cuda"``, ``"cuda:N"``,
   ``torch.device("cuda", N)``, a bare ordinal) to the CPU. ``Tensor.cuda()``,
   ``Module.cuda()`` and ``Tensor.pin_memory()`` return their input; data loaders and
   factories (``pin_memory=True``, e.g. Megatron's CP slicing of RoPE) never pin memory.
2. **torch.cuda.** One device (ordinal 0) that is "available": ``current_device``,
   ``set_device``, ``device_count``, properties/capability/name, ``synchronize``,
   streams and events (no-ops that keep program order, which is the CPU's order anyway),
   memory statistics (zeros: CPU memory is not tracked), and the random state: a
   separate "CUDA" generator, as on a GPU, that random factories asked for CUDA tensors
   and dropout draw from and that Megatron's RNG tracker (``fork()`` for tensor-parallel
   regions, checkpointed RNG states) swaps; weights initialised on the CPU
   (``--use-cpu-initialization``) never depend on it, so they are the same at any
   tensor-parallel size.
3. **Type checks.** ``Tensor.type()`` answers ``torch.cuda.*Tensor`` for CPU tensors
   (Megatron's mixed-precision optimizers check it); ``torch.accelerator`` reports no
   accelerator (the CUDA-built torch would otherwise look for a driver).
4. **Compilation.** ``torch.compile``/TorchDynamo is disabled (Megatron's ``jit_fuser``
   fusions then run eagerly); megatron.core's dataset-helper compilation is skipped (the
   wheel ships the built helpers, without their Makefile) and so is Megatron-LM's legacy
   fused-kernel build.
5. **Environment.** ``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless already set (Megatron's
   argument checks require it for tensor/context parallelism on the device the backend
   reports); `uninstall()` unsets it again.

Limits (documented in docs/cpu_backend.md): no Transformer Engine, so no FP8 and no THD
packed attention (packed samples use block-diagonal masks); no CUDA graphs; memory
statistics are zeros; attention dropout inside torch's SDPA kernel draws from the CPU
generator; fp16 loss scaling works, but the arithmetic is whatever the CPU
kernels do in fp16/bf16. It is never installed on a machine with a GPU: `install()`
refuses, because silently training on the CPU there would be a disaster.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch._dynamo
import torch.cuda.random as cuda_random
import torch.utils.data as tud
from torch.overrides import TorchFunctionMode

__all__ = ["install", "uninstall", "is_active", "gpu_present"]

_CPU = torch.device("cpu")
_state: Optional[_Installed] = None
# torch.cuda.is_available before any patching: the truth about this machine.
_real_cuda_available: Callable[[], bool] = torch.cuda.is_available


def gpu_present() -> bool:
    """Whether this machine has a usable CUDA device (unaffected by the backend)."""
    return bool(_real_cuda_available())


def is_active() -> bool:
    """Whether the CPU backend is installed in this process."""
    return _state is not None


def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    # A bare ordinal means "accelerator N" to torch; bool is an int but never a device.
    return isinstance(d, int) and not isinstance(d, bool)


# Functions whose positional arguments may name a device.
_DEVICE_POSITIONAL = {torch.Tensor.to}
# Random factories: asked for CUDA tensors, they draw from the "CUDA" generator.
_RANDOM_FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal}
_DROPOUT = {torch.nn.functional.dropout}

# The "CUDA" random generator. On a GPU, CUDA random numbers (Megatron's fused-kernel
# warm-up, dropout, its RNG tracker) never touch the CPU generator that
# --use-cpu-initialization draws the weights from; a separate generator keeps that true
# here, so a model initialises identically at any tensor-parallel size.
_cuda_generator = torch.Generator()


def _dropout(input, p=0.5, training=True, inplace=False):
    """Dropout with a mask from the "CUDA" generator (what it uses on a GPU), so dropout
    inside Megatron's RNG tracker fork() differs per tensor-parallel rank as there."""
    if not training or p == 0.0:
        return input
    keep = torch.empty_like(input).bernoulli_(1.0 - p, generator=_cuda_generator)
    if p == 1.0:
        return input.mul_(keep) if inplace else input * keep
    return input.mul_(keep).div_(1.0 - p) if inplace else input * keep / (1.0 - p)


class _CudaOnCpu(TorchFunctionMode):
    """Maps CUDA devices to the CPU in every torch function call. The common case (no
    device anywhere) costs one dict lookup and a set lookup or two."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            d = kwargs.get("device")
            if d is not None and _is_cuda_device(d):
                kwargs = dict(kwargs, device=_CPU)
                if func in _RANDOM_FACTORIES and kwargs.get("generator") is None:
                    kwargs["generator"] = _cuda_generator
            if kwargs.get("pin_memory"):  # pinned host memory needs a CUDA driver
                kwargs = dict(kwargs, pin_memory=False)
        else:
            kwargs = {}
        if func in _DEVICE_POSITIONAL:
            if len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], _CPU, *args[2:])
        elif func in _DROPOUT:
            return _dropout(*args, **kwargs)
        return func(*args, **kwargs)


class _Stream:
    """torch.cuda.Stream stand-in: CPU work runs in program order, nothing to wait for."""

    def __init__(self, *a, **k):
        self.device = _CPU

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Event:
    """torch.cuda.Event stand-in; elapsed_time is wall-clock milliseconds."""

    def __init__(self, *a, **k):
        self._t = None

    def record(self, *a, **k):

        self._t = time.perf_counter()

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: _Event) -> float:
        if self._t is None or end._t is None:
            return 0.0
        return 1000.0 * (end._t - self._t)


class _DeviceProperties:
    """What Megatron reads of torch.cuda.get_device_properties()."""

    name = "cpu (megatron-sed CPU backend)"
    major, minor = 8, 0
    multi_processor_count = max(1, os.cpu_count() or 1)
    total_memory = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 1 << 34
    )
    uuid = "cpu"
    is_integrated = False


class _ZeroStats(dict):
    def __missing__(self, key):
        return 0


def _cuda_type(plain: Callable) -> Callable:
    def type_(self, *a, **k):
        if a or k:  # a conversion, not a query
            return plain(self, *a, **k)
        name = plain(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    return type_


class _Installed:
    """The patches (attributes and environment variables) of one install(), undone in
    reverse order by uninstall()."""

    def __init__(self) -> None:
        self.undo: list[tuple[Any, str, Any, bool]] = []
        self.undo_env: list[tuple[str, Optional[str]]] = []
        self.mode = _CudaOnCpu()

    def set(self, owner: Any, name: str, value: Any) -> None:
        had = name in vars(owner) if isinstance(owner, type) else hasattr(owner, name)
        self.undo.append((owner, name, getattr(owner, name, None), had))
        setattr(owner, name, value)

    def set_env(self, name: str, value: str) -> None:
        self.undo_env.append((name, os.environ.get(name)))
        os.environ[name] = value

    def restore(self) -> None:
        for owner, name, old, had in reversed(self.undo):
            if had:
                setattr(owner, name, old)
            else:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
        self.undo.clear()
        for name, old in reversed(self.undo_env):
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self.undo_env.clear()


def _patch_torch_cuda(st: _Installed) -> None:
    c = torch.cuda
    gen = _cuda_generator
    patches: dict[str, Any] = {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "get_device_properties": lambda *a, **k: _DeviceProperties(),
        "get_device_capability": lambda *a, **k: (_DeviceProperties.major, _DeviceProperties.minor),
        "get_device_name": lambda *a, **k: _DeviceProperties.name,
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(),
        "stream": lambda *a, **k: _Stream(),
        "set_stream": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "memory_stats": lambda *a, **k: _ZeroStats(),
        # The "CUDA" generator: Megatron's RNG tracker swaps its state.
        "default_generators": (gen,),
        "get_rng_state": lambda *a, **k: gen.get_state(),
        "set_rng_state": lambda state, *a, **k: gen.set_state(state),
        "manual_seed": lambda seed: gen.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: gen.manual_seed(int(seed)),
        "initial_seed": lambda: gen.initial_seed(),
        # Deferred CUDA calls (torch.cuda._lazy_call) would wait forever for a CUDA init.
        "_lazy_call": lambda fn, **k: fn(),
        "_lazy_init": lambda: None,
    }
    for name, value in patches.items():
        st.set(c, name, value)

    for name in (
        "get_rng_state",
        "set_rng_state",
        "manual_seed",
        "manual_seed_all",
        "initial_seed",
    ):
        st.set(cuda_random, name, patches[name])


def _patch_tensors_and_loaders(st: _Installed) -> None:
    st.set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    st.set(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    st.set(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    st.set(torch.Tensor, "type", _cuda_type(torch.Tensor.type))

    plain_init = tud.DataLoader.__init__

    def loader_init(self, *a, **k):
        k["pin_memory"] = False
        plain_init(self, *a, **k)

    st.set(tud.DataLoader, "__init__", loader_init)
    if hasattr(torch, "accelerator"):  # the CUDA build of torch asks the driver otherwise
        st.set(torch.accelerator, "is_available", lambda: False)
        st.set(torch.accelerator, "device_count", lambda: 0)
        st.set(torch.accelerator, "current_device_index", lambda: 0)


def _skip_compilation(st: _Installed) -> None:

    st.set(torch._dynamo.config, "disable", True)
    # Megatron's validate_args asserts it is 1 with TP or CP > 1 on a pre-Blackwell device
    # (the backend's reports compute capability 8.0); a value the user set stays.
    if "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ:
        st.set_env("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:
        import megatron.core.datasets.utils as dataset_utils  # noqa: PLC0415 (only when megatron-core is installed)
    except ImportError:
        pass
    else:
        # The megatron-core wheel ships the built helpers_cpp but no Makefile.
        st.set(dataset_utils, "compile_helpers", lambda: None)
    try:  # Megatron-LM checkouts: nvcc-built legacy softmax kernels
        import megatron.legacy.fused_kernels as fused_kernels  # noqa: PLC0415 (Megatron-LM checkouts only)
    except ImportError:
        pass
    else:
        st.set(fused_kernels, "load", lambda *a, **k: None)


def install() -> None:
    """Install the backend (idempotent). Call it before Megatron builds anything; refuses
    on a machine with a GPU."""
    global _state
    if _state is not None:
        return
    if gpu_present():
        raise RuntimeError(
            "megatron_sed.backend.cpu.install(): this machine has a CUDA GPU; the CPU backend "
            "only exists for machines without one (it would train on the CPU instead)"
        )
    st = _Installed()
    _patch_torch_cuda(st)
    _patch_tensors_and_loaders(st)
    _skip_compilation(st)
    st.mode.__enter__()
    _state = st


def uninstall() -> None:
    """Undo install() (tests; a process normally keeps the backend until it exits)."""
    global _state
    if _state is None:
        return
    st, _state = _state, None
    st.mode.__exit__(None, None, None)
    st.restore()
