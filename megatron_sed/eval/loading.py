"""Load a checkpoint of our trainer (or any Megatron-Core torch_dist GPT checkpoint whose
common.pt holds Megatron `args`) into one process for evaluation.

The model is rebuilt from the checkpoint's own args at TP=1, PP=1 (dist_checkpointing
reshards whatever TP/PP the run used), dropout off.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_sed.backend import cpu as cpu_backend
from megatron_sed.checkpointing import layout
from megatron_sed.checkpointing.layout import CheckpointError, resolve_dist_ckpt_dir
from megatron_sed.model import build_gpt_model, te_available


def resolve_checkpoint_dir(load: str, iteration: int | None = None, flag: str = "--iteration") -> Path:
    """--load may be a save dir (with latest_checkpointed_iteration.txt), or a
    release/ / iter_NNNNNNN/ checkpoint dir; --iteration picks iter_NNNNNNN of a save dir.
    Resolved by checkpointing.layout's one resolver; its errors become CheckpointErrors.
    `flag`: the caller's name for the iteration (the RL CLI's is --ckpt-step)."""
    try:
        return resolve_dist_ckpt_dir(load, iteration, flag=flag)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(f"--load {load}: {err}") from None


def read_common_state(ckpt_dir: Path) -> dict:
    state = layout.read_common_state(ckpt_dir)
    if not hasattr(state.get("args"), "__dict__"):
        raise CheckpointError(f"{ckpt_dir} holds no Megatron 'args': cannot rebuild the model")
    return state


# The parallel layout a checkpoint's args may describe, as one process rebuilds it: the
# dist checkpoint reshards to it on load.
SINGLE_PROCESS_LAYOUT = dict(
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None,
    pipeline_model_parallel_layout=None,
    decoder_first_pipeline_num_layers=None,
    decoder_last_pipeline_num_layers=None,
    account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False,
    context_parallel_size=1,
    expert_model_parallel_size=1,
    expert_tensor_parallel_size=1,
    sequence_parallel=False,
)


def eval_args(ckpt_args: argparse.Namespace) -> argparse.Namespace:
    """The checkpoint's args, made single-process and deterministic. The model is built
    from them by the one TransformerConfig builder (megatron_sed.model.config), as the
    trainer built it apart from the layout, dropout and what this machine can run."""
    a = copy.copy(ckpt_args)
    for name, value in SINGLE_PROCESS_LAYOUT.items():
        setattr(a, name, value)
    a.hidden_dropout = 0.0
    a.attention_dropout = 0.0
    # Outside Megatron's DDP there is no main_grad to accumulate into (RL trains this model).
    a.gradient_accumulation_fusion = False
    a.device = "cpu" if not torch.cuda.is_available() else getattr(a, "device", "auto")
    if getattr(a, "transformer_impl", None) == "transformer_engine":
        if not te_available():
            a.transformer_impl = "local"  # same parameter names, see megatron_sed.model
    a.fp8 = None  # Megatron's dest of --fp8-format: weights load the same without FP8
    return a


def load_model(load: str, iteration: int | None = None, flag: str = "--iteration"):
    """(model in eval mode, its args, the checkpoint dir, common state). Needs
    torch.distributed and megatron parallel_state initialised at world size 1."""

    ckpt_dir = resolve_checkpoint_dir(load, iteration, flag)
    common = read_common_state(ckpt_dir)
    args = eval_args(common["args"])
    if not getattr(args, "padded_vocab_size", None) and not getattr(args, "vocab_size", None):
        raise CheckpointError(f"{ckpt_dir}: the checkpoint's args hold no vocab size")
    if getattr(args, "num_experts", None) and not cpu_backend.gpu_present():
        # MoE layers go through Megatron's token dispatchers and router, which allocate on
        # torch.cuda.current_device(): without a GPU they need the CPU backend, as in training.
        cpu_backend.install()
    try:
        model = build_gpt_model(args)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot rebuild the model from {ckpt_dir}'s args: {err}") from err
    sharded = model.sharded_state_dict()
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    except Exception as err:  # noqa: BLE001 - missing keys, shape mismatch, corrupt files
        raise CheckpointError(
            f"cannot load the model weights from {ckpt_dir}: {type(err).__name__}: {err}"
        ) from err
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint lacks {missing[:5]}")
    model.eval()
    return model, args, ckpt_dir, common
