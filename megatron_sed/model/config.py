"""Megatron-named arguments -> Megatron-Core TransformerConfig (and the padded vocab)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_sed.model.fusions import choose_fusions

# FP8 scaling defaults: TransformerConfig's own (what Megatron-LM's --fp8-amax-history-len /
# --fp8-amax-compute-algo default to, since megatron-core 0.19 generates those flags from
# the dataclass): history 1, 'most_recent'.
_FIELDS = TransformerConfig.__dataclass_fields__
FP8_AMAX_HISTORY_LEN = _FIELDS["fp8_amax_history_len"].default
FP8_AMAX_COMPUTE_ALGO = _FIELDS["fp8_amax_compute_algo"].default


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of
    --make-vocab-size-divisible-by x --tensor-model-parallel-size."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def params_dtype_from_args(args) -> torch.dtype:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


# TransformerConfig fields that describe the network beyond the dense GPT shape, copied
# under the same names as Megatron's core_transformer_config_from_args copies them: QK-norm,
# mixture of experts (--num-experts -> num_moe_experts, --moe-*) and multi-token
# prediction (--mtp-*). A field the namespace lacks keeps TransformerConfig's default.
_ARCH_PREFIXES = ("moe_", "mtp_")
_ARCH_FIELDS = ("qk_layernorm", "qk_l2_norm", "expert_model_parallel_size", "expert_tensor_parallel_size")


def architecture_fields(args: argparse.Namespace) -> dict:
    """QK-norm, MoE and MTP fields of the TransformerConfig described by `args`."""
    out = {
        name: getattr(args, name)
        for name in _FIELDS
        if (name.startswith(_ARCH_PREFIXES) or name in _ARCH_FIELDS) and hasattr(args, name)
    }
    out["num_moe_experts"] = getattr(args, "num_experts", None)
    out["qk_layernorm"] = bool(out.get("qk_layernorm", False))
    return out


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """The TransformerConfig described by Megatron-LM-named arguments (`args` as parsed by
    megatron_sed.train.arguments, or any namespace with the same fields)."""
    on_gpu = torch.cuda.is_available() and getattr(args, "device", "cuda") != "cpu"
    dtype = params_dtype_from_args(args)
    swiglu = bool(getattr(args, "swiglu", False))
    # An explicit False (--no-rope-fusion, ...) wins; otherwise on where the kernel exists.
    # Gradient-accumulation fusion writes into Megatron DDP's main_grad, which a model
    # built here has only under Megatron's DDP: on only when asked for (and available).
    off = set() if getattr(args, "apply_rope_fusion", None) is not False else {"apply_rope_fusion"}
    if not getattr(args, "gradient_accumulation_fusion", False):
        off.add("gradient_accumulation_fusion")
    fusions = choose_fusions(frozenset(off))
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=getattr(args, "kv_channels", None) or args.hidden_size // heads,
        normalization=getattr(args, "normalization", "LayerNorm"),
        layernorm_epsilon=getattr(args, "layernorm_epsilon", getattr(args, "norm_epsilon", 1e-5)),
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=getattr(args, "add_bias_linear", not getattr(args, "disable_bias_linear", False)),
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        hidden_dropout=getattr(args, "hidden_dropout", 0.0),
        attention_dropout=getattr(args, "attention_dropout", 0.0),
        init_method_std=getattr(args, "init_method_std", 0.02),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=bool(getattr(args, "sequence_parallel", False)),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=(not on_gpu) or bool(getattr(args, "use_cpu_initialization", False)),
        perform_initialization=True,
        # Fusions need CUDA kernels (and some need apex); keep them on GPU only.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu,
        **fusions,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=on_gpu,
    )
    kwargs.update(architecture_fields(args))
    fp8 = getattr(args, "fp8_format", None)
    if fp8 is not None:
        # Validated earlier (needs Transformer Engine); here only the wiring.
        kwargs.update(
            fp8=fp8,
            fp8_recipe=getattr(args, "fp8_recipe", "delayed"),
            fp8_margin=getattr(args, "fp8_margin", 0),
            fp8_amax_history_len=getattr(args, "fp8_amax_history_len", FP8_AMAX_HISTORY_LEN),
            fp8_amax_compute_algo=getattr(args, "fp8_amax_compute_algo", FP8_AMAX_COMPUTE_ALGO),
        )
    if getattr(args, "recompute_granularity", None):
        kwargs.update(
            recompute_granularity=args.recompute_granularity,
            recompute_method=getattr(args, "recompute_method", None),
            recompute_num_layers=getattr(args, "recompute_num_layers", None),
        )
    return TransformerConfig(**kwargs)
