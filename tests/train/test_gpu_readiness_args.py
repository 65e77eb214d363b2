"""GPU-only argument decisions, tested on CPU by faking what the machine has: which CUDA
fusions turn on (megatron_sed.model.fusions). MXFP8 refused below Blackwell and the FP8
amax defaults go through the real parser: tests/train/test_engine_args.py."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_sed.model import fusions

BOTH = {"apply_rope_fusion", "gradient_accumulation_fusion"}


def _machine(monkeypatch, cuda, rope, grad_accum):
    monkeypatch.setattr(fusions, "real_cuda", lambda: cuda)
    monkeypatch.setattr(fusions, "fused_rope_available", lambda: rope)
    monkeypatch.setattr(fusions, "fused_grad_accum_available", lambda: grad_accum)


@pytest.mark.parametrize(
    "cuda, rope, grad_accum, disabled, expected",
    [
        (True, True, True, (), {"apply_rope_fusion": True, "gradient_accumulation_fusion": True}),
        (True, True, False, (), {"apply_rope_fusion": True, "gradient_accumulation_fusion": False}),
        (True, False, True, (), {"apply_rope_fusion": False, "gradient_accumulation_fusion": True}),
        (False, True, True, (), {"apply_rope_fusion": False, "gradient_accumulation_fusion": False}),
        (
            True,
            True,
            True,
            ("apply_rope_fusion",),
            {"apply_rope_fusion": False, "gradient_accumulation_fusion": True},
        ),
        (True, True, True, tuple(BOTH), {"apply_rope_fusion": False, "gradient_accumulation_fusion": False}),
    ],
)
def test_choose_fusions(monkeypatch, cuda, rope, grad_accum, disabled, expected):
    _machine(monkeypatch, cuda, rope, grad_accum)
    assert fusions.choose_fusions(frozenset(disabled)) == expected


def test_cpu_backend_is_never_real_cuda(monkeypatch):
    from megatron_sed.backend import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "is_active", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not fusions.real_cuda()
    monkeypatch.setattr(cpu_backend, "is_active", lambda: False)
    assert fusions.real_cuda()


def test_trainer_respects_explicit_no_fusion_flags(monkeypatch):
    from megatron_sed.model import config  # the trainer's rule, beside the one config builder

    _machine(monkeypatch, True, True, True)
    args = argparse.Namespace(apply_rope_fusion=True, gradient_accumulation_fusion=True)
    config.apply_fusions(args, given=set())
    assert args.apply_rope_fusion and args.gradient_accumulation_fusion
    args = argparse.Namespace(apply_rope_fusion=False, gradient_accumulation_fusion=True)
    config.apply_fusions(args, given={"apply_rope_fusion"})  # --no-rope-fusion
    assert not args.apply_rope_fusion and args.gradient_accumulation_fusion
    _machine(monkeypatch, True, False, False)  # a GPU without TE / apex: Megatron's True defaults off
    args = argparse.Namespace(apply_rope_fusion=True, gradient_accumulation_fusion=True)
    config.apply_fusions(args, given=set())
    assert not args.apply_rope_fusion and not args.gradient_accumulation_fusion


def test_a_rebuilt_model_gets_this_machines_fusions(monkeypatch):
    """The one config builder's machine rules (model.config.machine_settings) for a model
    rebuilt from a checkpoint's args: on a GPU with the kernels, RoPE fusion unless the
    args turn it off, gradient-accumulation fusion only where they ask for it (outside
    Megatron's DDP there is no main_grad); everything off on the CPU or with device cpu."""
    from megatron_sed.model import config

    _machine(monkeypatch, True, True, True)
    gpu_run = argparse.Namespace(apply_rope_fusion=True, gradient_accumulation_fusion=True)
    assert config.machine_settings(gpu_run) == {
        "apply_rope_fusion": True,
        "gradient_accumulation_fusion": True,
    }
    converted = argparse.Namespace()  # a converted checkpoint's args name no fusion
    assert config.machine_settings(converted) == {
        "apply_rope_fusion": True,
        "gradient_accumulation_fusion": False,
    }
    no_rope = argparse.Namespace(apply_rope_fusion=False, gradient_accumulation_fusion=False)
    assert config.machine_settings(no_rope) == dict.fromkeys(BOTH, False)
    assert (
        config.machine_settings(argparse.Namespace(device="cpu", **vars(gpu_run)))
        == config.CPU_MODEL_SETTINGS
    )
    _machine(monkeypatch, False, True, True)
    assert config.machine_settings(gpu_run) == config.CPU_MODEL_SETTINGS
