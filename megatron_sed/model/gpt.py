"""Build Megatron-Core's GPTModel with the SED loss hook."""

from __future__ import annotations

import argparse
from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer import TransformerConfig

from megatron_sed.backend.rotary import make_rotary_cpu_safe
from megatron_sed.model.config import padded_vocab_size, transformer_config_from_args
from megatron_sed.model.specs import TRANSFORMER_IMPLS, default_transformer_impl, get_te_layer_spec, localize


class SEDGPTModel(GPTModel):
    """Megatron's GPTModel, with a RotaryEmbedding that also runs without a GPU.

    The loss stays Megatron's: SED enters through megatron_sed.model.sed_route
    (`attach_sed(model, SEDLossContext(cfg))` before a forward), the same route the
    Megatron-LM patch uses for Megatron-LM's own GPTModel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        make_rotary_cpu_safe(self)  # the CPU stand-in lives with the CPU backend


def decoder_spec(config: TransformerConfig, transformer_impl: str, vp_stage=None):
    """The decoder block spec Megatron's own provider builds for `config` (dense or MoE
    layers per --moe-layer-freq, QK-norm, this pipeline stage's layers and the final
    norm), with the local spec's CPU substitutions (megatron_sed.model.specs.localize)."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")
    if transformer_impl == "transformer_engine":
        get_te_layer_spec()  # says what is missing when TE does not import
    use_te = transformer_impl == "transformer_engine"
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        qk_l2_norm=config.qk_l2_norm,
        vp_stage=vp_stage,
    )
    return spec if use_te else localize(spec)


def mtp_spec(config: TransformerConfig, transformer_impl: str, vp_stage=None):
    """The multi-token-prediction block spec for --mtp-num-layers (None without it, or on a
    pipeline stage that holds no MTP layer), built as Megatron's provider builds it: MTP
    layers shaped like the decoder's last layer."""
    if not config.mtp_num_layers:
        return None
    use_te = transformer_impl == "transformer_engine"
    last = get_gpt_decoder_layer_specs(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        qk_l2_norm=config.qk_l2_norm,
    )[-1]
    spec = get_gpt_mtp_block_spec(config, last, use_transformer_engine=use_te, vp_stage=vp_stage)
    return spec if (use_te or spec is None) else localize(spec)


def build_gpt_model(
    args: argparse.Namespace,
    config: Optional[TransformerConfig] = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pg_collection=None,
) -> SEDGPTModel:
    """Megatron-Core GPTModel from Megatron-named args (see megatron_sed.train.arguments).

    Needs megatron.core.parallel_state initialised (TP/PP groups). Reads:
    args.padded_vocab_size (or vocab_size + --make-vocab-size-divisible-by),
    seq_length / max_position_embeddings, position_embedding_type, rotary_base,
    rotary_percent, untie_embeddings_and_output_weights, transformer_impl;
    the TransformerConfig fields via transformer_config_from_args unless `config` given
    (MoE, MTP and QK-norm included). The loss is Megatron's CE unless a forward is
    routed through SED (megatron_sed.model.sed_route.attach_sed)."""
    if config is None:
        config = transformer_config_from_args(args)
    impl = getattr(args, "transformer_impl", None) or default_transformer_impl()
    vocab = getattr(args, "padded_vocab_size", None) or padded_vocab_size(
        args.vocab_size,
        getattr(args, "make_vocab_size_divisible_by", 128),
        args.tensor_model_parallel_size,
    )
    return SEDGPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(config, impl, vp_stage=vp_stage),
        mtp_block_spec=mtp_spec(config, impl, vp_stage=vp_stage),
        vocab_size=vocab,
        max_sequence_length=getattr(args, "max_position_embeddings", None) or args.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not getattr(args, "untie_embeddings_and_output_weights", False),
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_base=getattr(args, "rotary_base", 10000),
        # Llama-3.1/3.2 RoPE scaling and linear position interpolation (Megatron-LM's
        # --use-rope-scaling / --rope-scaling-factor / --rotary-seq-len-interpolation-factor;
        # set from converted HF checkpoints, see megatron_sed.convert).
        rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", None) or 8.0,
        seq_len_interpolation_factor=getattr(args, "rotary_seq_len_interpolation_factor", None),
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
