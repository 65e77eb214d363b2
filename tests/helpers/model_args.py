"""Megatron-named args of a tiny GPT for model-level tests (one definition, overridable).

Where megatron.training imports (the main venv), the namespace is Megatron's own parser's
(megatron_sed.model.config.parse_megatron_args: megatron.training's parse_args) on the
tiny model's flags, with the plugin's SED flags as the extra args provider, so every other
argument has Megatron's default. (Not the trainer's whole provider, add_trainer_args: it
imports the data pipeline and tokenizers, seconds in every spawned rank, for no model
argument.) Keyword overrides replace values by dest name afterwards."""

import argparse
import importlib.util

# The tiny model's flags: Megatron-LM's command line.
TINY_MODEL_FLAGS = [
    *("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128"),
    *("--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2"),
    *("--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights"),
    *("--seq-length", "32", "--max-position-embeddings", "32"),
    *("--position-embedding-type", "rope", "--rotary-base", "10000"),
    *("--vocab-size", "250", "--make-vocab-size-divisible-by", "128"),
    *("--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"),
    *("--transformer-impl", "local", "--hidden-dropout", "0", "--attention-dropout", "0"),
    # the tests train these models outside Megatron's DDP (no main_grad to fuse into)
    "--no-gradient-accumulation-fusion",
]


def _parsed() -> argparse.Namespace:
    if importlib.util.find_spec("megatron.training") is None:
        # The compatibility leg (Python 3.11, megatron-core 0.16.1) has no megatron.training,
        # hence no Megatron parser: the same model by hand, with the values those flags give.
        return argparse.Namespace(
            num_layers=2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            group_query_attention=True,
            num_query_groups=2,
            normalization="RMSNorm",
            swiglu=True,
            add_bias_linear=True,
            untie_embeddings_and_output_weights=True,
            seq_length=32,
            max_position_embeddings=32,
            position_embedding_type="rope",
            rotary_base=10000,
            vocab_size=250,
            make_vocab_size_divisible_by=128,
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            sequence_parallel=False,
            transformer_impl="local",
            hidden_dropout=0.0,
            attention_dropout=0.0,
            gradient_accumulation_fusion=False,
        )
    from megatron_sed.flags import add_sed_args
    from megatron_sed.model.config import parse_megatron_args

    return parse_megatron_args(TINY_MODEL_FLAGS, add_sed_args)


def tiny_model_args(**over) -> argparse.Namespace:
    a = _parsed()
    a.device = "cpu"  # megatron-sed's: build for the CPU even on a GPU machine
    for k, v in over.items():
        setattr(a, k, v)
    return a
