"""HF Llama / Qwen2 / Qwen3 / Qwen3-MoE folder -> Megatron-Core dist checkpoint (torch_dist), streamed.

Nothing is materialised up front: the sharded state dict holds `meta` tensors (shape
and dtype only) and a planner builds each tensor from the memory-mapped safetensors
just before torch.distributed.checkpoint writes it. Peak memory is about one layer's
largest tensor (a few hundred MB for 7B models), whatever the model size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
from tqdm import tqdm

from megatron_sed.checkpointing.layout import HF_ASSETS, MODEL_METADATA, RELEASE
from megatron_sed.checkpointing.process_group import single_process_group
from megatron_sed.checkpointing.torch_dist_sync import SyncTorchDistSaveStrategy
from megatron_sed.checkpointing.writer import checkpoint_state, write_checkpoint
from megatron_sed.convert.hf_folder import CheckpointError, HFModelFolder
from megatron_sed.convert.mapping import EXPERT_KEY, expected_hf_shapes, param_maps
from megatron_sed.convert.shape import ModelShape, megatron_args, shape_from_hf_config
from megatron_sed.utils.files import atomic_output_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMAT = "megatron-sed-convert"
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
FORMAT_VERSION = 1


def log(msg: str) -> None:
    print(f" > {msg}", flush=True)


def check_hf_tensors(hf: HFModelFolder, shape: ModelShape) -> None:
    """Every tensor the config implies is present with the right shape; nothing unknown."""
    expected = expected_hf_shapes(shape)
    present = {n: hf.shape(n) for n in hf.names()}
    problems = []
    for name, want in expected.items():
        if name not in present:
            problems.append(f"missing tensor {name} (expected shape {list(want)})")
        elif tuple(present[name]) != tuple(want):
            problems.append(
                f"tensor {name} has shape {list(present[name])}, config.json implies {list(want)}"
            )
    ignorable = ("rotary_emb.inv_freq",)
    extra = [
        n
        for n in present
        if n not in expected
        and not n.endswith(ignorable)
        and not (n == "lm_head.weight" and shape.tie_embeddings)
    ]
    problems += [
        f"unexpected tensor {n} (not part of a {shape.model_type} model with this config.json)" for n in extra
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"{hf.folder} does not match its config.json:\n  " + "\n  ".join(problems[:10]) + more
        )


def _lazy_planner_factory(
    producers: dict[tuple[str, int], Callable[[], torch.Tensor]], bar: tqdm, written: list
):

    class StreamingSavePlanner(MCoreSavePlanner):
        """Builds each tensor only when the writer asks for it."""

        def resolve_data(self, write_item):
            idx = write_item.index
            if write_item.tensor_data is None:  # a ShardedObject (bytes)
                return super().resolve_data(write_item)
            make = producers.get((idx.fqn, tuple(int(o) for o in idx.offset)))
            if make is None:
                return super().resolve_data(write_item)
            t = make()
            want = write_item.tensor_data.chunk.sizes
            written.append(idx.fqn)
            bar.update(1)
            return t.reshape(want).contiguous()

    return lambda: StreamingSavePlanner(flatten_state_dict=False)


def _build_state_dict(hf: HFModelFolder, shape: ModelShape, dtype: torch.dtype):

    sharded, producers = {}, {}
    num_layers = shape.num_layers
    for pm in param_maps(shape):
        layers = range(num_layers) if pm.layered else [None]
        experts = range(pm.experts) if pm.experts else [None]
        for layer in layers:
            for expert in experts:
                names = pm.hf(layer, expert)
                meta = torch.empty(pm.shape, dtype=dtype, device="meta")
                if pm.experts:
                    st = ShardedTensor.from_rank_offsets(
                        pm.key,
                        meta,
                        (0, layer, num_layers),
                        (1, expert, pm.experts),
                        replica_id=0,
                        prepend_axis_num=2,
                    )
                    name, lead = f"{pm.key}.{layer}.{expert}", (layer, expert)
                elif pm.layered:
                    st = ShardedTensor.from_rank_offsets(
                        pm.key, meta, (0, layer, num_layers), replica_id=0, prepend_axis_num=1
                    )
                    name, lead = f"{pm.key}.{layer}", (layer,)
                else:
                    st = ShardedTensor.from_rank_offsets(pm.key, meta, replica_id=0)
                    name, lead = pm.key, ()

                def make(pm=pm, names=names):
                    return pm.to_mcore([hf.get(n) for n in names]).to(dtype)

                sharded[name] = st
                producers[(pm.key, lead + (0,) * len(pm.shape))] = make
    # `_extra_state` of every linear (None for Megatron's own layers; TE keeps FP8 scaling
    # state there) as GPTModel saves it: Megatron-LM's strict loading asks for them.
    # TE's core_attention has one too; keys a model does not ask for are ignored.
    modules = EXTRA_STATE_MODULES if not shape.num_experts else EXTRA_STATE_MODULES[:3]
    for module in modules:
        key = f"decoder.layers.{module}._extra_state"
        for layer in range(num_layers):
            sharded[f"{key}.{layer}"] = ShardedObject(key, None, (num_layers,), (layer,), replica_id=0)
    for module in ("linear_fc1", "linear_fc2") if shape.num_experts else ():
        key = f"{EXPERT_KEY}{module}._extra_state"
        n = shape.num_experts
        for layer in range(num_layers):
            for e in range(n):
                sharded[f"{key}.{layer}.{e}"] = ShardedObject(
                    key, None, (num_layers, n), (layer, e), replica_id=0
                )
    return sharded, producers


def convert_hf_to_mcore(
    hf_dir, out_dir, dtype: str = "auto", force: bool = False, progress: bool = True
) -> Path:
    """Convert; returns the output folder. See module docstring and docs/convert.md."""

    t0 = time.time()
    hf = HFModelFolder(hf_dir)
    shape = shape_from_hf_config(hf.config)
    check_hf_tensors(hf, shape)
    if dtype == "auto":
        torch_dtype = hf.dtype("model.embed_tokens.weight")
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    log(
        f"converting {hf.folder.name} ({shape.model_type}, {shape.num_layers} layers, hidden "
        f"{shape.hidden_size}, {shape.num_attention_heads} heads / {shape.num_query_groups} "
        f"groups, vocab {shape.vocab_size}) to Megatron-Core torch_dist in {torch_dtype}"
    )
    args = megatron_args(shape)
    with atomic_output_dir(out_dir, force=force) as tmp:
        sharded, producers = _build_state_dict(hf, shape, torch_dtype)
        # A release checkpoint, as Megatron-LM's converters write one: its loader reads
        # `args` and `checkpoint_version` for --use-checkpoint-args / --finetune.
        saved = argparse.Namespace(
            **args, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, iteration=0
        )
        bar = tqdm(total=len(producers), desc="writing tensors", unit="tensor", disable=not progress)
        written = []
        with single_process_group(tmp), bar:
            write_checkpoint(
                tmp,
                RELEASE,
                checkpoint_state(sharded, saved, 0),
                sharded_strategy=SyncTorchDistSaveStrategy(
                    planner_factory=_lazy_planner_factory(producers, bar, written)
                ),
            )
        if len(written) != len(producers):  # every tensor must come from the HF folder
            raise RuntimeError(f"wrote {len(written)} of {len(producers)} tensors")
        assets = tmp / HF_ASSETS
        assets.mkdir()
        for f in hf.tokenizer_files() + [hf.folder / "config.json"]:
            shutil.copy2(f, assets / f.name)
        meta = dict(
            format=FORMAT,
            version=FORMAT_VERSION,
            source=hf.folder.name,
            architecture=hf.config.get("architectures", [None])[0],
            dtype=str(torch_dtype).replace("torch.", ""),
            model=shape.to_dict(),
            megatron_args=args,
            hf_config=hf.config,
            tokenizer_dir=HF_ASSETS,
        )
        (tmp / MODEL_METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log(f"wrote {out_dir} ({len(producers)} tensors) in {time.time() - t0:.1f} s")
    return Path(out_dir)
