"""SFT data: preprocessing to Megatron indexed datasets, the packed reader, tokenizers and
the offline synthetic multi-path math set.

Submodules import lazily-heavy dependencies (``datasets``, ``transformers``) only where
needed, so ``import megatron_sed.data.synthetic`` stays cheap.
"""
