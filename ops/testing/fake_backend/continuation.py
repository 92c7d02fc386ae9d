"""What the fake backend answers to a continuation (hotq continuing a stream another consumer started)."""

from __future__ import annotations

from ops.testing.fake_backend.parsing import bad_request


def reply_tokens_cut(tokens: list[str], max_tokens: int | None) -> tuple[list[str], str]:
    if max_tokens is not None and len(tokens) > max_tokens:
        return tokens[:max_tokens], "length"
    return tokens, "stop"


def continued(tokens: list[str], before: str) -> list[str]:
    """The reply tokens after the text `before` (a prefix of their concatenation)."""
    text = "".join(tokens)
    if not text.startswith(before):
        raise bad_request(f"the text to continue is not this answer's beginning: {before[:80]!r}")
    done = ""
    for index, token in enumerate(tokens):
        if len(done) + len(token) > len(before):
            return [text[len(before) : len(done) + len(token)], *tokens[index + 1 :]]  # cut mid-token
        done += token
    return []
