import pytest

from megatron_sed.data.tokenizer import ChatFormatError, build_tokenizer

CONV = [
    {"role": "system", "content": "Reason step by step."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Fine thanks."},
    {"role": "user", "content": "And 2+3?"},
    {"role": "assistant", "content": "2+3=5. \\boxed{5}"},
]


def runs(ids, mask):
    """Maximal runs of supervised ids."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def test_byte_tokenizer_is_megatron_core_bytes_with_turn_specials():
    from megatron.core.tokenizers.text.libraries.bytelevel_tokenizer import ByteLevelTokenizer

    tok = build_tokenizer("byte")
    text = "naïve  ∑ 🙂 \n "
    assert tok.tokenize(text) == list(text.encode("utf-8"))
    assert tok.detokenize(tok.tokenize(text)) == text  # lossless, unlike ids_to_text's rstrip
    # Ids as Megatron-Core's ByteLevelTokenizer gives them with the same specials.
    mc = ByteLevelTokenizer(special_tokens=list(tok.SPECIALS), vocab_size=256)
    assert tok.tokenize(text) == mc.text_to_ids(text)
    assert tok.special_ids == {s: mc.token_to_id(s) for s in tok.SPECIALS}
    assert tok.vocab_size == mc.vocab_size == 262
    assert tok.detokenize([*mc.text_to_ids("ok"), tok.end_of_turn], skip_special_tokens=False) == "ok<|end|>"
    specials = set(tok.special_ids.values())
    assert specials == set(range(256, 262)) and {tok.eod, tok.pad, tok.end_of_turn} <= specials
    assert len({tok.eod, tok.pad, tok.end_of_turn}) == 3


def test_byte_chat_mask_covers_exactly_assistant_turns():
    tok = build_tokenizer("byte")
    ids, mask = tok.apply_chat_template(CONV)
    assert len(ids) == len(mask)
    assert tok.detokenize(ids, skip_special_tokens=False) == (
        "<|system|>Reason step by step.<|end|><|user|>Hi there<|end|><|assistant|>Fine thanks.<|end|>"
        "<|user|>And 2+3?<|end|><|assistant|>2+3=5. \\boxed{5}<|end|><|eod|>"
    )
    got = [tok.detokenize(r, skip_special_tokens=False) for r in runs(ids, mask)]
    assert got == ["Fine thanks.<|end|>", "2+3=5. \\boxed{5}<|end|><|eod|>"]
    prompt = tok.encode_prompt(CONV[:4])
    assert ids[: len(prompt)] == prompt and prompt[-1] == tok.special_ids["<|assistant|>"]
    assert tok.stop_ids == [tok.end_of_turn, tok.eod]


def test_byte_conversation_ending_with_user_supervises_no_eod():
    tok = build_tokenizer("byte")
    ids, mask = tok.apply_chat_template(CONV[:4])
    assert ids[-1] == tok.eod and mask[-1] == 0


def test_hf_chat_mask_covers_exactly_assistant_turns(hf_tokenizer_dir):
    tok = build_tokenizer("hf", hf_tokenizer_dir)
    ids, mask = tok.apply_chat_template(CONV)
    hf = tok.hf_tokenizer
    rendered = hf.apply_chat_template(CONV, tokenize=False)
    assert tok.detokenize(ids, skip_special_tokens=False) == rendered + "<|endoftext|>"
    got = [tok.detokenize(r, skip_special_tokens=False) for r in runs(ids, mask)]
    assert got == ["Fine thanks.<|im_end|>\n", "2+3=5. \\boxed{5}<|im_end|>\n<|endoftext|>"]
    assert tok.eod == hf.eos_token_id and tok.pad == hf.pad_token_id and tok.vocab_size == len(hf)
    prompt = tok.encode_prompt(CONV[:4])
    assert ids[: len(prompt)] == prompt
    assert tok.detokenize(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert hf.convert_tokens_to_ids("<|im_end|>") in tok.stop_ids


def test_hf_without_template_needs_override(hf_tokenizer_dir_no_template, tmp_path):
    with pytest.raises(ValueError, match="--chat-template"):
        build_tokenizer("hf", hf_tokenizer_dir_no_template)
    tok = build_tokenizer("hf", hf_tokenizer_dir_no_template, chat_template="chatml")
    ids, mask = tok.apply_chat_template(CONV[1:3])
    assert tok.detokenize(runs(ids, mask)[0], skip_special_tokens=False).startswith("Fine thanks.<|im_end|>")
    # A template file whose turns carry no end marker: EOS is appended and supervised.
    tpl = tmp_path / "plain.jinja"
    tpl.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = build_tokenizer("hf", hf_tokenizer_dir_no_template, chat_template=str(tpl))
    ids, mask = tok.apply_chat_template(CONV[1:3])
    assert ids[-1] == tok.eod and mask[-1] == 1
    # Prefix-inconsistent template (drops earlier turns) is refused, naming the fix.
    bad = "{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}"
    tok = build_tokenizer("hf", hf_tokenizer_dir_no_template, chat_template=bad)
    with pytest.raises(ChatFormatError, match="prefix-consistent"):
        tok.apply_chat_template(CONV)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "unknown role"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty assistant"),
        ([{"role": "user", "content": "q"}], "no assistant"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}], "expected a string"),
        ([{"role": "assistant", "content": "a"}], "first non-system"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ],
            "system message",
        ),
        ([], "non-empty"),
    ],
)
def test_invalid_conversations(messages, match):
    with pytest.raises(ChatFormatError, match=match):
        build_tokenizer("byte").apply_chat_template(messages)


def test_bad_tokenizer_arguments(tmp_path):
    with pytest.raises(ValueError, match="tokenizer-type"):
        build_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("hf", None)
    with pytest.raises(ValueError, match="not a local folder"):
        build_tokenizer("hf", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="hf only"):
        build_tokenizer("byte", chat_template="chatml")
