"""Read regions of tensors from a `torch_dist` checkpoint, without a process group.

`dist_checkpointing.load` needs torch.distributed and, at world size 1, cannot load a
*part* of a tensor (Megatron places every other shard on "rank (r+1) % world" = itself).
Converters want exactly that: one layer of a stacked [num_layers, ...] tensor at a time,
so that memory stays bounded by a layer, not by the model. This reader plans the reads
itself with torch.distributed.checkpoint's helpers; the checkpoint chunking (how many
ranks wrote it, at which TP) does not matter.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


class _RegionLoadPlanner(DefaultLoadPlanner):
    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, dest) in self.regions.items():
            md = self.metadata.state_dict_metadata[fqn]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.size())
            items += create_read_items_for_chunk_list(fqn, md, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.regions[index.fqn][1]

    def commit_tensor(self, read_item, tensor):  # data was read in place
        pass


class TorchDistReader:
    """Tensor metadata and region reads of one torch_dist checkpoint directory (the one
    holding `.metadata`)."""

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = Path(ckpt_dir)
        if not (self.ckpt_dir / ".metadata").is_file():
            raise FileNotFoundError(f"{self.ckpt_dir} is not a torch_dist checkpoint (no .metadata file)")
        self._reader = dcp.FileSystemReader(str(self.ckpt_dir))
        self.metadata: Metadata = self._reader.read_metadata()

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{sharded key: (global shape, dtype)} for every tensor in the checkpoint."""
        return {
            k: (tuple(md.size), md.properties.dtype)
            for k, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def read(
        self,
        requests: dict[str, tuple[Optional[Sequence[int]], Sequence[int]]],
        dtype: Optional[torch.dtype] = None,
    ) -> dict[str, torch.Tensor]:
        """Read several regions in one pass.

        requests: {key: (offsets or None for the origin, sizes)}; returns {key: tensor}.
        A request may not name a key twice (read twice for two regions of one key)."""
        shapes = self.tensor_shapes()
        regions = {}
        for key, (offsets, sizes) in requests.items():
            if key not in shapes:
                raise KeyError(f"tensor {key!r} is not in checkpoint {self.ckpt_dir}")
            shape, ck_dtype = shapes[key]
            offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
            sizes = tuple(sizes)
            if (
                len(offsets) != len(shape)
                or len(sizes) != len(shape)
                or any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape))
            ):
                raise ValueError(
                    f"region offsets={offsets} sizes={sizes} is outside tensor {key!r} "
                    f"of shape {shape} in {self.ckpt_dir}"
                )
            regions[key] = (offsets, torch.empty(sizes, dtype=ck_dtype))
        if regions:
            with warnings.catch_warnings():  # "assuming ... a single process": intended
                warnings.filterwarnings("ignore", message=".*single process.*")
                dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(regions), no_dist=True)
        return {k: (t if dtype is None else t.to(dtype)) for k, (_, t) in regions.items()}

    def read_full(self, key: str) -> torch.Tensor:
        shape, _ = self.tensor_shapes()[key]
        return self.read({key: (None, shape)})[key]
