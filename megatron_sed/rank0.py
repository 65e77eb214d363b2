"""print_rank_0: Megatron's console convention (one line per job, from global rank 0)."""

import torch.distributed as dist


def print_rank_0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)
