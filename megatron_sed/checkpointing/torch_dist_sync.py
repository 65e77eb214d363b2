"""Synchronous `torch_dist` save strategy for Megatron-Core's dist_checkpointing.

Megatron-Core's default torch_dist save strategy is the async one
(`TorchDistSaveShardedStrategy` + `FileSystemWriterAsync`), built for GPUs (it calls
`torch.cuda.synchronize()`). This strategy, a subclass of it (megatron-core 0.19 accepts
no other), does the same translation (MCore ShardedTensors -> PyTorch ShardedTensors, `MCoreSavePlanner`) and
then saves synchronously with torch.distributed.checkpoint's plain `FileSystemWriter`.
The files are the same format (`.metadata`, `__<rank>_<n>.distcp`), so
`dist_checkpointing.load` reads them like any Megatron checkpoint, at any TP/PP.

The project's one checkpoint writer (megatron_sed.checkpointing.writer.write_checkpoint)
saves with it: `dist_checkpointing.save(sharded_sd, ckpt_dir,
sharded_strategy=SyncTorchDistSaveStrategy())`, which still writes the common state and
metadata.json itself.

`planner_factory` lets a caller supply tensor data lazily (e.g. a converter that
streams weights from safetensors): the planner's `resolve_data` is called once per
write item, just before that item is written, so memory stays bounded by the
largest item.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """`torch_dist` (version 1) checkpoint writer without CUDA or async machinery."""

    def __init__(
        self,
        backend: str = "torch_dist",
        version: int = 1,
        thread_count: int = 1,
        planner_factory: Optional[Callable[[], MCoreSavePlanner]] = None,
    ):
        super().__init__(backend, version, thread_count=thread_count)
        self.planner_factory = planner_factory or (lambda: MCoreSavePlanner(flatten_state_dict=False))

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> None:
        # keep_only_main_replica=True: each shard is written once, by its main replica
        # (replica_id == 0), exactly as Megatron's own strategy does.
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, is_loading=False)
        writer = dcp.FileSystemWriter(
            str(checkpoint_dir),
            single_file_per_rank=True,
            sync_files=True,
            thread_count=self.thread_count,
        )
        dcp.save(pyt_state_dict, storage_writer=writer, planner=self.planner_factory())

    def can_handle_sharded_objects(self) -> bool:
        return True
