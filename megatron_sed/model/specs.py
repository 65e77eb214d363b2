"""Layer specs: Megatron-Core's local GPT spec with SDPA attention (CPU, or GPU without
Transformer Engine) and Megatron-Core's own Transformer Engine spec (GPU).

The local spec keeps every submodule and parameter name of
`get_gpt_layer_local_spec` (decoder.layers.N.self_attention.linear_qkv.weight,
input_layernorm.weight, mlp.linear_fc1.weight, ...), so checkpoints, converters and
Megatron-LM's local models see the same names. Only two modules are swapped:
- core attention -> `SDPACoreAttention` (parameter-free), and
- the norms -> `TorchNorm`, which, unlike Megatron's `WrappedTorchNorm`, allows sequence
  parallelism (it marks its parameters `sequence_parallel` so their gradients are
  all-reduced over the TP group, as `finalize_model_grads` expects).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_sed.model.attention import SDPACoreAttention

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def te_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports."""
    try:
        import transformer_engine.pytorch  # noqa: PLC0415,F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def apex_available() -> bool:
    try:
        import apex  # noqa: PLC0415,F401
    except Exception:  # noqa: BLE001
        return False
    return True


class TorchNorm:
    """Factory like Megatron's WrappedTorchNorm (returns a plain torch.nn.LayerNorm or
    RMSNorm with parameters `weight` [and `bias`]) that also works with sequence
    parallelism."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm=False,
        zero_centered_gamma=False,
        normalization=None,
    ):
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("the local spec's torch norm does not support zero-centered gamma")
        normalization = normalization or config.normalization
        if normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported --normalization {normalization!r}")
        for p in norm.parameters():
            # Replicated on every TP rank but fed different sequence shards under
            # sequence parallelism: gradients must be summed over the TP group.
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _swap(spec, old, new):
    """Recursively replace submodule class `old` by `new` in a spec tree: ModuleSpecs,
    submodule dataclasses, lists of layer specs and the `functools.partial` builders
    that megatron-core >= 0.19 uses for MLP / MoE submodules."""
    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        spec.module = _swap(spec.module, old, new)
        if spec.submodules is not None:
            spec.submodules = _swap(spec.submodules, old, new)
        return spec
    if isinstance(spec, list):
        return [_swap(s, old, new) for s in spec]
    if isinstance(spec, functools.partial):
        kw = {k: _swap(v, old, new) for k, v in spec.keywords.items()}
        return functools.partial(_swap(spec.func, old, new), *spec.args, **kw)
    if hasattr(spec, "__dataclass_fields__") and not isinstance(spec, type):
        for name in spec.__dataclass_fields__:
            setattr(spec, name, _swap(getattr(spec, name), old, new))
    return spec


def localize(spec):
    """The CPU-capable substitutions of the local spec, applied to any spec tree built by
    megatron-core's local-spec functions (a layer spec, a decoder block spec, an MTP
    block spec): core attention -> SDPACoreAttention, norms -> TorchNorm (apex's fused
    norm kept on GPU only)."""
    spec = _swap(spec, DotProductAttention, SDPACoreAttention)
    spec = _swap(spec, WrappedTorchNorm, TorchNorm)
    try:  # with apex installed the local spec uses FusedLayerNorm; keep it on GPU only
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm  # noqa: PLC0415 (needs apex)

        if not torch.cuda.is_available():
            spec = _swap(spec, FusedLayerNorm, TorchNorm)
    except Exception:  # noqa: BLE001
        pass
    return spec


def get_local_layer_spec(normalization: str = "LayerNorm", qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron-Core's local GPT layer spec with SDPA core attention and SP-capable norms."""

    return localize(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))


def get_te_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron-Core's Transformer Engine spec (fused norm+linear, TE attention, FP8)."""
    if not te_available():
        raise RuntimeError(
            "--transformer-impl transformer_engine needs Transformer Engine "
            "(pip install 'megatron-sed[gpu]'); use --transformer-impl local"
        )
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def default_transformer_impl() -> str:
    """transformer_engine on a CUDA machine where TE imports, local otherwise."""
    return "transformer_engine" if torch.cuda.is_available() and te_available() else "local"


def get_layer_spec(
    transformer_impl: str, normalization: str = "LayerNorm", qk_layernorm: bool = False
) -> ModuleSpec:
    if transformer_impl == "transformer_engine":
        return get_te_layer_spec(qk_layernorm=qk_layernorm)
    if transformer_impl == "local":
        return get_local_layer_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    raise ValueError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")
