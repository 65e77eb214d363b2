"""Fixtures for the data tests: a small Hugging Face tokenizer built locally (no download)."""

import pytest


def build_local_hf_tokenizer(directory, with_template=True):
    """Train a tiny BPE with `tokenizers`, wrap it as a transformers fast tokenizer, save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_sed.data.synthetic import make_synthetic_math
    from megatron_sed.data.tokenizer import CHATML_TEMPLATE

    specials = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r["response"] for r in make_synthetic_math(200, seed=0)]
    corpus += ["system user assistant Hello, how are you? Fine thanks. Reason step by step."]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if with_template:
        fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    return build_local_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


@pytest.fixture(scope="session")
def hf_tokenizer_dir_no_template(tmp_path_factory):
    return build_local_hf_tokenizer(tmp_path_factory.mktemp("hf_tok_plain"), with_template=False)
