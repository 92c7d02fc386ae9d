"""Affinity keys and rendezvous hashing: requests that share a prefix meet the same agent.

A request's key is the client's `prompt_cache_key` (OpenAI's field) when it sent one,
else a digest of its leading content: for chat, the messages up to and including the
first user turn (the system prompt, tool definitions, the session's opening), which
every later turn of a session repeats; for completions, the prompt's first characters.
Batch lines are independent requests whose shared part is their instructions: their key
stops before the first user turn when system (or developer) messages come before it.
The key is taken from the body the API already decoded to validate it: the body's
bytes are never re-encoded.

`rank` orders a model's agents for a key by rendezvous (highest random weight) hashing:
each (key, agent) pair gets a score and the highest wins, so an agent that joins or
leaves moves only the keys it wins or won, about 1/N of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

PREFIX_CHARS = 2048  # how much of the leading content makes the key: a prefix cache's first blocks


def key_of(
    prompt_cache_key: str | None, messages: Sequence[Any] | None, prompt: object, instructions_only: bool = False
) -> bytes | None:
    """The affinity key of a chat (`messages`) or completions (`prompt`) request; None if it has
    no leading content to share (an empty prompt, token ids). `instructions_only`: a chat's key
    is its leading system/developer messages when it has any (batch lines)."""
    if prompt_cache_key:
        return b"k:" + prompt_cache_key.encode()
    digest = hashlib.blake2b(digest_size=16)
    if messages is not None:
        taken = 0
        for message in messages:
            text = _text(getattr(message, "content", None))
            role = getattr(message, "role", "")
            if instructions_only and taken and role not in ("system", "developer"):
                break
            digest.update(f"{role}:{len(text)}:".encode())
            digest.update(text[: PREFIX_CHARS - taken].encode())
            taken += len(text)
            if role == "user" or taken >= PREFIX_CHARS:
                break
        return b"c:" + digest.digest()
    if isinstance(prompt, str) and prompt:
        digest.update(prompt[:PREFIX_CHARS].encode())
        return b"p:" + digest.digest()
    return None


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def score(key: bytes, agent_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"\0" + agent_id.encode(), digest_size=8).digest(), "big")


def rank(key: bytes, agent_ids: Iterable[str]) -> list[str]:
    """`agent_ids` in the order `key` prefers them (the first is its home)."""
    return sorted(agent_ids, key=lambda agent_id: score(key, agent_id), reverse=True)
