"""The model shape and tokenizer of the checkpoint a run will load.

Megatron saves its whole `args` namespace in every checkpoint's common.pt, and the
converter writes the same (megatron_sed.convert). Megatron's `--use-checkpoint-args`
restores only part of the shape (not Llama-3's RoPE scaling, not the norm epsilon), so a
requeued job without the right flags would silently train a different model. Here,
before Megatron validates the flags, every model-shape argument the user did not give is
taken from the checkpoint, every one the user did give is compared with it (all
mismatches named in one error), and the padded vocabulary and tokenizer follow the
checkpoint. The checkpoint is `--load` when it holds one, else `--pretrained-checkpoint`
(Megatron's fine-tuning source).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from megatron_sed.checkpointing.layout import (
    HF_ASSETS,
    find_model_metadata,
    has_checkpoint,
    read_checkpoint_args,
)

# Megatron-LM argument names (dests) that define the network; a checkpoint only loads
# into a model built with the same values.
MODEL_SHAPE_ARGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "kv_channels",
    "max_position_embeddings",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "use_rope_scaling",
    "rope_scaling_factor",
    "rotary_seq_len_interpolation_factor",
    "normalization",
    "layernorm_epsilon",
    "swiglu",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "qk_l2_norm",
    "untie_embeddings_and_output_weights",
    # mixture of experts: which layers, how many experts, how tokens are routed
    "num_experts",
    "moe_layer_freq",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_router_topk",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_enable_expert_bias",
    # multi-token prediction heads
    "mtp_num_layers",
)
TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_size", "sft_tokenizer_type")


def checkpoint_source(args) -> Optional[str]:
    """The directory Megatron will load from, or None (training from scratch)."""

    for path in (getattr(args, "load", None), getattr(args, "pretrained_checkpoint", None)):
        if has_checkpoint(path):
            return path
    return None


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _flag(dest: str) -> str:
    return {"layernorm_epsilon": "--norm-epsilon", "add_bias_linear": "--disable-bias-linear"}.get(
        dest, "--" + dest.replace("_", "-")
    )


def _check_optimizer_resharding(args, saved, src) -> None:
    """Megatron keeps expert parameters in a separate optimizer only at expert-parallel
    size > 1, so it cannot load the optimizer state of an EP 1 checkpoint at EP > 1 (or
    back); it would fail deep inside load_state_dict. Say so, with the way out."""
    before = getattr(saved, "expert_model_parallel_size", None)
    after = getattr(args, "expert_model_parallel_size", 1)
    if not getattr(saved, "num_experts", None) or before is None:
        return
    if getattr(args, "no_load_optim", False) or getattr(args, "finetune", False):
        return
    if (before > 1) != (after > 1):
        raise ValueError(
            f"the checkpoint in {src} was saved at --expert-model-parallel-size {before}: Megatron "
            f"cannot load its optimizer state at --expert-model-parallel-size {after} (expert "
            "parameters have their own optimizer only when experts are split): keep the expert-"
            "parallel size, or pass --no-load-optim (the weights reshard; Adam's moments restart)"
        )


def apply_checkpoint_args(args: argparse.Namespace, given: set) -> Optional[argparse.Namespace]:
    """Fill / check the model shape, vocabulary and tokenizer from the checkpoint to load
    (see the module doc). Returns the checkpoint's args, or None without a checkpoint."""

    src = checkpoint_source(args)
    if src is None:
        return None
    saved = read_checkpoint_args(src, getattr(args, "ckpt_step", None))
    if saved is None:
        return None
    mismatches = []
    for dest in MODEL_SHAPE_ARGS:
        if not hasattr(saved, dest):
            continue
        value = getattr(saved, dest)
        if dest in given:
            if not _same(getattr(args, dest, None), value):
                mismatches.append(f"{_flag(dest)} {getattr(args, dest, None)!r} (checkpoint: {value!r})")
        else:
            setattr(args, dest, value)
    _check_optimizer_resharding(args, saved, src)
    if mismatches:
        raise ValueError(
            f"the checkpoint in {src} was saved with another model shape than the "
            "flags say (drop the flags to take the checkpoint's):\n  " + "\n  ".join(mismatches)
        )
    rows = getattr(saved, "padded_vocab_size", None)
    if rows and "padded_vocab_size" not in given:
        tp = args.tensor_model_parallel_size
        if rows % tp:
            raise ValueError(
                f"the checkpoint in {src} has {rows} vocabulary rows, which "
                f"--tensor-model-parallel-size {tp} does not divide"
            )
        args.padded_vocab_size = rows  # Megatron pads the tokenizer's size only when unset
    if not ({"tokenizer_type", "tokenizer_model", "vocab_size"} & given):
        meta = find_model_metadata(src)
        if meta is not None:  # a converted HF model: its own tokenizer, shipped beside it
            args.tokenizer_type = "HuggingFaceTokenizer"
            args.tokenizer_model = str(Path(meta["_root"]) / meta.get("tokenizer_dir", HF_ASSETS))
            args.sft_tokenizer_type = "hf"
        else:
            for dest in TOKENIZER_ARGS:
                if getattr(saved, dest, None) is not None:
                    setattr(args, dest, getattr(saved, dest))
        args.tokenizer_from_checkpoint = True
    return saved
