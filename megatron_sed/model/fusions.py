"""Which of Megatron's CUDA fusions a run turns on, decided in one place.

Two fusions matter for SED runs on a GPU:

- `apply_rope_fusion`: without it Megatron applies RoPE to packed (THD) sequences with
  `_apply_rotary_pos_emb_thd`, which calls `cu_seqlens.tolist()` in every layer (a host
  sync per layer per micro-batch). The fused path is Transformer Engine's kernel.
- `gradient_accumulation_fusion`: the weight-gradient GEMM accumulates straight into
  Megatron DDP's fp32 `main_grad` (Transformer Engine, or apex's
  `fused_weight_gradient_mlp_cuda`) instead of a separate GEMM + add.

Each is on where its kernel imports and CUDA is real (not the CPU backend, which
emulates CUDA on CPU tensors), and off otherwise; a user's explicit `--no-rope-fusion` /
`--no-gradient-accumulation-fusion` always wins.
"""

from __future__ import annotations

import torch

from megatron_sed.backend import cpu as cpu_backend
from megatron_sed.model.specs import te_available


def real_cuda() -> bool:
    """A real GPU runs this process (the CPU backend reports CUDA but is not)."""
    return not cpu_backend.is_active() and torch.cuda.is_available()


def fused_rope_available() -> bool:
    """Megatron-Core found Transformer Engine's fused RoPE (bshd or thd)."""
    try:
        from megatron.core.models.common.embeddings import rope_utils  # noqa: PLC0415 (optional (TE))
    except ImportError:
        return False
    return (
        getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None
        or getattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None) is not None
    )


def fused_grad_accum_available() -> bool:
    """Transformer Engine or apex's fused weight-gradient kernel imports."""
    if te_available():
        return True
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: PLC0415,F401 (optional (apex))
    except ImportError:
        return False
    return True


def choose_fusions(disabled: frozenset = frozenset()) -> dict[str, bool]:
    """{"apply_rope_fusion": bool, "gradient_accumulation_fusion": bool}; `disabled`
    names the ones the user turned off explicitly."""
    cuda = real_cuda()
    return {
        "apply_rope_fusion": cuda and "apply_rope_fusion" not in disabled and fused_rope_available(),
        "gradient_accumulation_fusion": cuda
        and "gradient_accumulation_fusion" not in disabled
        and fused_grad_accum_available(),
    }
