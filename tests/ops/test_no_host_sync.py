"""No host syncs in the SED op (forward + backward, fixed and tensor tau, torch and
Triton) nor in an EMA tracker step: a CPU stand-in for CUDA's sync-debug mode
(tests/helpers/host_sync.py). The GPU check (benchmarks/gpu_check.py) repeats this with
torch.cuda.set_sync_debug_mode("error") on a real GPU."""

from __future__ import annotations

import pytest
import torch

from megatron_sed import SEDConfig, vocab_parallel_sed_loss
from megatron_sed.calibration import ThresholdEMA
from megatron_sed.ops import sed_loss
from tests.helpers.host_sync import HostSyncError, NoHostSync
from tests.helpers.sed_reference import make_inputs

# CPU-only by design: the synchronous target-range check runs on CPU tensors only.
ALLOWED = (sed_loss._check_inputs,)


def test_detector_catches_syncs():
    x = torch.randn(8)
    for f in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x[x > 0], lambda: x.cpu()):
        with pytest.raises(HostSyncError), NoHostSync(ALLOWED):
            f()


@pytest.mark.compat
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("tau", ["fixed", "tensor", "no mask"])
def test_sed_forward_backward_has_no_host_sync(impl, tau):
    if impl == "triton":
        pytest.importorskip("triton")
        from megatron_sed.ops.triton_sed import kernels_interpreted

        if not kernels_interpreted():
            pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    logits, target = make_inputs(6, 2, 96, seed=0)
    logits = logits.to(torch.bfloat16).requires_grad_()
    threshold = torch.tensor(0.7, dtype=torch.float64) if tau == "tensor" else 0.7
    cfg = SEDConfig(
        coef=0.5, top_k=2, threshold=threshold, mask="all" if tau == "no mask" else "topk_mass", impl=impl
    )
    with NoHostSync(ALLOWED) as mode:
        loss, stats = vocab_parallel_sed_loss(logits, target, cfg)
        loss.sum().backward()
    assert mode.checked > 10 and logits.grad is not None
    if tau == "tensor":  # the same mask and loss as the float
        ref, ref_stats = vocab_parallel_sed_loss(logits.detach(), target, cfg.replace(threshold=0.7))
        assert torch.equal(ref, loss.detach()) and torch.equal(ref_stats.mask, stats.mask)


@pytest.mark.compat
@pytest.mark.parametrize("mask", ["topk_mass", "entropy"])
def test_ema_step_has_no_host_sync(mask):
    ema = ThresholdEMA(ratio=0.3, decay=0.5, tau=0.9, mask=mask)
    values = torch.rand(16, 3)
    loss_mask = (torch.rand(3, 16) < 0.7).float()
    before = ema.tau_tensor
    with NoHostSync() as mode:
        ema.observe(values, loss_mask.t())
        ema.observe(values, loss_mask.t())
        ema.step()
    assert mode.checked > 5 and ema.tau_tensor is before and ema.num_updates == 1
