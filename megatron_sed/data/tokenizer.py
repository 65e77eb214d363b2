"""Tokenizers with chat templates that also return the assistant-only loss mask.

``build_tokenizer("byte")``: Megatron-Core's byte-level tokenizer (UTF-8 bytes are ids
0..255, works offline) plus six special tokens for turns, vocab size 262.
``build_tokenizer("hf", "path/to/folder")``: a local Hugging Face tokenizer folder loaded
with ``transformers.AutoTokenizer`` and rendered with its chat template (or an override).

Both expose ``vocab_size``, ``eod``, ``pad``, ``tokenize``, ``detokenize`` and
``apply_chat_template(messages) -> (ids, loss_mask)`` where ``loss_mask[j] == 1`` iff
token ``j`` belongs to an assistant turn (its content and end-of-turn marker, plus the
final end-of-document token after a closing assistant turn). Everything else (system,
user, role headers) is 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from megatron.core.tokenizers.text.libraries.bytelevel_tokenizer import ByteLevelTokenizer

ROLES = ("system", "user", "assistant")

# A ChatML template, offered as ``--chat-template chatml`` for HF tokenizers without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (bad roles, empty assistant content, ...)."""


def validate_messages(messages: Sequence[dict], require_assistant: bool = True) -> None:
    """Raise ChatFormatError unless ``messages`` is a well-formed conversation."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {role, content} objects")
    n_assistant = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(
                f"message {i} is {type(msg).__name__}, expected an object with role/content"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ChatFormatError(
                f"message {i} ({role}) content is {type(content).__name__}, expected a string"
            )
        if role == "system" and i != 0:
            raise ChatFormatError(f"message {i}: a system message is only allowed first")
        if role == "assistant":
            if not content.strip():
                raise ChatFormatError(f"message {i}: empty assistant content")
            n_assistant += 1
    first = 1 if messages[0]["role"] == "system" else 0
    if first >= len(messages) or messages[first]["role"] != "user":
        raise ChatFormatError("the first non-system message must come from the user")
    if require_assistant and n_assistant == 0:
        raise ChatFormatError("no assistant message: nothing to train on")


class SFTTokenizer:
    """Interface shared by the byte and HF tokenizers."""

    vocab_size: int
    eod: int
    pad: int
    name: str

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def encode_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a prompt ending with the assistant header, for generation."""
        validate_messages(messages, require_assistant=False)
        return self.apply_chat_template(messages, add_generation_prompt=True)[0]

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated assistant turn."""
        return [self.eod]

    def describe(self) -> dict:
        """What PREFIX.json records about the tokenizer."""
        return {"type": self.name, "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


class ByteTokenizer(SFTTokenizer):
    """UTF-8 bytes (Megatron-Core ``ByteLevelTokenizer``) plus turn special tokens.

    A conversation renders as
    ``[<|system|>S<|end|>] <|user|>U<|end|> <|assistant|>A<|end|> ... <|eod|>``.
    """

    name = "byte"
    SPECIALS = ("<|eod|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

    def __init__(self) -> None:

        n = len(self.SPECIALS)
        # ByteLevelTokenizer numbers specials downwards from 256 + n in list order; compute the
        # ids first because eos/pad must be given to its constructor.
        ids = {tok: 256 + n - 1 - i for i, tok in enumerate(self.SPECIALS)}
        self._mc = ByteLevelTokenizer(
            special_tokens=list(self.SPECIALS), vocab_size=256, _eos_id=ids["<|eod|>"], _pad_id=ids["<|pad|>"]
        )
        for tok, i in ids.items():
            assert self._mc.token_to_id(tok) == i, "unexpected Megatron-Core ByteLevelTokenizer id layout"
        self.special_ids = ids
        self.vocab_size = self._mc.vocab_size
        self.eod = self._mc.eod
        self.pad = self._mc.pad_id
        self.end_of_turn = ids["<|end|>"]
        self._role_ids = {r: ids[f"<|{r}|>"] for r in ROLES}

    def tokenize(self, text: str) -> list[int]:
        return self._mc.text_to_ids(text)

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Not ByteLevelTokenizer.ids_to_text: it right-strips whitespace (lossy round trip).
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            if not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self._mc.id_to_token(i))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def stop_ids(self) -> list[int]:
        return [self.end_of_turn, self.eod]

    def apply_chat_template(self, messages, add_generation_prompt: bool = False):
        validate_messages(messages, require_assistant=not add_generation_prompt)
        ids: list[int] = []
        mask: list[int] = []
        for msg in messages:
            body = self.tokenize(msg["content"]) + [self.end_of_turn]
            sup = 1 if msg["role"] == "assistant" else 0
            ids += [self._role_ids[msg["role"]]] + body
            mask += [0] + [sup] * len(body)
        if add_generation_prompt:
            ids.append(self._role_ids["assistant"])
            mask.append(0)
        else:
            ids.append(self.eod)
            mask.append(1 if messages[-1]["role"] == "assistant" else 0)
        return ids, mask


def _resolve_template(chat_template: Optional[str]) -> Optional[str]:
    if chat_template is None:
        return None
    if chat_template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[chat_template]
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise ValueError(
        f"--chat-template {chat_template!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}), "
        "an existing file, nor a Jinja template string"
    )


class HFTokenizer(SFTTokenizer):
    """A local ``transformers`` tokenizer folder and its (or an overriding) chat template.

    The loss mask comes from rendering prefixes of the conversation: the assistant span of
    turn ``i`` is the text between ``render(messages[:i], add_generation_prompt=True)`` and
    ``render(messages[:i+1])``. Prompt and assistant chunks are tokenized separately and
    concatenated, so the prompt ids equal those used at generation time and the mask
    boundary is exact. Templates that rewrite earlier turns (not prefix-consistent) are
    rejected with a clear error.
    """

    name = "hf"

    def __init__(self, tokenizer_model: str, chat_template: Optional[str] = None) -> None:
        if not tokenizer_model:
            raise ValueError("--tokenizer-type hf needs --tokenizer-model PATH (a local tokenizer folder)")
        if not os.path.isdir(tokenizer_model):
            raise ValueError(f"--tokenizer-model {tokenizer_model!r} is not a local folder")
        from transformers import AutoTokenizer  # noqa: PLC0415 (heavy; only for HF tokenizers)

        self.path = tokenizer_model
        self._tok = AutoTokenizer.from_pretrained(tokenizer_model, local_files_only=True)
        template = _resolve_template(chat_template)
        self.chat_template = template or self._tok.chat_template
        if not self.chat_template:
            raise ValueError(
                f"tokenizer at {tokenizer_model!r} has no chat template: pass --chat-template "
                "(a Jinja string, a file, or 'chatml')"
            )
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"tokenizer at {tokenizer_model!r} defines no eos token (needed as end-of-document)"
            )
        self.vocab_size = len(self._tok)
        self.eod = int(self._tok.eos_token_id)
        self.pad = int(self._tok.pad_token_id) if self._tok.pad_token_id is not None else self.eod
        self._backend = getattr(self._tok, "backend_tokenizer", None) if self._tok.is_fast else None

    @property
    def hf_tokenizer(self):
        return self._tok

    def tokenize(self, text: str) -> list[int]:
        if self._backend is not None:  # the Rust tokenizer directly: ~1.5x faster than __call__
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _render(self, messages, add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        try:
            return self._tok.apply_chat_template(
                list(messages),
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # jinja raise_exception() in templates, missing variables, ...
            raise ChatFormatError(f"chat template failed: {e}") from e

    def apply_chat_template(self, messages, add_generation_prompt: bool = False):
        validate_messages(messages, require_assistant=not add_generation_prompt)
        pieces: list[tuple[str, int]] = []
        done = ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            after = self._render(messages[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise ChatFormatError(
                    "chat template is not prefix-consistent (it rewrites earlier turns), so the "
                    "assistant loss mask cannot be located; use --chat-template to override it"
                )
            pieces += [(before[len(done) :], 0), (after[len(before) :], 1)]
            done = after
        if messages[-1]["role"] == "assistant" and not add_generation_prompt:
            full = done  # the last turn's render is the whole conversation: skip a render
        else:
            full = self._render(messages, add_generation_prompt=add_generation_prompt)
        if not full.startswith(done):
            raise ChatFormatError(
                "chat template is not prefix-consistent; use --chat-template to override it"
            )
        pieces.append((full[len(done) :], 0))

        ids: list[int] = []
        mask: list[int] = []
        for text, sup in pieces:
            if text:
                piece = self.tokenize(text)
                ids += piece
                mask += [sup] * len(piece)
        if not add_generation_prompt and (not ids or ids[-1] != self.eod):
            # Templates whose turns end with a non-EOS marker: close the document with EOS so
            # the model learns to stop and packed samples stay separated for Megatron tools.
            ids.append(self.eod)
            mask.append(1 if messages[-1]["role"] == "assistant" else 0)
        return ids, mask

    @property
    def stop_ids(self) -> list[int]:
        stops = {self.eod}
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = self._tok.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self._tok.unk_token_id and tok in self._tok.get_vocab():
                stops.add(tid)
        return sorted(stops)

    def describe(self) -> dict:
        d = super().describe()
        d.update(model=os.path.basename(os.path.normpath(self.path)), chat_template=self.chat_template)
        return d


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: Optional[str] = None, chat_template: Optional[str] = None
):
    """``"byte"`` or ``"hf"`` (``tokenizer_model``: a local folder); see the module docstring."""
    if tokenizer_type in ("byte", "ByteLevelTokenizer"):
        if chat_template is not None:
            raise ValueError(
                "--chat-template applies to --tokenizer-type hf only; the byte tokenizer has a fixed format"
            )
        return ByteTokenizer()
    if tokenizer_type in ("hf", "HuggingFaceTokenizer"):
        return HFTokenizer(tokenizer_model, chat_template)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose 'byte' or 'hf'")


def sft_tokenizer_from_args(
    args,
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    chat_template: Optional[str] = None,
):
    """The tokenizer a run trained with, rebuilt from its (checkpoint's) Megatron args:
    `sft_tokenizer_type` ("byte" | "hf", set by megatron-sed-train) and Megatron's
    `tokenizer_model` / `chat_template`; explicit arguments win (eval's flags)."""
    kind = tokenizer_type or getattr(args, "sft_tokenizer_type", None)
    if kind is None:  # a Megatron-LM checkpoint, or an older one of ours
        kind = {"HuggingFaceTokenizer": "hf", "hf": "hf", "byte": "byte"}.get(
            getattr(args, "tokenizer_type", None), None
        )
    if kind is None:
        raise ValueError(
            f"cannot tell the tokenizer from the checkpoint (tokenizer_type="
            f"{getattr(args, 'tokenizer_type', None)!r}): pass --tokenizer-type"
        )
    model = tokenizer_model or getattr(args, "tokenizer_model", None)
    if kind == "hf" and not model:
        raise ValueError(
            "the run used an HF tokenizer but its folder is not recorded: pass --tokenizer-model"
        )
    return build_tokenizer(kind, model, chat_template or getattr(args, "chat_template", None))
