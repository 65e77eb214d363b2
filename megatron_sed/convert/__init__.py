"""HF Llama / Qwen2 / Qwen3 / Qwen3-MoE <-> Megatron-Core dist checkpoints (see docs/convert.md).

from megatron_sed.convert import convert_hf_to_mcore, convert_mcore_to_hf
"""

from megatron_sed.convert.hf_folder import CheckpointError
from megatron_sed.convert.hf_to_mcore import convert_hf_to_mcore
from megatron_sed.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_sed.convert.shape import ModelShape, megatron_args, shape_from_hf_config

__all__ = [
    "CheckpointError",
    "ModelShape",
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "megatron_args",
    "shape_from_hf_config",
]
