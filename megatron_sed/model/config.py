"""The one TransformerConfig builder: Megatron-named arguments -> Megatron-Core
TransformerConfig (and the padded vocabulary), for the trainer's model provider and for
every model rebuilt outside it (eval, export, RL, calibration, tests).

`transformer_config_from_args(args)`:

- where megatron.training imports (the megatron-core >= 0.19 wheel ships it), the config is
  Megatron's own `core_transformer_config_from_args`, so every Megatron flag means what it
  means there. `args` is the trainer's parsed namespace, a checkpoint's saved `args`, or
  anything shaped like them: the arguments it lacks (a converted checkpoint's args record
  the model only) are completed with Megatron's parser defaults first (`with_megatron_defaults`);
- without megatron.training (megatron-core 0.16.1, the compatibility leg) the same fields
  are translated here (`_config_without_megatron_training`).

The machine rules live here too, once (`machine_settings`): without a real GPU (plain
CPU, or the CPU backend, which emulates CUDA on CPU tensors) Megatron's CUDA fusions are
off and weights initialise on the CPU (`CPU_MODEL_SETTINGS`); on a GPU, RoPE and
gradient-accumulation fusion are on where their kernels import (megatron_sed.model.fusions),
an explicit off winning. The trainer installs the same values as its CPU parser defaults
(megatron_sed.train.arguments), so for its already-parsed args the rules change nothing;
a model rebuilt from a GPU run's checkpoint on a CPU gets them here.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_sed.model import fusions

# FP8 scaling defaults: TransformerConfig's own (what Megatron-LM's --fp8-amax-history-len /
# --fp8-amax-compute-algo default to, since megatron-core 0.19 generates those flags from
# the dataclass): history 1, 'most_recent'.
_FIELDS = TransformerConfig.__dataclass_fields__
FP8_AMAX_HISTORY_LEN = _FIELDS["fp8_amax_history_len"].default
FP8_AMAX_COMPUTE_ALGO = _FIELDS["fp8_amax_compute_algo"].default

# Megatron argument values (dest names) a machine without a real GPU needs: its CUDA
# fusions need CUDA kernels (apex / Transformer Engine / CUDA-compiled jit fusions), and
# weights initialise on the CPU (the same at every tensor-parallel size).
CPU_MODEL_SETTINGS = dict(
    use_cpu_initialization=True,
    gradient_accumulation_fusion=False,
    masked_softmax_fusion=False,
    bias_gelu_fusion=False,
    bias_swiglu_fusion=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    no_persist_layer_norm=True,
)
# The fusions a GPU run turns on where their kernels import (megatron_sed.model.fusions).
FUSION_FLAGS = ("apply_rope_fusion", "gradient_accumulation_fusion")


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


def on_cpu(args) -> bool:
    """The model is built for the CPU: no real GPU here (the CPU backend is no GPU), or the
    namespace says `device="cpu"` (eval and tests on a GPU machine may ask for that)."""
    return not fusions.real_cuda() or getattr(args, "device", None) == "cpu"


def apply_fusions(args, given: set) -> None:
    """The trainer's rule for RoPE and gradient-accumulation fusion: on where their kernels
    import on a real GPU (Megatron's defaults are on, which fails without Transformer Engine
    / apex), off on the CPU backend; an explicit --no-rope-fusion /
    --no-gradient-accumulation-fusion (a dest in `given`) wins."""
    disabled = frozenset(n for n in FUSION_FLAGS if n in given and not getattr(args, n))
    for name, on in fusions.choose_fusions(disabled).items():
        setattr(args, name, on)


def machine_settings(args) -> dict:
    """Megatron argument values this machine imposes on the model `args` describe.

    On the CPU: `CPU_MODEL_SETTINGS`. On a GPU: RoPE fusion unless `args` turn it off, and
    gradient-accumulation fusion only where `args` ask for it (it accumulates into Megatron
    DDP's main_grad, which a model built outside the trainer lacks), each where its kernel
    imports. For the trainer's args (megatron_sed.train.arguments applied the same rules at
    parsing) this changes nothing."""
    if on_cpu(args):
        return dict(CPU_MODEL_SETTINGS)
    disabled = set()
    if getattr(args, "apply_rope_fusion", None) is False:
        disabled.add("apply_rope_fusion")
    if not getattr(args, "gradient_accumulation_fusion", False):
        disabled.add("gradient_accumulation_fusion")
    return fusions.choose_fusions(frozenset(disabled))


def parse_megatron_args(argv: Sequence[str], extra_args_provider=None, prog: str = "megatron-sed"):
    """Megatron's own `parse_args` (megatron.training.arguments) on `argv`, with
    `extra_args_provider` (the trainer's add_trainer_args, the SED flags...); not validated.
    Megatron's parser reads sys.argv: it is swapped for the call."""
    from megatron.training.arguments import parse_args  # noqa: PLC0415 (absent on megatron-core < 0.19)

    saved_argv = sys.argv
    sys.argv = [prog, *argv]
    try:
        return parse_args(extra_args_provider=extra_args_provider)
    finally:
        sys.argv = saved_argv


@functools.lru_cache(maxsize=1)
def _megatron_defaults() -> Optional[dict]:
    """Megatron's parser defaults ({dest: value}), None without megatron.training."""
    if importlib.util.find_spec("megatron.training") is None:
        return None
    from megatron.training.arguments import add_megatron_arguments  # noqa: PLC0415 (absent on megatron-core < 0.19)

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return vars(parser.parse_known_args([])[0])


def with_megatron_defaults(args: argparse.Namespace) -> Optional[argparse.Namespace]:
    """`args` completed into a namespace Megatron's config builder reads: Megatron's parser
    defaults for the arguments `args` lacks, `params_dtype` (set by Megatron's
    validate_args) from --bf16 / --fp16 when absent. None without megatron.training."""
    defaults = _megatron_defaults()
    if defaults is None:
        return None
    full = argparse.Namespace(**{**defaults, **vars(args)})
    if getattr(args, "params_dtype", None) is None:
        full.params_dtype = params_dtype_from_args(full)
    return full


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """The TransformerConfig described by Megatron-named arguments (`args` as parsed by
    megatron_sed.train.arguments, a checkpoint's saved args, or any namespace with the same
    fields), with this machine's rules (`machine_settings`). `args` is not modified."""
    settings = machine_settings(args)
    full = with_megatron_defaults(args)
    if full is None:
        return _config_without_megatron_training(args, settings)
    from megatron.training.arguments import core_transformer_config_from_args  # noqa: PLC0415 (see with_megatron_defaults)

    for name, value in settings.items():
        setattr(full, name, value)
    return _megatron_computes_native_ce(core_transformer_config_from_args(full))


def _megatron_computes_native_ce(config: TransformerConfig) -> TransformerConfig:
    """--cross-entropy-fusion-impl linear is the plugin's (the main head's output layer
    fused with its loss, megatron_sed.model.fused_output, chosen from the parsed args).
    The losses Megatron still computes on materialised logits itself, the multi-token-
    prediction heads', read the config's impl, which megatron-core (<= 0.19) knows only as
    native or te (with linear it computes none): for them --cross-entropy-loss-fusion
    means its native fused CE."""
    if config.cross_entropy_loss_fusion and config.cross_entropy_fusion_impl == "linear":
        config.cross_entropy_fusion_impl = "native"
    return config


# --- megatron-core 0.16.1 (the compatibility leg): no megatron.training ------------------

# TransformerConfig fields that describe the network beyond the dense GPT shape, copied
# under the same names as Megatron's core_transformer_config_from_args copies them: QK-norm,
# mixture of experts (--num-experts -> num_moe_experts, --moe-*) and multi-token
# prediction (--mtp-*). A field the namespace lacks keeps TransformerConfig's default.
_ARCH_PREFIXES = ("moe_", "mtp_")
_ARCH_FIELDS = ("qk_layernorm", "qk_l2_norm", "expert_model_parallel_size", "expert_tensor_parallel_size")


def _architecture_fields(args: argparse.Namespace) -> dict:
    out = {
        name: getattr(args, name)
        for name in _FIELDS
        if (name.startswith(_ARCH_PREFIXES) or name in _ARCH_FIELDS) and hasattr(args, name)
    }
    out["num_moe_experts"] = getattr(args, "num_experts", None)
    out["qk_layernorm"] = bool(out.get("qk_layernorm", False))
    return out


def _config_without_megatron_training(args: argparse.Namespace, settings: dict) -> TransformerConfig:
    """What core_transformer_config_from_args builds from the same arguments, for the
    fields the plugin's models use (megatron-core 0.16.1 ships no megatron.training)."""
    dtype = params_dtype_from_args(args)
    swiglu = bool(getattr(args, "swiglu", False))
    kernel_fusions = {n: settings.get(n, False) for n in FUSION_FLAGS}
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
        use_cpu_initialization=bool(
            settings.get("use_cpu_initialization") or getattr(args, "use_cpu_initialization", False)
        ),
        perform_initialization=True,
        # The fusions that need apex or Megatron's CUDA kernels stay off here.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=settings.get("bias_dropout_fusion", True),
        **kernel_fusions,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=not on_cpu(args),
    )
    kwargs.update(_architecture_fields(args))
    fp8 = getattr(args, "fp8", None)  # Megatron's dest of --fp8-format
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
