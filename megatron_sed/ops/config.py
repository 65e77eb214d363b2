"""SEDConfig: the hyperparameters of the SED-SFT loss, validated once at construction;
KernelOptions: how the implementations run (never what they compute)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch

MASKS = ("topk_mass", "entropy", "all", "none")
# The masks with a threshold, and which side of tau they select: topk_mass regularises
# tokens whose top-k mass is BELOW tau, entropy those whose entropy is ABOVE it.
THRESHOLD_SIDE = {"topk_mass": "below", "entropy": "above"}
REGULARIZERS = ("quadratic", "entropy")
IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelOptions:
    """Tuning knobs of the implementations; results are the same for every choice.

    chunk_bytes:   torch implementation: bytes of logits per chunk of rows (None: cache-
                   sized on CPU, a few large chunks on GPU; see torch_sed.chunk_bytes).
    block_size:    Triton kernels: columns per program iteration (None: 8 KiB of logits).
    num_warps:     Triton kernels: warps per program (None: by block size).
    grad_in_place: Triton backward writes the gradient over the logits (peak memory =
                   the logits alone; the caller's logits are destroyed and the graph can
                   be backpropagated once). The torch implementation always reuses its
                   float32 working buffer and is unaffected.
    linear_fusion: the model's output processor fuses the output layer with the loss
                   (fused_linear_sed.py: no [s, b, V/tp] logits; --cross-entropy-loss-
                   fusion --cross-entropy-fusion-impl linear). Read by the output
                   processor only; vocab_parallel_sed_loss takes logits and ignores it.
    fused_chunk_tokens: tokens per chunk of the fused path (None: derived from the
                   shapes, fused_linear_sed.default_chunk_tokens).
    """

    chunk_bytes: Optional[int] = None
    block_size: Optional[int] = None
    num_warps: Optional[int] = None
    grad_in_place: bool = False
    linear_fusion: bool = False
    fused_chunk_tokens: Optional[int] = None

    def __post_init__(self):
        for name in ("chunk_bytes", "block_size", "num_warps", "fused_chunk_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"KernelOptions.{name} must be a positive integer or None, got {v!r}")
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ValueError(f"KernelOptions.block_size must be a power of two, got {self.block_size}")


@dataclass(frozen=True)
class SEDConfig:
    """Per token t with target y and p = softmax(z):

        L_t = -log p_y + coef * M_t * R_t

    coef:        lambda, the weight of the regulariser (>= 0; 0 is plain CE).
    top_k:       k of the top-k probability mass P_topk used by mask="topk_mass".
    threshold:   tau. mask="topk_mass": M = P_topk < tau (a probability in (0, 1]);
                 mask="entropy": M = H > tau (nats, >= 0). Unused by "all"/"none".
                 A number, or a 0-dim floating tensor (e.g. on the GPU: the EMA
                 tracker's tau, updated in place without a host sync); a tensor's range
                 is not checked here (that would read it back), its producer keeps it
                 valid. The comparison happens in torch code on the per-row statistics
                 (partials.combine_partials), so both implementations take either.
    mask:        "topk_mass" (the paper), "entropy", "all" (every token), "none" (CE).
    regularizer: "quadratic" R = (p_y - 1/2)^2 (the paper) or "entropy" R = -H.
    ignore_index: targets equal to it contribute 0 loss and 0 gradient.
    impl:        "auto" (Triton on CUDA tensors when available, else torch),
                 "torch" or "triton".
    kernel:      KernelOptions (chunking, Triton block / warps, in-place gradient).

    The objective, its gradient and the algebra behind them: docs/method.md.
    """

    coef: float = 1.0
    top_k: int = 2
    threshold: Union[float, torch.Tensor] = 0.95
    mask: str = "topk_mass"
    regularizer: str = "quadratic"
    ignore_index: int = -100
    impl: str = "auto"
    kernel: KernelOptions = field(default_factory=KernelOptions)

    def __post_init__(self):
        if isinstance(self.coef, bool) or not isinstance(self.coef, (int, float)):
            raise ValueError(f"SEDConfig.coef must be a number, got {self.coef!r}")
        if not math.isfinite(self.coef) or self.coef < 0:
            raise ValueError(f"SEDConfig.coef must be a finite number >= 0, got {self.coef!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"SEDConfig.top_k must be an integer >= 1, got {self.top_k!r}")
        if self.mask not in MASKS:
            raise ValueError(f"SEDConfig.mask must be one of {MASKS}, got {self.mask!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"SEDConfig.regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"SEDConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if isinstance(self.threshold, torch.Tensor):
            if self.threshold.dim() != 0 or not self.threshold.is_floating_point():
                raise ValueError(
                    "SEDConfig.threshold as a tensor must be a 0-dim floating-point tensor, got "
                    f"shape {tuple(self.threshold.shape)} {self.threshold.dtype}"
                )
        elif isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"SEDConfig.threshold must be a number, got {self.threshold!r}")
        elif not math.isfinite(self.threshold):
            raise ValueError(f"SEDConfig.threshold must be finite, got {self.threshold!r}")
        number = not isinstance(self.threshold, torch.Tensor)
        if number and self.mask == "topk_mass" and not 0.0 < self.threshold <= 1.0:
            raise ValueError(
                "SEDConfig.threshold is a top-k probability mass for mask='topk_mass' and must "
                f"lie in (0, 1], got {self.threshold!r}"
            )
        if number and self.mask == "entropy" and self.threshold < 0.0:
            raise ValueError(
                "SEDConfig.threshold is an entropy in nats for mask='entropy' and must be >= 0, "
                f"got {self.threshold!r}"
            )
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"SEDConfig.ignore_index must be an int, got {self.ignore_index!r}")
        if not isinstance(self.kernel, KernelOptions):
            raise ValueError(f"SEDConfig.kernel must be a KernelOptions, got {self.kernel!r}")

    @property
    def is_plain_ce(self) -> bool:
        """True when the regulariser can never act (coef 0 or mask 'none')."""
        return self.coef == 0.0 or self.mask == "none"

    def replace(self, **changes) -> SEDConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
