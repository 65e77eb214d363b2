"""What megatron_sed.backend.cpu changes outside torch, and what it does not pretend:
install() sets only what Megatron needs and uninstall() gives all of it back. These run
in the test process (no ranks, no model); `installed()` uninstalls whatever happens and
checks that every torch.cuda attribute is torch's own again."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from megatron_sed.backend import cpu

pytestmark = pytest.mark.skipif(cpu.gpu_present(), reason="the CPU backend refuses on a GPU")

VAR = "CUDA_DEVICE_MAX_CONNECTIONS"


@contextlib.contextmanager
def installed():
    assert not cpu.is_active(), "a test left the CPU backend installed"
    before = dict(vars(torch.cuda))
    cpu.install()
    try:
        yield
    finally:
        cpu.uninstall()
    now = vars(torch.cuda)
    changed = sorted(k for k in before.keys() | now.keys() if now.get(k) is not before.get(k))
    assert not changed, f"uninstall() left torch.cuda changed: {changed}"


def test_unset_variable_is_set_for_megatron_and_unset_by_uninstall(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    with installed():
        assert os.environ[VAR] == "1"  # Megatron's validate_args asserts it with TP/CP > 1
    assert VAR not in os.environ


def test_a_value_set_before_install_is_left_alone(monkeypatch):
    monkeypatch.setenv(VAR, "8")
    with installed():
        assert os.environ[VAR] == "8"
    assert os.environ[VAR] == "8"


def test_cuda_calls_megatron_never_makes_are_not_faked():
    """No invented numbers: what the backend does not model fails as on any machine
    without CUDA (torch.AcceleratorError is a RuntimeError)."""
    with installed():
        for unmodelled in (torch.cuda.mem_get_info, torch.cuda.reset_peak_memory_stats):
            with pytest.raises(RuntimeError):
                unmodelled()
        assert torch.cuda.memory_allocated() == 0  # what Megatron reads is still there
