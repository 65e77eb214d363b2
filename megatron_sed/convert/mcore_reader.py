"""Model weights of a Megatron-Core dist checkpoint, read one layer at a time.

Works for checkpoints written by this project (converter or trainer) and by Megatron-LM
(weights only; optimizer and RNG entries are ignored). It recognises both norm
namings (fused, as Megatron-Core writes for the local and TE specs, and separate) and
both layouts Megatron-Core writes: layers stacked on a leading axis
(`decoder.layers.<name>`, fc1 as one key with [gate; up] fragments) and, with
`singleton_local_shards`, one key per layer (`decoder.layers.<i>.<name>`, fc1 as
`..._w` / `..._v`). Every shape is checked against the expected model before any tensor
is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_sed.checkpointing.reader import TorchDistReader
from megatron_sed.convert.hf_folder import CheckpointError
from megatron_sed.convert.mapping import NORM_KEYS, ParamMap, param_maps
from megatron_sed.convert.shape import ModelShape

FC1 = "decoder.layers.mlp.linear_fc1.weight"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _per_layer(key: str, layer: int) -> str:
    return key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)


def detect_layout(keys) -> tuple:
    """(norm naming, per_layer) of a checkpoint's key set."""
    for spec, names in NORM_KEYS.items():
        if names["input"] in keys:
            return spec, False
        if _per_layer(names["input"], 0) in keys:
            return spec, True
    raise CheckpointError(
        "checkpoint has no input layernorm weights (neither "
        + " nor ".join(n["input"] for n in NORM_KEYS.values())
        + "): not a Llama/Qwen2-style GPTModel checkpoint"
    )


class MCoreModelReader:
    """Layer-wise access to the GPTModel weights in `ckpt_dir` (the dir with .metadata)."""

    def __init__(self, ckpt_dir: str | Path, shape: ModelShape):
        self.reader = TorchDistReader(ckpt_dir)
        self.shape = shape
        self.shapes = self.reader.tensor_shapes()
        self.norm_naming, self.per_layer = detect_layout(self.shapes)
        fc1 = _per_layer(FC1, 0) if self.per_layer else FC1
        self.split_fc1 = fc1 not in self.shapes and f"{fc1}_w" in self.shapes
        self.maps = param_maps(shape, self.norm_naming)
        self._check()

    def _stored_keys(self, pm: ParamMap, layer: Optional[int] = None) -> list[str]:
        """Checkpoint keys holding `pm` (for `layer` in the per-layer layout)."""
        key = _per_layer(pm.key, layer) if (pm.layered and self.per_layer) else pm.key
        if pm.key == FC1 and self.split_fc1:
            return [f"{key}_w", f"{key}_v"]
        return [key]

    def _check(self) -> None:
        num_layers, problems = self.shape.num_layers, []
        for pm in self.maps:
            layers = range(num_layers) if (pm.layered and self.per_layer) else [None]
            for key in [k for layer in layers for k in self._stored_keys(pm, layer)]:
                want = list(pm.shape)
                if pm.key == FC1 and self.split_fc1:  # fc1 halves
                    want[0] //= 2
                lead = [num_layers, pm.experts] if pm.experts else [num_layers]
                want = tuple(lead + want if (pm.layered and not self.per_layer) else want)
                if key not in self.shapes:
                    problems.append(f"missing tensor {key} (expected shape {list(want)})")
                    continue
                got = self.shapes[key][0]
                if key in VOCAB_KEYS:  # padded vocab rows are allowed (and dropped)
                    ok = len(got) == 2 and got[1] == want[1] and got[0] >= want[0]
                else:
                    ok = tuple(got) == want
                if not ok:
                    problems.append(
                        f"tensor {key} has shape {list(got)}, the model "
                        f"({self.shape.model_type}, {num_layers} layers) needs {list(want)}"
                    )
        if self.per_layer and any(pm.experts for pm in self.maps):
            problems.append(
                "per-layer keys (singleton_local_shards) with MoE experts are not supported: "
                "save the checkpoint without --ckpt-... singleton shards"
            )
        if self.per_layer and _per_layer(self.maps[1].key, num_layers) in self.shapes:
            problems.append(f"checkpoint has more than the model's {num_layers} layers")
        if self.shape.tie_embeddings and "output_layer.weight" in self.shapes:
            problems.append(
                "checkpoint has output_layer.weight but the model ties embeddings "
                "(untied weights cannot be exported as a tied HF model)"
            )
        if problems:
            raise CheckpointError(
                f"{self.reader.ckpt_dir} does not match the model:\n  " + "\n  ".join(problems)
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.shapes["embedding.word_embeddings.weight"][1]

    def _read(self, layer: Optional[int], maps: list[ParamMap]) -> dict[str, torch.Tensor]:
        stacked = layer is not None and not self.per_layer
        reqs = {}
        for pm in maps:
            for key in self._stored_keys(pm, layer):
                shape = self.shapes[key][0]
                if stacked:  # this layer's slice (all its experts for expert tensors)
                    reqs[key] = ((layer,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:]))
                else:
                    rows = self.shape.vocab_size if key in VOCAB_KEYS else shape[0]
                    reqs[key] = (None, (rows,) + tuple(shape[1:]))
        got = self.reader.read(reqs)
        out = {}
        for pm in maps:
            parts = [got[k][0] if stacked else got[k] for k in self._stored_keys(pm, layer)]
            out[pm.key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out

    def global_tensors(self) -> dict[str, torch.Tensor]:
        """Non-layer tensors (embedding, final norm, output layer), vocab padding dropped."""
        return self._read(None, [pm for pm in self.maps if not pm.layered])

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's tensors; expert tensors as [num_experts, ...]."""
        return self._read(layer, [pm for pm in self.maps if pm.layered])
