"""Parameter names and layouts: HF Llama / Qwen2 / Qwen3 / Qwen3-MoE <-> Megatron-Core
GPTModel checkpoints.

Checkpoint keys are Megatron-Core's *sharded* keys (what `GPTModel.sharded_state_dict()`
produces and `dist_checkpointing` stores): the layer index is a leading axis of one
stacked tensor, e.g. `decoder.layers.self_attention.linear_qkv.weight` has global shape
[num_layers, (heads + 2 * groups) * head_dim, hidden]. These global tensors do not
depend on the tensor-parallel size, which is why one converted checkpoint loads at any
TP:
- linear_qkv: rows interleaved per query group [q_g (heads/groups rows of head_dim), k_g,
  v_g], the layout Megatron's SelfAttention splits; TP ranks own whole groups.
- linear_fc1 (SwiGLU): [gate; up] stacked on rows (Megatron's swiglu sharded factory
  stores the two halves as two fragments of the same key).
- embedding / output_layer: [vocab, hidden]; Megatron loads them with
  allow_shape_mismatch, so a trainer that pads the vocabulary differently still loads.
- QK-norm (Qwen3): `self_attention.{q,k}_layernorm.weight`, [head_dim] per layer.
- MoE (Qwen3-MoE): the router `mlp.router.weight` [experts, hidden] per layer, and the
  experts under `decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight` with two
  leading axes, [num_layers, num_experts, ...] (fc1 [gate; up] as for dense layers): the
  global tensors Megatron-Core's SequentialMLP and grouped-GEMM experts both save, so
  one conversion loads at any expert-parallel size.

Norms: the Transformer Engine spec fuses them into the next linear
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`), and Megatron-Core's
local spec maps its `input_layernorm` / `pre_mlp_layernorm` to those same sharded keys
(`sharded_state_dict_keys_map`), so checkpoints are interchangeable between the two
specs. That "fused" naming is what we write; the unmapped "separate" naming is
accepted when reading checkpoints of other tools.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_sed.convert.shape import ModelShape

LAYER_PREFIX = "decoder.layers."
NORM_KEYS = {
    "fused": {
        "input": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    },
    "separate": {
        "input": "decoder.layers.input_layernorm.weight",
        "pre_mlp": "decoder.layers.pre_mlp_layernorm.weight",
    },
}


@dataclass
class ParamMap:
    """One checkpoint tensor and the HF tensors it is made of.

    `shape` is per layer for layered tensors (the checkpoint prepends num_layers) and per
    expert for expert tensors (`experts` > 0: the checkpoint prepends num_layers and
    num_experts). `to_mcore(list of HF tensors) -> tensor`; `to_hf(tensor) -> list of HF
    tensors`, in the order of `hf_names`. HF names contain `{i}` for the layer index and
    `{e}` for the expert."""

    key: str
    layered: bool
    shape: tuple[int, ...]
    hf_names: list[str]
    to_mcore: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]
    experts: int = 0

    def hf(self, layer: int | None, expert: int | None = None) -> list[str]:
        return [n.format(i=layer, e=expert) for n in self.hf_names]

    @property
    def prepended(self) -> int:
        """Leading axes the checkpoint adds: 0, 1 (layers) or 2 (layers, experts)."""
        return 2 if self.experts else int(self.layered)


def _identity_map(key, layered, shape, hf_name) -> ParamMap:
    return ParamMap(key, layered, tuple(shape), [hf_name], lambda ts: ts[0], lambda t: [t])


def qkv_to_mcore(shape: ModelShape, q, k, v):
    """HF q [heads*d, ...], k/v [groups*d, ...] -> Megatron's per-group interleaving."""
    g, d = shape.num_query_groups, shape.kv_channels
    per = shape.num_attention_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, per * d, *tail)
    k = k.reshape(g, d, *tail)
    v = v.reshape(g, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(shape.qkv_rows, *tail)


def qkv_to_hf(shape: ModelShape, qkv):
    g, d = shape.num_query_groups, shape.kv_channels
    per = shape.num_attention_heads // g
    tail = qkv.shape[1:]
    x = qkv.reshape(g, (per + 2) * d, *tail)
    q, k, v = torch.split(x, [per * d, d, d], dim=1)
    return [q.reshape(g * per * d, *tail), k.reshape(g * d, *tail), v.reshape(g * d, *tail)]


def param_maps(shape: ModelShape, norm_naming: str = "fused") -> list[ParamMap]:
    """Every tensor of the Megatron checkpoint for `shape`, with its HF counterparts."""
    spec = norm_naming
    h, v = shape.hidden_size, shape.vocab_size
    hl = "model.layers.{i}."
    maps = [
        _identity_map("embedding.word_embeddings.weight", False, (v, h), "model.embed_tokens.weight"),
        _identity_map(NORM_KEYS[spec]["input"], True, (h,), hl + "input_layernorm.weight"),
        ParamMap(
            "decoder.layers.self_attention.linear_qkv.weight",
            True,
            (shape.qkv_rows, h),
            [hl + "self_attn.q_proj.weight", hl + "self_attn.k_proj.weight", hl + "self_attn.v_proj.weight"],
            lambda ts: qkv_to_mcore(shape, *ts),
            lambda t: qkv_to_hf(shape, t),
        ),
    ]
    if shape.add_qkv_bias:
        maps.append(
            ParamMap(
                "decoder.layers.self_attention.linear_qkv.bias",
                True,
                (shape.qkv_rows,),
                [hl + "self_attn.q_proj.bias", hl + "self_attn.k_proj.bias", hl + "self_attn.v_proj.bias"],
                lambda ts: qkv_to_mcore(shape, *ts),
                lambda t: qkv_to_hf(shape, t),
            )
        )
    if shape.qk_layernorm:
        d = shape.kv_channels
        maps.append(
            _identity_map(
                "decoder.layers.self_attention.q_layernorm.weight", True, (d,), hl + "self_attn.q_norm.weight"
            )
        )
        maps.append(
            _identity_map(
                "decoder.layers.self_attention.k_layernorm.weight", True, (d,), hl + "self_attn.k_norm.weight"
            )
        )
    maps += [
        _identity_map(
            "decoder.layers.self_attention.linear_proj.weight",
            True,
            (h, shape.num_attention_heads * shape.kv_channels),
            hl + "self_attn.o_proj.weight",
        ),
        _identity_map(NORM_KEYS[spec]["pre_mlp"], True, (h,), hl + "post_attention_layernorm.weight"),
    ]
    maps += _moe_maps(shape) if shape.num_experts else _dense_mlp_maps(shape)
    maps.append(_identity_map("decoder.final_layernorm.weight", False, (h,), "model.norm.weight"))
    if not shape.tie_embeddings:
        maps.append(_identity_map("output_layer.weight", False, (v, h), "lm_head.weight"))
    return maps


def _swiglu_fc1(key, shape_, hf_prefix, experts=0) -> ParamMap:
    return ParamMap(
        key,
        True,
        shape_,
        [hf_prefix + "gate_proj.weight", hf_prefix + "up_proj.weight"],
        lambda ts: torch.cat(ts, dim=0),
        lambda t: list(torch.chunk(t, 2, dim=0)),
        experts,
    )


def _dense_mlp_maps(shape: ModelShape) -> list[ParamMap]:
    h, f, hl = shape.hidden_size, shape.ffn_hidden_size, "model.layers.{i}.mlp."
    return [
        _swiglu_fc1("decoder.layers.mlp.linear_fc1.weight", (2 * f, h), hl),
        _identity_map("decoder.layers.mlp.linear_fc2.weight", True, (h, f), hl + "down_proj.weight"),
    ]


EXPERT_KEY = "decoder.layers.mlp.experts.experts."


def _moe_maps(shape: ModelShape) -> list[ParamMap]:
    h, f, n = shape.hidden_size, shape.moe_ffn_hidden_size, shape.num_experts
    hl = "model.layers.{i}.mlp."
    down = ParamMap(
        EXPERT_KEY + "linear_fc2.weight",
        True,
        (h, f),
        [hl + "experts.{e}.down_proj.weight"],
        lambda ts: ts[0],
        lambda t: [t],
        n,
    )
    return [
        _identity_map("decoder.layers.mlp.router.weight", True, (n, h), hl + "gate.weight"),
        _swiglu_fc1(EXPERT_KEY + "linear_fc1.weight", (2 * f, h), hl + "experts.{e}.", n),
        down,
    ]


def expected_hf_shapes(shape: ModelShape) -> dict:
    """{HF tensor name: shape} for every tensor an HF folder of this shape must hold."""
    g, d, h = shape.num_query_groups, shape.kv_channels, shape.hidden_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (shape.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (g * d, h),
        "self_attn.v_proj.weight": (g * d, h),
        "self_attn.o_proj.weight": (h, shape.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
    }
    if shape.qk_layernorm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    if shape.num_experts:
        mf = shape.moe_ffn_hidden_size
        per_layer["mlp.gate.weight"] = (shape.num_experts, h)
        for e in range(shape.num_experts):
            per_layer.update(
                {
                    f"mlp.experts.{e}.gate_proj.weight": (mf, h),
                    f"mlp.experts.{e}.up_proj.weight": (mf, h),
                    f"mlp.experts.{e}.down_proj.weight": (h, mf),
                }
            )
    else:
        per_layer.update(
            {
                "mlp.gate_proj.weight": (shape.ffn_hidden_size, h),
                "mlp.up_proj.weight": (shape.ffn_hidden_size, h),
                "mlp.down_proj.weight": (h, shape.ffn_hidden_size),
            }
        )
    if shape.add_qkv_bias:
        per_layer.update(
            {
                "self_attn.q_proj.bias": (shape.num_attention_heads * d,),
                "self_attn.k_proj.bias": (g * d,),
                "self_attn.v_proj.bias": (g * d,),
            }
        )
    out = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    for i in range(shape.num_layers):
        for k, s in per_layer.items():
            out[f"model.layers.{i}.{k}"] = s
    return out
