"""Megatron model flags that megatron-sed's model provider cannot honour, refused at
argument validation with the flag named (never a silently different model).

The provider (megatron_sed.train.model_provider) builds Megatron-Core's GPTModel from
Megatron's decoder-block and MTP specs: dense or MoE layers (--num-experts, --moe-*,
expert parallelism), --mtp-num-layers, --qk-layernorm / --qk-l2-norm, GQA, RoPE. On the
local spec, core attention is torch SDPA (megatron_sed.model.attention), which knows
causal / block-causal masks only; and eval / export rebuild the model from the
checkpoint's args with megatron_sed.model.config, which reproduces the fields above.
Anything else that changes the network is listed here.
"""

from __future__ import annotations

from megatron_sed.flags import ArgumentError

# (args dest, the flag, its inert value, why it cannot be honoured) for every spec
_UNSUPPORTED = (
    ("multi_latent_attention", "--multi-latent-attention", False, "multi-latent attention (MLA)"),
    ("experimental_attention_variant", "--experimental-attention-variant", None, "that attention variant"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", None, "heterogeneous layers"),
    ("hybrid_layer_pattern", "--hybrid-layer-pattern", None, "hybrid (Mamba) layers"),
    ("spec", "--spec", None, "a custom layer spec module"),
    ("attention_output_gate", "--attention-output-gate", False, "a gated attention output"),
    ("no_rope_freq", "--no-rope-freq", None, "layers without RoPE"),
    ("moe_latent_size", "--moe-latent-size", None, "latent MoE projections"),
)
# ... and on the local spec (torch SDPA core attention) only
_UNSUPPORTED_LOCAL = (
    ("window_size", "--window-size", None, "sliding-window attention"),
    ("window_attn_skip_freq", "--window-attn-skip-freq", None, "sliding-window attention"),
    ("softmax_type", "--softmax-type", "vanilla", "attention sinks (another softmax)"),
)


def check_model_flags(args) -> None:
    """Raise ArgumentError naming the first model flag the provider cannot build."""
    local = getattr(args, "transformer_impl", "local") != "transformer_engine"
    for dest, flag, inert, what in _UNSUPPORTED:
        if getattr(args, dest, inert) not in (inert, None):
            raise ArgumentError(
                f"{flag} ({what}) is not supported by megatron-sed's model provider: drop {flag}"
            )
    for dest, flag, inert, what in _UNSUPPORTED_LOCAL if local else ():
        if getattr(args, dest, inert) not in (inert, None):
            raise ArgumentError(
                f"{flag} ({what}) is not supported on the local layer spec (torch SDPA "
                f"attention): drop {flag}, or use --transformer-impl transformer_engine on a GPU"
            )
