"""Megatron-Core dist checkpoint -> HF folder (safetensors shards + config + tokenizer).

The source is a converted checkpoint, one saved by `megatron_sed.train` or one written
by Megatron-LM. The model shape comes from, in this order: the converter's metadata
(`megatron_sed_model.json` next to the checkpoint), a `--reference` folder (a converted
checkpoint or the original HF folder), or the Megatron `args` stored in the checkpoint's
common.pt (Megatron-LM checkpoints; then `--model-type` picks Llama or Qwen2 naming).
Layers are read and written one at a time; safetensors shards are flushed at
`max_shard_bytes`, so memory stays bounded by one shard.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_sed.checkpointing.layout import (
    HF_ASSETS,
    MODEL_METADATA,
    find_model_metadata,
    read_common_state,
    resolve_dist_ckpt_dir,
)
from megatron_sed.checkpointing.reader import TorchDistReader
from megatron_sed.convert.hf_folder import TOKENIZER_FILES, CheckpointError
from megatron_sed.convert.hf_to_mcore import DTYPES, log
from megatron_sed.convert.mapping import param_maps
from megatron_sed.convert.mcore_reader import MCoreModelReader
from megatron_sed.convert.shape import ARCHITECTURES, ModelShape, shape_from_hf_config
from megatron_sed.utils.files import atomic_output_dir


def shape_from_megatron_args(args, model_type: str, vocab_size: int) -> ModelShape:
    """ModelShape from a Megatron-LM args namespace (as stored in common.pt)."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    problems = []
    if not g("swiglu"):
        problems.append("--swiglu is off")
    if g("normalization") != "RMSNorm":
        problems.append(f"--normalization is {g('normalization')!r}, not RMSNorm")
    if g("position_embedding_type") != "rope":
        problems.append(f"--position-embedding-type is {g('position_embedding_type')!r}")
    if g("add_bias_linear", False):
        problems.append("linear biases are on (no --disable-bias-linear)")
    if problems:
        raise CheckpointError("the checkpoint's model is not Llama/Qwen-shaped: " + "; ".join(problems))
    experts = g("num_experts")
    if experts:
        for name, want in (("moe_layer_freq", 1), ("moe_shared_expert_intermediate_size", None)):
            if g(name, want) != want:
                problems.append(f"--{name.replace('_', '-')} is {g(name)!r} (Qwen3-MoE: {want!r})")
        if g("moe_router_score_function", "softmax") != "softmax" or g("moe_router_topk_scaling_factor"):
            problems.append("the router is not a plain softmax top-k router")
        if problems:
            raise CheckpointError("the checkpoint's MoE is not Qwen3-MoE-shaped: " + "; ".join(problems))
    moe = {}
    if experts:
        moe = dict(
            num_experts=int(experts),
            moe_ffn_hidden_size=int(g("moe_ffn_hidden_size") or g("ffn_hidden_size")),
            moe_router_topk=int(g("moe_router_topk", 2)),
            norm_topk_prob=not g("moe_router_pre_softmax", False),
        )
    heads = g("num_attention_heads")
    return ModelShape(
        model_type=model_type,
        num_layers=g("num_layers"),
        hidden_size=g("hidden_size"),
        ffn_hidden_size=g("ffn_hidden_size"),
        num_attention_heads=heads,
        num_query_groups=g("num_query_groups") if g("group_query_attention") else heads,
        kv_channels=g("kv_channels") or g("hidden_size") // heads,
        vocab_size=vocab_size,
        max_position_embeddings=g("max_position_embeddings"),
        rotary_base=float(g("rotary_base", 10000)),
        norm_epsilon=float(g("layernorm_epsilon", g("norm_epsilon", 1e-5))),
        tie_embeddings=not g("untie_embeddings_and_output_weights", False),
        add_qkv_bias=bool(g("add_qkv_bias", False)),
        rope_scaling_factor=float(g("rope_scaling_factor", 8.0)) if g("use_rope_scaling") else None,
        rotary_seq_len_interpolation_factor=g("rotary_seq_len_interpolation_factor"),
        qk_layernorm=bool(g("qk_layernorm", False)),
        **moe,
    )


def infer_model_type(args) -> str:
    """The HF family whose naming fits a Megatron model: Qwen3-MoE (experts), Qwen3 (QK-norm),
    Qwen2 (q/k/v biases), else Llama."""
    if getattr(args, "num_experts", None):
        return "qwen3_moe"
    if getattr(args, "qk_layernorm", False):
        return "qwen3"
    return "qwen2" if getattr(args, "add_qkv_bias", False) else "llama"


