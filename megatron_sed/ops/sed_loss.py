"""The public entry point of the SED loss: input checks and the one dispatcher between
the implementations (torch: torch_sed.py; Triton: triton_sed.py), plus the module wrapper.

Both implementations compute the same per-rank partials, share the one all-gather and
the combination (partials.py) and return (loss, *stats) in stats.STAT_NAMES order; the
objective and its gradient are derived in docs/method.md.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_sed.ops.comm import group_size_and_rank, resolve_tp_group
from megatron_sed.ops.config import SEDConfig
from megatron_sed.ops.stats import STAT_NAMES, SEDStats
from megatron_sed.ops.torch_sed import TorchSEDLoss

logger = logging.getLogger(__name__)
_warned: set = set()


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, cfg: SEDConfig, world_size: int):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(
            "vocab_parallel_logits must be a floating-point tensor, got "
            f"{getattr(logits, 'dtype', type(logits))}"
        )
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got {getattr(target, 'dtype', type(target))}")
    if logits.dim() < 2 or tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match vocab_parallel_logits shape "
            f"{tuple(logits.shape)} without its last (vocab) dimension"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but the logits are on {logits.device}")
    check_target(target, cfg, logits.shape[-1] * world_size, logits.device)


def check_target(target: torch.Tensor, cfg: SEDConfig, vocab: int, device: torch.device) -> None:
    """Target ids in [0, vocab) or ignore_index, and top_k <= vocab (the materialised op's
    and the fused output layer's shared check)."""
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got {getattr(target, 'dtype', type(target))}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the loss's input is on {device}")
    if cfg.top_k > vocab:
        raise ValueError(f"SEDConfig.top_k={cfg.top_k} exceeds the vocabulary size {vocab}")
    bad = (target != cfg.ignore_index) & ((target < 0) | (target >= vocab))
    if target.device.type == "cpu":
        if bool(bad.any()):
            idx = int(bad.reshape(-1).nonzero()[0])
            value = int(target.reshape(-1)[idx])
            raise ValueError(
                f"target id {value} (flat position {idx}) is outside the vocabulary [0, {vocab}) "
                f"and is not ignore_index={cfg.ignore_index}"
            )
    else:  # no host sync on accelerators: fails asynchronously instead
        torch._assert_async(~bad.any(), f"a target id is outside the vocabulary [0, {vocab})")


def _triton_module():
    """megatron_sed.ops.triton_sed, or None when Triton does not import."""
    try:
        from megatron_sed.ops import triton_sed  # noqa: PLC0415 (optional (Triton))
    except ImportError:
        return None
    return triton_sed


def choose_impl(logits: torch.Tensor, cfg: SEDConfig) -> str:
    """ "torch" or "triton" for this input. impl="triton" on an input the kernels cannot
    run raises ValueError naming why; impl="auto" then falls back to torch, warning once."""
    if cfg.impl == "torch" or (cfg.impl == "auto" and not logits.is_cuda):
        return "torch"
    triton_sed = _triton_module()
    reason = "Triton is not installed" if triton_sed is None else triton_sed.unsupported_reason(logits, cfg)
    if reason is None:
        return "triton"
    if cfg.impl == "triton":
        raise ValueError(f"SEDConfig(impl='triton'): {reason}")
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("SED loss: falling back to the torch implementation: %s", reason)
    return "torch"


def vocab_parallel_sed_loss(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    cfg: Optional[SEDConfig] = None,
    tp_group=None,
) -> tuple[torch.Tensor, SEDStats]:
    """SED-SFT loss over tensor-parallel vocab shards.

    Args:
        vocab_parallel_logits: [s, b, V/tp] (any leading shape), any float dtype; rank r
            holds vocab columns [r*V/tp, (r+1)*V/tp). float32 logits are overwritten
            in place, like Megatron's cross-entropy.
        target: [s, b] int64 global token ids (ignore_index allowed).
        cfg: SEDConfig (defaults to SEDConfig()).
        tp_group: process group over the vocab shards; None -> Megatron's TP group when
            parallel_state is initialised, else no communication.

    Returns:
        loss: [s, b] float32 per token, ce + coef * M * R (0 on ignored targets).
        stats: SEDStats of [s, b] tensors: ce, reg (= coef*M*R), mask (bool),
            target_prob, entropy, topk_mass, correct (bool); identical on every TP rank;
            no gradient.
    """
    cfg = cfg if cfg is not None else SEDConfig()
    group = resolve_tp_group(tp_group)
    world_size, rank = group_size_and_rank(group)
    _check_inputs(vocab_parallel_logits, target, cfg, world_size)
    if choose_impl(vocab_parallel_logits, cfg) == "triton":
        outputs = _triton_module().TritonSEDLoss.apply(
            vocab_parallel_logits, target, cfg, group, world_size, rank
        )
    else:
        outputs = TorchSEDLoss.apply(vocab_parallel_logits, target, cfg, group, world_size, rank)
    return outputs[0], SEDStats(**dict(zip(STAT_NAMES, outputs[1:])))


class SEDLoss(torch.nn.Module):
    """Module wrapper: `SEDLoss(cfg, tp_group)(logits, target) -> (loss, stats)`."""

    def __init__(self, cfg: Optional[SEDConfig] = None, tp_group=None):
        super().__init__()
        self.cfg = cfg if cfg is not None else SEDConfig()
        self.tp_group = tp_group

    def forward(self, vocab_parallel_logits, target):
        return vocab_parallel_sed_loss(vocab_parallel_logits, target, self.cfg, self.tp_group)

    def extra_repr(self) -> str:
        return repr(self.cfg)
