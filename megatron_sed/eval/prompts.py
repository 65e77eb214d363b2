"""Evaluation prompts: a JSON-lines file, one problem per line.

Each row needs the reference `answer` (a bare value or `\\boxed{...}`) and the question in
one of the training formats: `question`, `prompt`, or `messages` (a chat whose trailing
assistant turns, if any, are dropped). Optional: `system` (per-row system prompt),
`paths` (the known valid solution texts, as in megatron_sed.data.synthetic's rows, used
to count distinct correct solution paths) and `problem_id`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional


class PromptsFileError(ValueError):
    """A prompts file that cannot be used; the message names the file and 1-based line."""


@dataclass
class EvalPrompt:
    messages: list[dict]
    answer: str
    paths: Optional[list[str]] = None
    problem_id: Optional[str] = None
    extra: dict = field(default_factory=dict)


def _row_messages(row: dict, where: str) -> list[dict]:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise PromptsFileError(f"{where}: 'messages' must be a non-empty list of objects")
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in msgs]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs:
            raise PromptsFileError(f"{where}: 'messages' holds no user turn")
        return msgs
    for key in ("question", "prompt"):
        if key in row:
            if not isinstance(row[key], str) or not row[key].strip():
                raise PromptsFileError(f"{where}: field {key!r} must be a non-empty string")
            return [{"role": "user", "content": row[key]}]
    raise PromptsFileError(
        f"{where}: no question: expected a 'question', 'prompt' or 'messages' field "
        f"(keys: {sorted(row)[:10]})"
    )


def load_prompts(
    path: str, limit: Optional[int] = None, system_prompt: Optional[str] = None
) -> list[EvalPrompt]:
    """Read and validate a prompts file; `system_prompt` is added to rows without one
    (use the one the SFT data was preprocessed with)."""
    if not os.path.isfile(path):
        raise PromptsFileError(f"prompts file {path!r} does not exist")
    out: list[EvalPrompt] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptsFileError(f"{where}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise PromptsFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "answer" not in row or row["answer"] is None:
                raise PromptsFileError(f"{where}: missing field 'answer' (the reference to score against)")
            msgs = _row_messages(row, where)
            for i, m in enumerate(msgs):
                if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
                    raise PromptsFileError(f"{where}: message {i} needs a role and a string content")
            if msgs[0]["role"] != "system":
                system = row.get("system") or system_prompt
                if system:
                    msgs.insert(0, {"role": "system", "content": system})
            paths = row.get("paths")
            if paths is not None and not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
                raise PromptsFileError(f"{where}: 'paths' must be a list of strings")
            out.append(
                EvalPrompt(
                    messages=msgs, answer=str(row["answer"]), paths=paths, problem_id=row.get("problem_id")
                )
            )
    if not out:
        raise PromptsFileError(f"prompts file {path!r} holds no prompts")
    return out
