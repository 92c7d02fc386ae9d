"""Continuing a stream another consumer started: the request it becomes, and the events the client gets.

The API says what its client already got (`Resume`: the text, its token count, the stream's
`id` and `created`). The continuation asks the backend for the rest: a chat gets the text as
a partial assistant message that the model continues (vLLM's `continue_final_message`, no
generation prompt), a completion gets it appended to its prompt; `max_tokens` shrinks by what
was sent. Its events reach the client as if nothing happened: the chunks keep the stream's
`id` and `created`, the second role chunk is left out, and usage counts the prompt once and
every completion token sent (the backend's prompt count includes the text sent, as tokens).

Only streams that one text continues can be continued (`why_not_continuable`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.messages import Endpoint, Resume
from consumers.stream_usage import StreamUsage

_DATA = b"data: "
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
# Fields that make the answer more than one text continued token by token, or bind it to a structure
# that a restart mid-way cannot keep.
_STRUCTURED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def why_not_continuable(endpoint: Endpoint, body: bytes) -> str | None:
    """Why a stream of this request cannot be continued by another consumer (None: it can)."""
    if endpoint not in (Endpoint.CHAT, Endpoint.COMPLETIONS):
        return "not a text stream"
    try:
        request = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "the body is not JSON"
    if not isinstance(request, dict):
        return "the body is not a JSON object"
    if _more_than_one(request.get("n")) or _more_than_one(request.get("best_of")):
        return "several choices (n > 1)"
    if request.get("logprobs") not in (None, False) or request.get("top_logprobs") or request.get("prompt_logprobs"):
        return "logprobs"
    response_format = request.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return "response_format with a schema"
    if any(request.get(key) is not None for key in _STRUCTURED):
        return "structured output"
    if endpoint is Endpoint.COMPLETIONS:
        if not isinstance(request.get("prompt"), str) and not _one_text(request.get("prompt")):
            return "a prompt that is not one text"
        if request.get("echo") or request.get("suffix"):
            return "echo or suffix"
    elif not isinstance(request.get("messages"), list):
        return "no messages"
    return None


def _more_than_one(value: Any) -> bool:
    return isinstance(value, int) and value > 1


def _one_text(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)


def continuation_body(endpoint: Endpoint, body: bytes, resume: Resume) -> bytes:
    """The request that asks the backend for the rest of the answer (`why_not_continuable` said it can)."""
    request = msgspec.json.decode(body)
    if endpoint is Endpoint.CHAT:
        request["messages"] = [*request["messages"], {"role": "assistant", "content": resume.text}]
        request["continue_final_message"] = True
        request["add_generation_prompt"] = False
        keys: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
        default = None
    else:
        prompt = request["prompt"]
        request["prompt"] = (prompt if isinstance(prompt, str) else prompt[0]) + resume.text
        keys, default = ("max_tokens",), COMPLETIONS_DEFAULT_MAX_TOKENS
    present = [key for key in keys if isinstance(request.get(key), int)]
    if not present and default is not None:
        request[keys[0]] = default
        present = [keys[0]]
    for key in present:
        request[key] = max(1, request[key] - resume.tokens)
    if isinstance(request.get("min_tokens"), int):
        request["min_tokens"] = max(0, request["min_tokens"] - resume.tokens)
    return msgspec.json.encode(request)


class ResumedStream:
    """A continuation's events as the client's stream goes on: `StreamUsage` with the stream's
    own `id` and `created`, no second role chunk, and usage counting the tokens sent before."""

    def __init__(self, inner: StreamUsage, resume: Resume) -> None:
        self._inner = inner
        self._resume = resume
        self._role_dropped = False

    @property
    def usage(self) -> dict[str, int] | None:
        return self._shifted(self._inner.usage)

    def client_event(self, event: bytes) -> bytes | None:
        rewritten = self._inner.client_event(event)
        if rewritten is None or not rewritten.startswith(_DATA) or rewritten.startswith(b"data: [DONE]"):
            return rewritten
        # A continued stream is rare: decoding each of its events costs nothing that matters.
        try:
            chunk = msgspec.json.decode(rewritten[len(_DATA) :])
        except msgspec.DecodeError:
            return rewritten
        if not isinstance(chunk, dict):
            return rewritten
        if not self._role_dropped and _only_role(chunk):
            self._role_dropped = True
            return None  # the client had its role chunk from the first attempt
        chunk["id"] = self._resume.stream_id
        chunk["created"] = self._resume.created
        if isinstance(chunk.get("usage"), dict):
            chunk["usage"] = self._shifted(chunk["usage"])
        return _DATA + msgspec.json.encode(chunk) + b"\n\n"

    def _shifted(self, usage: dict[str, Any] | None) -> dict[str, int] | None:
        """The continuation's usage as the whole stream's: its prompt held the tokens sent."""
        if usage is None:
            return None
        shifted = {key: value for key, value in usage.items() if isinstance(value, int)}
        sent = self._resume.tokens
        prompt, completion = shifted.get("prompt_tokens", 0), shifted.get("completion_tokens", 0)
        shifted["prompt_tokens"] = max(0, prompt - sent)
        shifted["completion_tokens"] = completion + sent
        shifted["total_tokens"] = shifted["prompt_tokens"] + shifted["completion_tokens"]
        return shifted


def _only_role(chunk: dict[str, Any]) -> bool:
    """A chat chunk that only says the role (vLLM sends one first, a continuation too)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    delta = choices[0].get("delta")
    if not isinstance(delta, dict) or "role" not in delta:
        return False
    return not any(value not in ("", None) for key, value in delta.items() if key != "role")
