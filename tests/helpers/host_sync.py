"""A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): a TorchFunctionMode that
raises on the operations that would make the host wait for a GPU.

Caught: .item(), .cpu(), .to("cpu") of a non-CPU tensor, .tolist(), .numpy(), bool(t) / int(t) / float(t),
nonzero (and the data-dependent-shape ops built on it: masked_select, boolean-mask
indexing, torch.unique), `torch.is_nonzero`.

`allowed` names functions (by code object) whose calls may sync: branches that run on
CPU tensors only by design (the SED op's synchronous target-range check is `if
target.device.type == "cpu"`; on CUDA it is torch._assert_async). The Triton
interpreter's own copies of kernel arguments stand for the kernel launch and are
allowed too.
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
_SYNCING = {
    _T.item,
    _T.cpu,
    _T.tolist,
    _T.numpy,
    _T.__bool__,
    _T.__int__,
    _T.__float__,
    _T.__index__,
    _T.nonzero,
    torch.nonzero,
    _T.masked_select,
    torch.masked_select,
    torch.is_nonzero,
    _T.unique,
    torch.unique,
    torch.argwhere,
    _T.argwhere,
}


class HostSyncError(RuntimeError):
    pass


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class NoHostSync(TorchFunctionMode):
    def __init__(self, allowed=()):
        super().__init__()
        self.allowed = {f.__code__ for f in allowed}
        self.checked = 0  # torch calls seen (a detector that saw nothing proves nothing)

    def _exempt(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code in self.allowed or "triton/runtime/interpreter" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.checked += 1
        bad = None
        if func in _SYNCING:
            bad = getattr(func, "__name__", str(func))
        elif func in (_T.__getitem__, _T.__setitem__, _T.index_put_, _T.index_put) and len(args) > 1:
            if _is_bool_index(args[1]):
                bad = "boolean-mask indexing"
        elif (
            func is _T.to
            and args[0].device.type != "cpu"
            and any(
                (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu")
                for a in (*args[1:], kwargs.get("device"))
                if a is not None and not isinstance(a, (torch.dtype, bool, torch.Tensor))
            )
        ):
            bad = ".to('cpu')"
        if bad is not None and not self._exempt():
            raise HostSyncError(f"host sync: {bad}")
        return func(*args, **kwargs)
