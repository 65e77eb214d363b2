"""Row formats of SFT corpora -> chat messages.

Supported (field names configurable with :class:`FieldNames`):

* ``messages``: a list of ``{"role", "content"}`` (ShareGPT ``{"from", "value"}`` with
  roles human/gpt/system is accepted too);
* ``question`` + ``response`` (e.g. MiroMind-M1-SFT), ``question`` + ``answer``,
  ``prompt`` + ``completion``.

``--format auto`` picks the first of those whose fields a row has. An optional per-row
system field and a global system prompt (used only when the row has no system message)
are prepended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sed.data.tokenizer import ChatFormatError

FORMATS = ("auto", "messages", "question_response", "question_answer", "prompt_completion")

MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
SYSTEM_PROMPT_PRESETS = {"math": MATH_SYSTEM_PROMPT}

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class InvalidSampleError(ValueError):
    """A row that cannot become a training sample; ``reason`` is a short counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FieldNames:
    messages: str = "messages"
    question: str = "question"
    response: str = "response"
    answer: str = "answer"
    prompt: str = "prompt"
    completion: str = "completion"
    system: str = "system"


def resolve_system_prompt(value: Optional[str]) -> Optional[str]:
    """``--system-prompt``: a preset name (``math``), literal text, or None/'' for none."""
    if not value:
        return None
    return SYSTEM_PROMPT_PRESETS.get(value, value)


def _string(row: dict, key: str, what: str) -> str:
    if key not in row or row[key] is None:
        raise InvalidSampleError("missing_field", f"missing field {key!r} ({what})")
    value = row[key]
    if not isinstance(value, str):
        raise InvalidSampleError(
            "non_string_field", f"field {key!r} is {type(value).__name__}, expected a string"
        )
    return value


def detect_format(row: dict, f: FieldNames) -> str:
    if f.messages in row:
        return "messages"
    if f.question in row and f.response in row:
        return "question_response"
    if f.question in row and f.answer in row:
        return "question_answer"
    if f.prompt in row and f.completion in row:
        return "prompt_completion"
    raise InvalidSampleError(
        "unknown_format",
        f"row has none of the supported field sets ({f.messages!r}; {f.question!r}+{f.response!r}; "
        f"{f.question!r}+{f.answer!r}; {f.prompt!r}+{f.completion!r}); keys: {sorted(row)[:10]}",
    )


def _messages(row: dict, f: FieldNames) -> list[dict]:
    raw = row.get(f.messages)
    if raw is None:
        raise InvalidSampleError("missing_field", f"missing field {f.messages!r}")
    if not isinstance(raw, (list, tuple)) or not raw:
        raise InvalidSampleError("bad_messages", f"field {f.messages!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidSampleError("bad_messages", f"message {i} is {type(m).__name__}, expected an object")
        if "role" in m or "content" in m:
            role, content = m.get("role"), m.get("content")
        elif "from" in m or "value" in m:
            role, content = _SHAREGPT_ROLES.get(m.get("from"), m.get("from")), m.get("value")
        else:
            raise InvalidSampleError("bad_messages", f"message {i} has neither role/content nor from/value")
        if not isinstance(role, str):
            raise InvalidSampleError("unknown_role", f"message {i} has no valid role ({role!r})")
        if not isinstance(content, str):
            raise InvalidSampleError(
                "non_string_field",
                f"message {i} ({role}) content is {type(content).__name__}, expected a string",
            )
        out.append({"role": role, "content": content})
    return out


def row_to_messages(
    row, fmt: str = "auto", fields: FieldNames = FieldNames(), system_prompt: Optional[str] = None
) -> list[dict]:
    """Chat messages of a row; raises :class:`InvalidSampleError` on any defect."""
    if not isinstance(row, dict):
        raise InvalidSampleError("not_an_object", f"row is {type(row).__name__}, expected a JSON object")
    if fmt == "auto":
        fmt = detect_format(row, fields)
    if fmt == "messages":
        msgs = _messages(row, fields)
    else:
        user_key, asst_key = {
            "question_response": (fields.question, fields.response),
            "question_answer": (fields.question, fields.answer),
            "prompt_completion": (fields.prompt, fields.completion),
        }[fmt]
        msgs = [
            {"role": "user", "content": _string(row, user_key, "user turn")},
            {"role": "assistant", "content": _string(row, asst_key, "assistant turn")},
        ]
        if not msgs[0]["content"].strip():
            raise InvalidSampleError("empty_user", f"field {user_key!r} is empty")
    has_system = msgs[0]["role"] == "system"
    row_system = row.get(fields.system)
    if not has_system and row_system is not None:
        if not isinstance(row_system, str):
            raise InvalidSampleError(
                "non_string_field", f"field {fields.system!r} is {type(row_system).__name__}"
            )
        if row_system.strip():
            msgs.insert(0, {"role": "system", "content": row_system})
            has_system = True
    if not has_system and system_prompt:
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def classify_chat_error(err: ChatFormatError) -> str:
    """Counter key for a conversation rejected by the tokenizer's validation."""
    text = str(err)
    for key, reason in (
        ("unknown role", "unknown_role"),
        ("empty assistant", "empty_assistant"),
        ("no assistant", "no_assistant"),
        ("prefix-consistent", "template_mismatch"),
        ("template failed", "template_error"),
    ):
        if key in text:
            return reason
    return "bad_messages"
