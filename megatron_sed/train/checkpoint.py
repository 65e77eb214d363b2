"""Checkpoints in Megatron-Core's dist_checkpointing torch_dist format, Megatron-LM's
layout: SAVE/iter_0000100/ (sharded tensors + common.pt + metadata.json) and
SAVE/latest_checkpointed_iteration.txt.

Contents: model (TP-sharded, readable at any TP), optimizer state (exp_avg/exp_avg_sq
sharded like their parameters), scheduler, per-rank RNG states, iteration, consumed
samples (the data position), the SED threshold tau (`sed` entry, also in
megatron_sed.json next to the shards) and the model-shape arguments.

Atomic: every rank writes into iter_XXXXXXX.tmp; rank 0 renames the directory and only
then rewrites the tracker file (temp + os.replace), so a crash mid-save leaves the
previous checkpoint and tracker untouched.

CPU: written with megatron_sed.checkpointing.SyncTorchDistSaveStrategy (same format as
Megatron's torch_dist writer, which needs CUDA in 0.16.1). GPU with Megatron's optimizer:
its own sharded_state_dict / load_state_dict.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_SHAPE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "seq_length", "max_position_embeddings",
    "position_embedding_type", "rotary_base", "rotary_percent", "normalization", "norm_epsilon",
    "swiglu", "untie_embeddings_and_output_weights", "disable_bias_linear", "add_qkv_bias",
    "padded_vocab_size", "vocab_size", "tokenizer_type", "tokenizer_model",
)


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, got {text!r}") from None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> Dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": _cuda_tracker_states(),
    }


def _cuda_tracker_states():
    if not torch.cuda.is_available():
        return None
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def _set_rng_state(state: Dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _ensure_torch_optim_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero Adam moments so the state has the structure a checkpoint fills."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _torch_optimizer_sharded(optimizer, model_sd) -> Dict:
    from itertools import chain

    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    _ensure_torch_optim_state(optimizer)
    state = optimizer.state_dict()
    steps = {int(v["step"]) for v in state["state"].values()}
    id_map = get_param_id_to_sharded_param_map(
        model_sd, chain.from_iterable(g["params"] for g in optimizer.param_groups)
    )
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    state["adam_step"] = max(steps) if steps else 0
    return state


def _load_torch_optimizer(optimizer, loaded: Dict) -> None:
    step = loaded.pop("adam_step")
    for st in loaded["state"].values():
        st["step"] = torch.tensor(float(step))
    optimizer.load_state_dict(loaded)


def _sharded_state(model, optimizer, scheduler, args, iteration, consumed, sed_state, for_load,
                   with_optim=True, with_rng=True) -> Dict:
    core = _unwrap(model)
    model_sd = core.sharded_state_dict(prefix="")
    sd = {"model": model_sd}
    if with_optim and optimizer is not None:
        if isinstance(optimizer, torch.optim.Optimizer):
            sd["optimizer"] = _torch_optimizer_sharded(optimizer, model_sd)
        else:  # Megatron-Core optimizer (GPU)
            sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=for_load)
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    sd["iteration"] = iteration
    sd["consumed_train_samples"] = consumed
    sd["sed"] = dict(sed_state or {})
    sd["args"] = {k: getattr(args, k, None) for k in MODEL_SHAPE_ARGS}
    sd["checkpoint_version"] = 3.0
    return sd


def _save_strategy():
    if torch.cuda.is_available():
        return None  # Megatron-Core's default torch_dist strategy
    from megatron_sed.checkpointing import SyncTorchDistSaveStrategy

    return SyncTorchDistSaveStrategy()


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, args,
                    consumed_samples: int, sed_state: Optional[Dict] = None) -> str:
    """Write SAVE/iter_XXXXXXX atomically and point the tracker at it. Collective."""
    rank = dist.get_rank()
    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # leftovers of a crashed save
        os.makedirs(tmp)
    dist.barrier()
    sd = _sharded_state(model, optimizer, scheduler, args, iteration, consumed_samples, sed_state,
                        for_load=False)
    dist_checkpointing.save(sd, tmp, sharded_strategy=_save_strategy())
    dist.barrier()
    if rank == 0:
        info = {"iteration": iteration, "consumed_train_samples": consumed_samples,
                "sed": dict(sed_state or {}), "args": sd["args"],
                "loss_type": getattr(args, "loss_type", None)}
        _write_atomic(os.path.join(tmp, "megatron_sed.json"), json.dumps(info, indent=2, default=str))
        old = None
        if os.path.exists(final):
            old = final + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _write_atomic(os.path.join(root, TRACKER), str(iteration))
        if old:
            shutil.rmtree(old)
    dist.barrier()
    return final


def has_checkpoint(root: str) -> bool:
    """Whether `root` holds anything --load can read: a tracker file (iteration or
    'release') or a bare dist checkpoint directory. An empty or missing --load directory
    is not an error, as in Megatron-LM: the run starts from scratch (the usual pattern of
    passing --save and --load the same directory from the first job on)."""
    return os.path.exists(os.path.join(root, TRACKER)) or os.path.exists(
        os.path.join(root, "metadata.json")
    )


def load_checkpoint(root: str, model, optimizer, scheduler, args) -> Dict:
    """Load the tracker's checkpoint into model/optimizer/scheduler/RNG. Returns
    {iteration, consumed_train_samples, sed} (iteration 0 and no optimizer with --finetune)."""
    iteration = read_tracker(root)
    ckpt = root
    # Megatron-LM's "release" marker (converted weights, e.g. megatron_sed.convert): the
    # release/ directory, weights only, iteration 0 -- i.e. --finetune semantics.
    release = open(os.path.join(root, TRACKER)).read().strip() == "release" \
        if iteration is not None else False
    if release:
        ckpt = os.path.join(root, "release")
    elif iteration is not None:
        ckpt = iter_dir(root, iteration)
    elif not os.path.exists(os.path.join(root, "metadata.json")):
        raise FileNotFoundError(
            f"--load {root}: no {TRACKER} and not a dist checkpoint directory (metadata.json missing)"
        )
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--load {root}: tracker points at missing {ckpt}")
    common = dist_checkpointing.load_common_state_dict(ckpt)
    finetune = args.finetune or release
    with_optim = not (finetune or args.no_load_optim) and "optimizer" in common
    with_rng = not (finetune or args.no_load_rng)
    saved_args = common.get("args") or {}
    if isinstance(saved_args, argparse.Namespace):  # Megatron-LM / converter checkpoints
        saved_args = vars(saved_args)
    _check_shape(saved_args, args, root)
    sd = _sharded_state(model, optimizer, scheduler, args, 0, 0, None, for_load=True,
                        with_optim=with_optim, with_rng=with_rng)
    try:
        loaded = dist_checkpointing.load(sd, ckpt)
    except Exception as err:
        if with_rng and "rng_state" in str(err):
            raise RuntimeError(
                f"--load {root}: RNG states were saved with another world size; add --no-load-rng"
            ) from err
        raise
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if with_optim:
        if isinstance(optimizer, torch.optim.Optimizer):
            _load_torch_optimizer(optimizer, loaded["optimizer"])
        else:
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    if finetune:
        return {"iteration": 0, "consumed_train_samples": 0, "sed": {}}
    return {"iteration": int(loaded["iteration"]),
            "consumed_train_samples": int(loaded["consumed_train_samples"]),
            "sed": dict(loaded.get("sed") or {})}


def _check_shape(saved: Dict, args, root: str) -> None:
    """Name every model-shape flag that disagrees with the checkpoint."""
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "normalization", "swiglu", "untie_embeddings_and_output_weights", "disable_bias_linear",
            "position_embedding_type", "padded_vocab_size")
    bad = [f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, flags {getattr(args, k, None)!r}"
           for k in keys if saved.get(k) is not None and saved.get(k) != getattr(args, k, None)]
    if bad:
        raise ValueError(f"--load {root}: model shape differs from the flags:\n  " + "\n  ".join(bad))
