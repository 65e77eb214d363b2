"""Megatron-Core GPTModel wiring for SED-SFT.

API (stable; used by the trainer, the Megatron-LM glue, converters and eval):

    from megatron_sed.model import build_gpt_model, transformer_config_from_args
    model = build_gpt_model(args)      # parallel_state must be initialised
    #   args: Megatron-named namespace (megatron_sed.train.arguments.parse_and_validate) with
    #   num_layers, hidden_size, ffn_hidden_size, num_attention_heads, group_query_attention,
    #   num_query_groups, normalization, swiglu, disable_bias_linear, seq_length,
    #   max_position_embeddings, position_embedding_type, rotary_base,
    #   untie_embeddings_and_output_weights, tensor/pipeline_model_parallel_size,
    #   sequence_parallel, bf16/fp16, transformer_impl, padded_vocab_size (or vocab_size).
    #   (and --num-experts / --moe-*, --mtp-num-layers, --qk-layernorm: what Megatron's own
    #   provider builds). Returns SEDGPTModel (a GPTModel); its loss is Megatron's CE.
    #   Its TransformerConfig comes from the one builder, transformer_config_from_args
    #   (megatron_sed.model.config: Megatron's own core_transformer_config_from_args,
    #   arguments `args` lacks at Megatron's parser defaults, the CPU rules).
    ctx = SEDLossContext(cfg)                                           # one per forward
    loss = model(tokens, position_ids, attention_mask, labels=labels,
                 **attach_sed(model, ctx))                              # [b, s] SED per token
    stats = ctx.stats                  # [s, b] tensors of that forward (main head)
    logits = model(tokens, position_ids, attention_mask)                # [b, s, V/tp]

    attention_mask: bool [b, 1, s, s], True = masked out (Megatron's convention), or None
    for plain causal attention; packed samples: megatron_sed.data.reader.build_block_causal_mask(segment_ids).

Layer specs (megatron_sed.model.specs): "local" = Megatron-Core's local GPT spec with
core attention swapped for SDPACoreAttention (torch SDPA: CPU and GPU) and norms for
TorchNorm (torch LayerNorm/RMSNorm that allows sequence parallelism). Parameter names are
those of Megatron-Core's local spec:
    embedding.word_embeddings.weight, embedding.position_embeddings.weight (learned_absolute)
    decoder.layers.N.input_layernorm.{weight,bias}
    decoder.layers.N.self_attention.linear_qkv.{weight,bias}   (per query group [q.., k, v])
    decoder.layers.N.self_attention.linear_proj.{weight,bias}
    decoder.layers.N.pre_mlp_layernorm.{weight,bias}
    decoder.layers.N.mlp.linear_fc1.{weight,bias}   (swiglu: [gate; up], TP-stride 2)
    decoder.layers.N.mlp.linear_fc2.{weight,bias}
    decoder.final_layernorm.{weight,bias}
    output_layer.weight                              (only with untied embeddings)
(bias entries absent with --disable-bias-linear / RMSNorm). In dist checkpoints the
sharded keys of input_layernorm/pre_mlp_layernorm are mapped to the TE names
(self_attention.linear_qkv.layer_norm_weight, mlp.linear_fc1.layer_norm_weight), as
Megatron-Core's local spec does, so local and TE checkpoints are interchangeable.
"transformer_engine" = Megatron-Core's TE spec (GPU; FP8 via --fp8-format).

SED route (megatron_sed.model.sed_route): attach_sed(model, ctx) -> the forward's kwargs
(GPTModel's output_processor where megatron-core has it, an instance override of
compute_language_model_loss before); the Megatron-LM glue uses the same route.
Loss hook (megatron_sed.model.loss_hook): sed_output_processor, sed_language_model_loss;
masked_token_loss(loss, loss_mask) -> (sum, count) like Megatron's loss_func.
"""

from megatron_sed.model.attention import SDPACoreAttention
from megatron_sed.model.config import (
    padded_vocab_size,
    params_dtype_from_args,
    transformer_config_from_args,
)
from megatron_sed.model.gpt import SEDGPTModel, build_gpt_model, decoder_spec
from megatron_sed.model.loss_hook import masked_token_loss, sed_language_model_loss
from megatron_sed.model.sed_route import SEDLossContext, attach_sed, last_sed_context
from megatron_sed.model.specs import (
    TRANSFORMER_IMPLS,
    default_transformer_impl,
    get_layer_spec,
    get_local_layer_spec,
    te_available,
)

__all__ = [
    "SDPACoreAttention",
    "SEDGPTModel",
    "SEDLossContext",
    "TRANSFORMER_IMPLS",
    "attach_sed",
    "build_gpt_model",
    "decoder_spec",
    "default_transformer_impl",
    "get_layer_spec",
    "get_local_layer_spec",
    "last_sed_context",
    "masked_token_loss",
    "padded_vocab_size",
    "params_dtype_from_args",
    "sed_language_model_loss",
    "te_available",
    "transformer_config_from_args",
]
