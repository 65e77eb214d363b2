"""Fixtures for the data tests: a small Hugging Face tokenizer built locally (no download)."""

import pytest

from tests.helpers.hf import build_local_hf_tokenizer


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    return build_local_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


@pytest.fixture(scope="session")
def hf_tokenizer_dir_no_template(tmp_path_factory):
    return build_local_hf_tokenizer(tmp_path_factory.mktemp("hf_tok_plain"), with_template=False)
