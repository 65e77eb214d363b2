"""GPU-only argument decisions, tested on CPU by faking what the machine has: which CUDA
fusions turn on (megatron_sed.model.fusions), MXFP8 refused below Blackwell, and the FP8
amax defaults taken from Megatron-Core's TransformerConfig."""

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
    from megatron_sed.train import arguments

    _machine(monkeypatch, True, True, True)
    monkeypatch.setattr(arguments, "choose_fusions", fusions.choose_fusions)
    args = argparse.Namespace(apply_rope_fusion=True, gradient_accumulation_fusion=True)
    arguments.apply_fusions(args, given=set())
    assert args.apply_rope_fusion and args.gradient_accumulation_fusion
    args = argparse.Namespace(apply_rope_fusion=False, gradient_accumulation_fusion=True)
    arguments.apply_fusions(args, given={"apply_rope_fusion"})  # --no-rope-fusion
    assert not args.apply_rope_fusion and args.gradient_accumulation_fusion
    _machine(monkeypatch, True, False, False)  # a GPU without TE / apex: Megatron's True defaults off
    args = argparse.Namespace(apply_rope_fusion=True, gradient_accumulation_fusion=True)
    arguments.apply_fusions(args, given=set())
    assert not args.apply_rope_fusion and not args.gradient_accumulation_fusion


def _fp8_args(recipe):
    return argparse.Namespace(fp8="hybrid", fp8_recipe=recipe, transformer_impl="transformer_engine")


@pytest.mark.parametrize(
    "capability, recipe, refused",
    [((9, 0), "mxfp8", True), ((10, 0), "mxfp8", False), ((9, 0), "delayed", False), ((8, 9), "mxfp8", True)],
)
def test_mxfp8_needs_blackwell(monkeypatch, capability, recipe, refused):
    from megatron_sed.train.arguments import ArgumentError, _check_fp8_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    if refused:
        with pytest.raises(ArgumentError, match=r"mxfp8 needs a Blackwell GPU \(compute capability 10\.x\)"):
            _check_fp8_hardware(_fp8_args(recipe))
    else:
        _check_fp8_hardware(_fp8_args(recipe))


def test_fp8_amax_defaults_are_megatrons():
    from megatron.core.transformer import TransformerConfig

    from megatron_sed.model import config

    fields = TransformerConfig.__dataclass_fields__
    assert config.FP8_AMAX_HISTORY_LEN == fields["fp8_amax_history_len"].default
    assert config.FP8_AMAX_COMPUTE_ALGO == fields["fp8_amax_compute_algo"].default
    try:  # megatron-core >= 0.19 generates --fp8-amax-* from the dataclass (or still declares them)
        from megatron.training.arguments import add_megatron_arguments
    except ImportError:
        return
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    defaults = {a.dest: a.default for a in parser._actions}
    for dest, ours in (
        ("fp8_amax_history_len", config.FP8_AMAX_HISTORY_LEN),
        ("fp8_amax_compute_algo", config.FP8_AMAX_COMPUTE_ALGO),
    ):
        if dest in defaults:
            assert defaults[dest] == ours, (dest, defaults[dest], ours)
