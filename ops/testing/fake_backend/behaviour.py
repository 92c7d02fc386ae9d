"""What the fake backend answers: pure and deterministic, shared by the server and by test expectations."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

DEFAULT_MODEL: Final = "fake-model"
EMBEDDING_DIM: Final = 8

JsonObj = dict[str, Any]


def reply_tokens(user_text: str, max_tokens: int | None) -> tuple[list[str], str]:
    tokens = ["echo:"] + [" " + word[::-1] for word in user_text.split()]
    if max_tokens is not None and len(tokens) > max_tokens:
        return tokens[:max_tokens], "length"
    return tokens, "stop"


def expected_chat_tokens(user_text: str, max_tokens: int | None) -> tuple[list[str], str]:
    """(tokens, finish_reason) the backend produces for a chat whose last user text is given."""
    return reply_tokens(user_text, max_tokens)


def expected_completion_tokens(prompt: str, max_tokens: int | None) -> tuple[list[str], str]:
    """(tokens, finish_reason) the backend produces for a /v1/completions prompt."""
    return reply_tokens(prompt, max_tokens)


def expected_embedding(text: str) -> list[float]:
    """The 8-dim vector the backend returns for ``text`` (exact in "float" format)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [
        round(int.from_bytes(digest[4 * i : 4 * i + 4], "little") / 0xFFFFFFFF * 2.0 - 1.0, 6)
        for i in range(EMBEDDING_DIM)
    ]


def content_text(content: Any) -> str:
    """Text of a message content: plain string, or the text parts of a list content."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def last_user_text(messages: Sequence[JsonObj]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def reply_text(messages: Sequence[JsonObj], max_tokens: int | None) -> str:
    """The assistant reply text for a chat request (the concatenated reply tokens)."""
    return "".join(reply_tokens(last_user_text(messages), max_tokens)[0])


def word_count(text: str) -> int:
    return len(text.split())


def usage_of(prompt_tokens: int, completion_tokens: int) -> JsonObj:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
