"""The backend's own token counts for every stream, even one the client leaves mid-way.

A stream is sent to the backend with ``stream_options`` ``include_usage`` and
``continuous_usage_stats`` (vLLM's extension; vLLM's Anthropic front end does the
same): every chunk then carries the prompt tokens and the completion tokens so far.
So when the client leaves and the consumer aborts the backend call, what the
backend generated until then is still known, as the backend counted it.

The client gets the stream it asked for. `StreamUsage.client_event` takes the
running usage out of each chunk (leaving ``"usage": null`` where the client asked
for ``include_usage``, as OpenAI sends it) and passes the final usage-only chunk on
only if the client asked for it. In a vLLM chunk the usage object is the last
field or nearly (``prompt_token_ids`` may follow it), so this is a byte cut around
it (the usage is decoded only when it is read: at the end of the stream, or when
it is cut short); any other shape is decoded and encoded again whole.

A backend that sends no running usage (OpenAI's own API and most other servers ignore
``continuous_usage_stats``) is estimated instead, until its final usage chunk, if it
sends one, gives the exact count: the prompt from its text (a token per four
characters, or the token ids given), the completion as a token per content chunk, or a
token per four characters of content when that is more (a server that sends several
tokens a chunk). So a stream the client leaves is charged on any backend.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import msgspec

from broker.messages import DONE_EVENT

_DATA = b"data: "
_USAGE_KEY = b',"usage":'
_NO_CHOICES = b'"choices":[]'  # the usage-only chunk at the end of a stream (as the fast path sees it)
_NULL_START = ord("n")
_BACKEND_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers
# Keys of a message whose strings are not text the model reads as such (media are data URLs).
_NOT_TEXT = frozenset(("role", "type", "image_url", "input_audio", "audio_url", "video_url", "file"))


class ClientUsage(enum.Enum):
    """What the client's own ``stream_options`` asked for."""

    NONE = "none"  # no usage at all
    FINAL = "final"  # include_usage: null in every chunk, one usage-only chunk at the end
    CONTINUOUS = "continuous"  # vLLM's continuous_usage_stats too: the backend's stream as it is


def backend_request(body: bytes) -> tuple[bytes, StreamUsage]:
    """The body to send the backend (asking for running usage), and what follows the
    stream's usage for it. A body that is not a JSON object goes to the backend as it
    is, to be refused there in the backend's words."""
    try:
        request = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body, StreamUsage(ClientUsage.NONE)
    if not isinstance(request, dict):
        return body, StreamUsage(ClientUsage.NONE)
    options = request.get("stream_options")
    options = options if isinstance(options, dict) else {}
    n = request.get("n")
    if options.get("include_usage") is True:
        asked = ClientUsage.CONTINUOUS if options.get("continuous_usage_stats") is True else ClientUsage.FINAL
    else:
        asked = ClientUsage.NONE
    n = n if isinstance(n, int) and n > 1 else 1
    usage = StreamUsage(asked, n, _prompt_count(request.get("prompt")), _prompt_estimate(request))
    if asked is ClientUsage.CONTINUOUS:
        return body, usage
    request["stream_options"] = {**options, **_BACKEND_STREAM_OPTIONS}
    return msgspec.json.encode(request), usage


def _prompt_count(prompt: Any) -> int:
    """How many prompts a completions request holds: a list of texts or of token lists is several."""
    if isinstance(prompt, list) and prompt and all(isinstance(item, str | list) for item in prompt):
        return len(prompt)
    return 1


def prompt_estimate(body: bytes) -> int:
    """About how many tokens a request's prompt holds (0 if the body is not a JSON object)."""
    try:
        request = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return 0
    return _prompt_estimate(request) if isinstance(request, dict) else 0


def _prompt_estimate(request: dict[str, Any]) -> int:
    """About how many tokens the prompt (or embeddings' input) holds, for a backend that never says."""
    prompt = request.get("prompt", request.get("input"))
    if isinstance(prompt, list) and all(isinstance(item, int) for item in prompt):
        return len(prompt)  # token ids
    if isinstance(prompt, list) and all(isinstance(item, list) for item in prompt):
        return sum(len(item) for item in prompt)
    return math.ceil(_text_length(prompt if prompt is not None else request.get("messages")) / CHARS_PER_TOKEN)


