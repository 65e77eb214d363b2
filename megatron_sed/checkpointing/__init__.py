"""Checkpoint I/O shared by the trainer and the converters.

- `SyncTorchDistSaveStrategy`: dist_checkpointing's torch_dist format, written
  synchronously (Megatron-Core 0.16.1's default writer needs CUDA).
- `TorchDistReader`: read (parts of) tensors of a torch_dist checkpoint without a process
  group, e.g. one layer at a time.
- `single_process_group`: a world-size-1 gloo group for offline tools.
- `writer` (megatron_sed.checkpointing.writer): the one checkpoint writer outside
  Megatron's loop (converter, RL, test fixtures), in the layout Megatron's save_checkpoint
  writes: `checkpoint_state`, `write_checkpoint`.
- `layout` (megatron_sed.checkpointing.layout): where things live in a checkpoint
  directory (tracker file, iter_NNNNNNN, release), `CHECKPOINT_VERSION`, and the one
  `--iteration` / `--ckpt-step` resolver `resolve_dist_ckpt_dir`.
"""

from megatron_sed.checkpointing.process_group import single_process_group
from megatron_sed.checkpointing.reader import TorchDistReader
from megatron_sed.checkpointing.torch_dist_sync import SyncTorchDistSaveStrategy

__all__ = ["SyncTorchDistSaveStrategy", "TorchDistReader", "single_process_group"]
