"""A local Hugging Face model folder: config.json, safetensors weights, tokenizer files.

Weights are opened lazily with `safetensors.safe_open` (memory-mapped), so a converter
holds only the tensors it is working on. Every file's header is checked against its
size up front: a truncated download fails here, naming the file, before anything is
written.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

# Files a tokenizer / chat template / generation defaults may live in; copied verbatim.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


from megatron_sed.checkpointing.layout import CheckpointError  # noqa: E402,F401 (re-export)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of one .safetensors file, after checking that the file is as long
    as its header says (a truncated file is the common failure of large downloads)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes): no safetensors header")
        (hlen,) = struct.unpack("<Q", raw)
        if 8 + hlen > size:
            raise CheckpointError(f"{path} is truncated: header claims {hlen} bytes, file has {size}")
        try:
            header = json.loads(f.read(hlen))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + hlen + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + hlen + end} bytes, file has {size}"
        )
    return header


class HFModelFolder:
    """Lazy access to the weights and config of a local HF causal-LM folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"HF model folder {self.folder} does not exist")
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.folder} has no config.json")
        self.config: dict = json.loads(cfg_path.read_text())
        self._index: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        self._handles: dict[Path, object] = {}
        for path in self._weight_files():
            for name, info in read_safetensors_header(path).items():
                if name in self._index:
                    raise CheckpointError(f"tensor {name} appears in two files of {self.folder}")
                dtype = _ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                self._index[name] = (path, tuple(info["shape"]), dtype)

    def _weight_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists weight files that are missing: {', '.join(missing)}")
            return files
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        if list(self.folder.glob("*.bin")) or list(self.folder.glob("*.pth")):
            raise CheckpointError(
                f"{self.folder} holds only PyTorch .bin weights; re-save it with "
                "save_pretrained(..., safe_serialization=True) to get safetensors"
            )
        raise CheckpointError(f"{self.folder} has no model.safetensors(.index.json)")

    def names(self) -> list[str]:
        return list(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._index[name][2]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only this tensor's bytes are touched)."""
        if name not in self._index:
            raise CheckpointError(f"tensor {name} is not in {self.folder}")
        path = self._index[name][0]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / f for f in TOKENIZER_FILES if (self.folder / f).is_file()]