def _text_length(value: Any) -> int:
    """The characters of every string in a JSON value (message texts, names, tool call arguments)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_length(item) for key, item in value.items() if key not in _NOT_TEXT)
    return 0


class _Choice(msgspec.Struct):
    index: int = 0
    text: Any = None  # completions
    delta: dict[str, Any] | None = None  # chat


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None


class _Streamed:
    """What a stream without running usage relayed: content chunks and characters per choice."""

    def __init__(self) -> None:
        self._chunks: dict[int, int] = {}
        self._chars: dict[int, int] = {}

    def add(self, event: bytes) -> None:
        try:
            chunk = msgspec.json.decode(event[len(_DATA) :], type=_Chunk)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        for choice in chunk.choices or ():
            delta = {key: value for key, value in (choice.delta or {}).items() if key != "role"}
            chars = _text_length(choice.text) + _text_length(delta)
            if chars:
                self._chunks[choice.index] = self._chunks.get(choice.index, 0) + 1
                self._chars[choice.index] = self._chars.get(choice.index, 0) + chars

    @property
    def tokens(self) -> int:
        return sum(max(count, math.ceil(self._chars[index] / CHARS_PER_TOKEN)) for index, count in self._chunks.items())


class StreamUsage:
    """Rewrites a stream's events for the client and keeps the latest usage they carried.

    With several choices (``n``, or several prompts to /v1/completions) each chunk's running
    usage counts its own choice's tokens and its own prompt's: vLLM numbers choice ``i`` of
    prompt ``p`` as ``p * n + i``.
    """

    def __init__(self, asked: ClientUsage, n: int = 1, prompts: int = 1, prompt_estimate: int = 0) -> None:
        self._asked = asked
        self._prompt_estimate = prompt_estimate
        self._streamed = _Streamed()  # counted only from chunks that carry no running usage
        self._n = n
        self._several = n * prompts > 1
        self._prompt_tokens: int | None = None
        self._completion_tokens = 0
        self._per_choice: dict[int, int] = {}  # completion tokens so far of each choice (several)
        self._per_prompt: dict[int, int] = {}  # prompt tokens of each prompt (several)
        self._final: dict[str, int] | None = None  # the usage-only chunk's totals, once seen
        self._latest: bytes | None = None  # the newest running usage, not decoded yet (fast path)

    @property
    def asked(self) -> ClientUsage:
        return self._asked

    @property
    def usage(self) -> dict[str, int] | None:
        """Prompt and completion tokens generated so far, as the backend counted them (or as
        estimated, if it sent no running usage); None while there is nothing to count."""
        if self._final is not None:
            return self._final
        if self._latest is not None:
            self._note_raw(self._latest, usage_only=False)
            self._latest = None
        if self._prompt_tokens is None:
            return self._estimate()
        if self._several:
            prompt, completion = sum(self._per_prompt.values()), sum(self._per_choice.values())
        else:
            prompt, completion = self._prompt_tokens, self._completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _estimate(self) -> dict[str, int] | None:
        completion = self._streamed.tokens
        if not completion and not self._prompt_estimate:
            return None
        prompt = self._prompt_estimate
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def client_event(self, event: bytes) -> bytes | None:
        """`event` (one ``data: ...\\n\\n``) as the client should get it; None to leave it out."""
        if not event.startswith(_DATA) or event.startswith(DONE_EVENT.rstrip()):  # however the event ends
            return event
        if not self._several:
            span = _usage_span(event)
            if span is not None:
                return self._cut(event, *span)
        if b'"usage"' not in event:
            self._streamed.add(event)
            return event
        return self._rewrite_decoded(event)

    def _cut(self, event: bytes, key: int, end: int) -> bytes | None:
        """The fast path: the usage value is ``event[key + len(_USAGE_KEY):end]``."""
        value = key + len(_USAGE_KEY)
        usage_only = event.endswith(_NO_CHOICES, 0, key)
        if event[value] != _NULL_START:
            if usage_only:
                self._note_raw(event[value:end], usage_only=True)
            else:
                self._latest = event[value:end]  # decoded only when the usage is read
        elif not usage_only:
            self._streamed.add(event)
        if self._asked is ClientUsage.CONTINUOUS:
            return event
        if usage_only:
            return event if self._asked is ClientUsage.FINAL else None
        if self._asked is ClientUsage.FINAL:
            return event[:value] + b"null" + event[end:]
        return event[:key] + event[end:]

    def _rewrite_decoded(self, event: bytes) -> bytes | None:
        """The slow path, for any chunk shape: decode it, edit it, encode it again."""
        try:
            chunk = msgspec.json.decode(event[len(_DATA) :])
        except msgspec.DecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        usage_only = choices == []
        if isinstance(usage, dict):
            self._latest = None  # this usage is newer than any the fast path kept
            index = None
            if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
                index = choices[0].get("index")
            self._note(usage, index if isinstance(index, int) else None, usage_only)
        elif not usage_only:
            self._streamed.add(event)
        if self._asked is ClientUsage.CONTINUOUS:
            return event
        if usage_only:
            return event if self._asked is ClientUsage.FINAL else None
        if self._asked is ClientUsage.FINAL:
            chunk["usage"] = None
        else:
            chunk.pop("usage", None)
        return _DATA + msgspec.json.encode(chunk) + b"\n\n"

    def _note_raw(self, raw: bytes, usage_only: bool) -> None:
        try:
            usage = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return
        if isinstance(usage, dict):
            self._note(usage, None, usage_only)

    def _note(self, usage: dict[str, Any], choice: int | None, usage_only: bool) -> None:
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return
        if usage_only:
            self._final = {key: value for key, value in usage.items() if isinstance(value, int)}
            return
        self._prompt_tokens = prompt
        self._completion_tokens = completion
        if choice is not None:
            self._per_choice[choice] = completion
            self._per_prompt[choice // self._n] = prompt


def _usage_span(event: bytes) -> tuple[int, int] | None:
    """Where ``,"usage":<object or null>`` is, as (start of the key, end of the value); None
    if the event has no such usage value (the slow path then decides)."""
    key = event.rfind(_USAGE_KEY)
    if key < 0:
        return None
    start = key + len(_USAGE_KEY)
    if event.startswith(b"null", start):
        return key, start + 4
    if event[start : start + 1] != b"{":
        return None
    # The object's end: the first "}" that balances its braces (usage holds no strings).
    end = event.find(b"}", start)
    while end >= 0 and event.count(b"{", start, end + 1) != event.count(b"}", start, end + 1):
        end = event.find(b"}", end + 1)
    if end < 0:
        return None
    return key, end + 1
