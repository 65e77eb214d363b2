"""Model shape: HF Llama / Qwen2 / Qwen3 / Qwen3-MoE config.json <-> Megatron-LM argument values.

`ModelShape` is what the converted checkpoint's metadata records, what the trainer
reads (or checks its flags against), and what the HF config is rebuilt from on export.
Only what Megatron-Core's GPTModel can reproduce exactly is accepted; anything else
(other activations, sliding windows, YaRN, ...) fails here with the config key named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_sed.convert.hf_folder import CheckpointError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
QK_NORM_MODELS = ("qwen3", "qwen3_moe")  # RMSNorm on each head's q and k before RoPE

# Megatron-Core's llama3 RoPE scaling hard-codes these (rotary_pos_embedding._apply_scaling).
_MCORE_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class ModelShape:
    model_type: str  # a key of ARCHITECTURES
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    tie_embeddings: bool
    add_qkv_bias: bool
    rope_scaling_factor: Optional[float] = None  # llama3-style scaling (Llama 3.1 / 3.2)
    rotary_seq_len_interpolation_factor: Optional[float] = None  # HF "linear" scaling
    qk_layernorm: bool = False  # Qwen3: q_norm / k_norm
    # mixture of experts (Qwen3-MoE): every layer's MLP is `num_experts` SwiGLU experts of
    # `moe_ffn_hidden_size`, `moe_router_topk` per token; norm_topk_prob renormalises the
    # chosen experts' softmax probabilities (Megatron: softmax over the top-k logits,
    # its default) or not (Megatron: --moe-router-pre-softmax).
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    norm_topk_prob: bool = True

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _rope_params(cfg: dict) -> dict:
    """transformers < 5 writes `rope_theta` + `rope_scaling`; >= 5 one `rope_parameters`
    dict (with rope_theta and rope_type inside). Accept both."""
    rp = dict(cfg.get("rope_parameters") or {})
    rp.update(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        rp["rope_theta"] = cfg["rope_theta"]
    return rp


def _rope_scaling(cfg: dict):
    rs = _rope_params(cfg)
    if not rs:
        return None, None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None, None
    if kind == "llama3":
        for key, want in _MCORE_LLAMA3_ROPE.items():
            if key in rs and float(rs[key]) != want:
                raise CheckpointError(
                    f"config.json rope_scaling.{key}={rs[key]}: Megatron-Core's llama3 RoPE "
                    f"scaling supports only {key}={want}"
                )
        return float(rs["factor"]), None
    if kind == "linear":
        return None, float(rs["factor"])
    raise CheckpointError(f"config.json rope_scaling type {kind!r} is not supported (llama3 and linear are)")


def shape_from_hf_config(cfg: dict) -> ModelShape:
    """Validate an HF config.json (as a dict) and return its ModelShape."""
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"config.json model_type={model_type!r}: supported are {sorted(ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json hidden_act={act!r}: only silu (SwiGLU) is supported")
    if cfg.get("mlp_bias"):
        raise CheckpointError("config.json mlp_bias=true is not supported")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise CheckpointError(
            f"config.json attention_bias=true ({model_type} with q/k/v/o biases) is not supported"
        )
    if cfg.get("use_sliding_window"):
        raise CheckpointError("config.json use_sliding_window=true is not supported")
    moe = _moe_fields(cfg) if model_type == "qwen3_moe" else {}
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    factor, linear = _rope_scaling(cfg)
    return ModelShape(
        model_type=model_type,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or hidden // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rotary_base=float(_rope_params(cfg).get("rope_theta", 10000.0)),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        add_qkv_bias=model_type == "qwen2",
        rope_scaling_factor=factor,
        rotary_seq_len_interpolation_factor=linear,
        qk_layernorm=model_type in QK_NORM_MODELS,
        **moe,
    )


def _moe_fields(cfg: dict) -> dict:
    """The MoE part of a Qwen3-MoE config.json; only every-layer-sparse models (what
    Megatron's --moe-layer-freq 1 builds) without shared experts."""
    step = cfg.get("decoder_sparse_step", 1)
    if step != 1:
        raise CheckpointError(
            f"config.json decoder_sparse_step={step}: only 1 (every layer MoE) is supported"
        )
    if cfg.get("mlp_only_layers"):
        raise CheckpointError(
            f"config.json mlp_only_layers={cfg['mlp_only_layers']}: dense layers in a MoE model are not supported"
        )
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if not experts:
        raise CheckpointError("config.json has no num_experts")
    return dict(
        num_experts=int(experts),
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        moe_router_topk=int(cfg["num_experts_per_tok"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )


def megatron_args(shape: ModelShape) -> dict:
    """Megatron-LM argument values (Megatron's dest names) describing this model, as a
    checkpoint's `args` carries them (megatron_sed.train takes the shape from there)."""
    return dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        group_query_attention=shape.num_query_groups != shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        max_position_embeddings=shape.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rotary_base,
        rotary_percent=1.0,
        use_rope_scaling=shape.rope_scaling_factor is not None,
        rope_scaling_factor=shape.rope_scaling_factor or 8.0,
        rotary_seq_len_interpolation_factor=shape.rotary_seq_len_interpolation_factor,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=shape.add_qkv_bias,
        untie_embeddings_and_output_weights=not shape.tie_embeddings,
        qk_layernorm=shape.qk_layernorm,
        num_experts=shape.num_experts,  # None: dense (so --num-experts on a dense model is caught)
        mtp_num_layers=None,
        **_moe_args(shape),
        padded_vocab_size=shape.vocab_size,  # the embedding's rows
        tokenizer_type="HuggingFaceTokenizer",  # shipped in OUT/hf (see checkpointing.layout)
        sft_tokenizer_type="hf",
    )


def _moe_args(shape: ModelShape) -> dict:
    if shape.num_experts is None:
        return {}
    return dict(
        moe_layer_freq=1,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
        moe_router_topk=shape.moe_router_topk,
        moe_router_score_function="softmax",
        # HF softmax over all experts then top-k; renormalised (norm_topk_prob) equals
        # Megatron's softmax over the top-k logits, unrenormalised its pre-softmax router.
        moe_router_pre_softmax=not shape.norm_topk_prob,
        moe_router_topk_scaling_factor=None,
        moe_shared_expert_intermediate_size=None,
    )
