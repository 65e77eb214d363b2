"""The local spec's SDPA core attention (megatron_sed.model.SDPACoreAttention) on its own,
for unit tests: 4 query heads in 2 KV groups of 8 channels, no dropout, TP 1."""

from __future__ import annotations


def tiny_sdpa_attention():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sed.model import SDPACoreAttention

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
        attention_dropout=0.0,
    )

    class _TP:  # a 1-rank TP group stand-in
        def size(self):
            return 1

    class _PG:
        tp = _TP()

    return SDPACoreAttention(cfg, 1, AttnMaskType.causal, pg_collection=_PG())
