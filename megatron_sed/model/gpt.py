"""Build Megatron-Core's GPTModel with the SED loss hook."""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron_sed.model.config import padded_vocab_size, transformer_config_from_args
from megatron_sed.model.loss_hook import sed_language_model_loss
from megatron_sed.model.specs import TorchNorm, default_transformer_impl, get_layer_spec


class CPURotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding that keeps `inv_freq` on CPU when there is no GPU (upstream moves
    it to torch.cuda.current_device() on first use)."""

    def get_emb(self, max_seq_len: int, offset: int = 0):
        if torch.cuda.is_available():
            return super().get_emb(max_seq_len, offset)
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]


class SEDGPTModel(GPTModel):
    """GPTModel whose language-model loss is the vocab-parallel SED loss.

    With `sed_config=None` it is exactly Megatron's GPTModel (CE via
    vocab_parallel_cross_entropy). `sed_config` may be swapped at any time (e.g. after
    threshold calibration): `model.sed_config = cfg`."""

    def __init__(self, *args, sed_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sed_config = sed_config
        if type(getattr(self, "rotary_pos_emb", None)) is RotaryEmbedding:
            self.rotary_pos_emb.__class__ = CPURotaryEmbedding  # same state, CPU-safe get_emb

    def compute_language_model_loss(self, labels, logits):
        if self.sed_config is None:
            return super().compute_language_model_loss(labels, logits)
        return sed_language_model_loss(self, labels, logits, self.sed_config)


def decoder_spec(config: TransformerConfig, transformer_impl: str, vp_stage=None):
    """The decoder block spec: per-layer spec from megatron_sed.model.specs and the final
    norm of the same family."""
    layer = get_layer_spec(transformer_impl, normalization=config.normalization)
    if transformer_impl == "transformer_engine":
        return get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=True,
            normalization=config.normalization,
            vp_stage=vp_stage,
        )
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=TorchNorm)


def build_gpt_model(
    args: argparse.Namespace,
    config: Optional[TransformerConfig] = None,
    sed_config=None,
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
    the TransformerConfig fields via transformer_config_from_args unless `config` given.
    `sed_config` (a megatron_sed.SEDConfig) turns on the SED loss hook; None keeps
    Megatron's CE."""
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
        sed_config=sed_config,
    )
