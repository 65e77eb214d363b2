"""RL checkpoints in the trainer's layout, written by the one checkpoint writer
(megatron_sed.checkpointing.writer), so that eval.loading.load_model,
`python -m megatron_sed.eval`, the converter and Megatron's own loader read them like any
megatron-sed-train checkpoint:

    SAVE/latest_checkpointed_iteration.txt   the last complete iteration (written last)
    SAVE/iter_NNNNNNN/                       torch_dist: the model's sharded state dict +
                                             common state {args, checkpoint_version 3.0,
                                             iteration, rl_state}

`rl_state` (the AdamW state, the GRPOConfig, where the run started) lets `--load SAVE`
resume the RL run exactly; readers that do not know it ignore it. The model is written at
TP 1 / PP 1 (the harness runs one process); dist checkpointing reshards on load.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

from megatron_sed.checkpointing.layout import CheckpointError
from megatron_sed.checkpointing.writer import checkpoint_state, write_checkpoint


def saved_args(ckpt_args: argparse.Namespace, iteration: int, rl_config: dict) -> argparse.Namespace:
    """The loaded checkpoint's Megatron args (model shape, tokenizer, SED tau...), at the
    layout this process writes, with the RL settings recorded beside them."""
    a = copy.copy(ckpt_args)
    a.tensor_model_parallel_size = 1
    a.pipeline_model_parallel_size = 1
    a.iteration = iteration
    a.rl_config = dict(rl_config)
    return a


def save_rl_checkpoint(
    root: str | os.PathLike, iteration: int, model, ckpt_args, optimizer, rl_state: dict
) -> Path:
    """Write SAVE/iter_NNNNNNN and then point the tracker at it (a crash in between leaves
    the previous checkpoint the one that loads)."""
    state = checkpoint_state(
        model.sharded_state_dict(),
        saved_args(ckpt_args, iteration, rl_state.get("config", {})),
        iteration,
        rl_state=dict(rl_state, optimizer=optimizer.state_dict()),
    )
    try:
        return write_checkpoint(root, iteration, state)
    except CheckpointError as err:
        raise CheckpointError(f"--save {root}: {err}") from None