def hf_config_from_shape(shape: ModelShape) -> dict:
    """A config.json for `shape`, built by transformers' own config class."""
    from transformers import AutoConfig  # noqa: PLC0415 (heavy; only to write an HF config)

    rope = {"rope_type": "default"}
    if shape.rope_scaling_factor is not None:
        rope = dict(
            rope_type="llama3",
            factor=shape.rope_scaling_factor,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    elif shape.rotary_seq_len_interpolation_factor is not None:
        rope = dict(rope_type="linear", factor=shape.rotary_seq_len_interpolation_factor)
    kwargs = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups,
        head_dim=shape.kv_channels,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.norm_epsilon,
        tie_word_embeddings=shape.tie_embeddings,
        hidden_act="silu",
        rope_theta=shape.rotary_base,
        rope_scaling=rope,
    )
    if shape.model_type in ("qwen3", "qwen3_moe"):
        kwargs.update(attention_bias=False, use_sliding_window=False)
    if shape.num_experts:
        kwargs.update(
            num_experts=shape.num_experts,
            moe_intermediate_size=shape.moe_ffn_hidden_size,
            num_experts_per_tok=shape.moe_router_topk,
            norm_topk_prob=shape.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    cfg = AutoConfig.for_model(shape.model_type, **kwargs).to_dict()
    cfg["architectures"] = [ARCHITECTURES[shape.model_type]]
    if shape_from_hf_config(cfg) != shape:  # the round trip must be exact
        raise CheckpointError(f"transformers cannot express this model shape: {shape}")
    return cfg


def _load_common_args(ckpt_dir: Path):
    try:
        return read_common_state(ckpt_dir).get("args")
    except CheckpointError as e:
        log(f"cannot read Megatron args: {e}")
        return None


def resolve_source(
    load: Path, reference: Optional[Path], model_type: Optional[str], vocab_size: Optional[int]
) -> tuple[Path, ModelShape, dict, Optional[Path]]:
    """(checkpoint dir, shape, HF config dict, tokenizer folder or None)."""
    ckpt = resolve_dist_ckpt_dir(load)
    meta = find_model_metadata(load) or find_model_metadata(ckpt)
    if reference is not None:
        ref_meta = find_model_metadata(reference)
        if ref_meta is not None:
            meta = ref_meta
        elif (reference / "config.json").is_file():
            cfg = json.loads((reference / "config.json").read_text())
            return ckpt, shape_from_hf_config(cfg), cfg, reference
        else:
            raise CheckpointError(
                f"--reference {reference} is neither a converted checkpoint "
                f"(no {MODEL_METADATA}) nor an HF folder (no config.json)"
            )
    args = None
    if meta is None:
        # A megatron_sed.train checkpoint of a converted model: its --tokenizer-model is the
        # converted folder's hf/, next to the converter metadata.
        args = _load_common_args(ckpt)
        tok_model = getattr(args, "tokenizer_model", None) if args is not None else None
        if tok_model and Path(tok_model).is_dir():
            meta = find_model_metadata(tok_model)
    if meta is not None:
        tok = Path(meta["_root"]) / meta.get("tokenizer_dir", HF_ASSETS)
        return ckpt, ModelShape.from_dict(meta["model"]), meta["hf_config"], tok
    if args is None:
        raise CheckpointError(
            f"{load}: no {MODEL_METADATA} and no Megatron args in the checkpoint; pass "
            "--reference (the converted checkpoint or the original HF folder)"
        )
    if model_type is None:
        model_type = infer_model_type(args)

    rows = TorchDistReader(ckpt).tensor_shapes()["embedding.word_embeddings.weight"][0][0]
    shape = shape_from_megatron_args(args, model_type, vocab_size or rows)
    return ckpt, shape, hf_config_from_shape(shape), None


class _ShardWriter:
    """Accumulates tensors and flushes safetensors shards of at most `max_bytes`."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += n
        self.total += n

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out / fname), metadata={"format": "pt"})
        self.files.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (fname, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / fname).rename(self.out / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_mcore_to_hf(
    load,
    out_dir,
    reference=None,
    model_type: Optional[str] = None,
    vocab_size: Optional[int] = None,
    tokenizer=None,
    dtype: str = "auto",
    max_shard_bytes: int = 5 * 2**30,
    force: bool = False,
    progress: bool = True,
) -> Path:
    t0 = time.time()
    load = Path(load)
    ckpt, shape, hf_cfg, tok_dir = resolve_source(
        load, Path(reference) if reference else None, model_type, vocab_size
    )
    if tokenizer is not None:
        tok_dir = Path(tokenizer)
    model = MCoreModelReader(ckpt, shape)  # checks every tensor's shape first
    if dtype == "auto":
        torch_dtype = model.dtype
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    log(
        f"exporting {ckpt} ({shape.model_type}, {shape.num_layers} layers, {model.norm_naming} norm names) "
        f"to HF safetensors in {torch_dtype}"
    )
    maps = {pm.key: pm for pm in param_maps(shape, model.norm_naming)}
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)

        def emit(tensors: dict[str, torch.Tensor], layer: Optional[int]) -> None:
            for key, t in tensors.items():
                pm = maps[key]
                for expert, part_t in enumerate(t) if pm.experts else [(None, t)]:
                    for name, part in zip(pm.hf(layer, expert), pm.to_hf(part_t)):
                        writer.add(name, part.to(torch_dtype).clone())

        glob = model.global_tensors()
        emit({"embedding.word_embeddings.weight": glob["embedding.word_embeddings.weight"]}, None)
        for layer in tqdm(
            range(shape.num_layers), desc="exporting layers", unit="layer", disable=not progress
        ):
            emit(model.layer_tensors(layer), layer)
        emit({k: v for k, v in glob.items() if k != "embedding.word_embeddings.weight"}, None)
        writer.finish()
        cfg = dict(hf_cfg)
        dkey = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
        cfg[dkey] = str(torch_dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        copied = []
        if tok_dir is not None and tok_dir.is_dir():
            for f in TOKENIZER_FILES:
                if (tok_dir / f).is_file():
                    shutil.copy2(tok_dir / f, tmp / f)
                    copied.append(f)
        if not any(f.startswith("tokenizer") or f == "vocab.json" for f in copied):
            log("warning: no tokenizer files copied (pass --tokenizer DIR)")
    log(f"wrote {out_dir} in {time.time() - t0:.1f} s")
    return Path(out_dir)
