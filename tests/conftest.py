"""Session fixtures shared by the test packages; helpers live in tests/helpers/."""

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny pretrained HF Llama-3-style model, its Megatron-Core conversion and SFT data
    in its tokenizer (tests/helpers/hf.py)."""
    from tests.helpers.hf import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory):
    """A tiny random HF Qwen3-MoE (QK-norm, head_dim != hidden / heads, 4 experts), its
    Megatron-Core conversion and SFT data in its tokenizer (tests/helpers/hf.py)."""
    from tests.helpers.hf import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_qwen3_moe"))
