import os
import sys

import pytest

# Distributed tests spawn ranks that import the tests' helper modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny pretrained HF Llama-3-style model, its Megatron-Core conversion and SFT data
    in its tokenizer (tests/hf_fixtures.py)."""
    from hf_fixtures import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
