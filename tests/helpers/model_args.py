"""Megatron-named args of a tiny GPT for model-level tests (one definition, overridable)."""

import argparse


def tiny_model_args(**over) -> argparse.Namespace:
    a = argparse.Namespace(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        normalization="RMSNorm",
        swiglu=True,
        disable_bias_linear=False,
        seq_length=32,
        max_position_embeddings=32,
        position_embedding_type="rope",
        rotary_base=10000,
        untie_embeddings_and_output_weights=True,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        vocab_size=250,
        make_vocab_size_divisible_by=128,
        transformer_impl="local",
        device="cpu",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    for k, v in over.items():
        setattr(a, k, v)
    return a
