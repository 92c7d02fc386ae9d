"""Deterministic fake OpenAI-compatible backend (stands in for vLLM in tests/benchmarks).

Run:  python -m ops.testing.fake_backend --port PORT [--host 127.0.0.1] [--model NAME ...] [--ready-after S]
(``--port 0`` picks a free port). On startup it prints one stdout line
``FAKE_BACKEND_URL http://HOST:PORT`` before serving. Default model: ``fake-model``.
As a model's ``command`` (what an agent starts): ``FAKE_BACKEND_COMMAND``.

In tests prefer ``running_fake_backend(models)`` (context manager: subprocess on a free
port, waits for /health, yields the base URL *without* ``/v1``, stops it on exit) or
``create_app(models)`` for in-process use.

Deterministic behaviour
-----------------------
* ``GET /health`` -> 200 ``{"status": "ok"}`` (503 ``loading`` for ``--ready-after`` seconds after start,
  as a model server loading its weights); ``GET /v1/models`` -> OpenAI list of models.
* Reply tokens for user text T (chat: content of the LAST ``user`` message, text parts of
  list-content joined by a space; completions: ``prompt``): ``["echo:"] + [" " + w[::-1]
  for w in T.split()]``, e.g. "hello world" -> ["echo:", " olleh", " dlrow"]. If
  ``max_tokens`` (chat also ``max_completion_tokens``) is given and smaller than that,
  truncate to it and finish_reason is "length"; otherwise "stop". The reply text is the
  concatenation. See ``expected_chat_tokens`` / ``expected_completion_tokens``.
* Continuations (what hotq sends to continue a stream another consumer started): a chat with
  ``continue_final_message`` whose last message is the assistant's continues that message, and
  a completions prompt holding ``echo:`` continues the text from there (the prompt before it is
  the user text); the reply is the tokens after that text (``max_tokens`` counts those only),
  and the text's tokens count as prompt tokens (a word a token), as a model continuing itself.
* usage: prompt_tokens = whitespace-separated words over all messages' contents (or the
  prompt), completion_tokens = reply tokens per choice * n, total = sum.
* ``n`` (default 1): choices 0..n-1 all carry the same text.
* Non-stream chat: ``chat.completion`` with id ``chatcmpl-<hex>``, choices[i] =
  {index, message {role: assistant, content}, finish_reason, logprobs: null}, usage.
  Non-stream completions: ``text_completion`` with id ``cmpl-<hex>``, choices[i] =
  {index, text, finish_reason, logprobs: null}, usage.
* Streaming (``stream: true``): SSE ``data: <json>\\n\\n`` chunks sharing one id/created.
  Chat: first one chunk per choice with delta {role: assistant, content: ""}, then per
  token one chunk per choice with delta {content: token}; finish_reason is set on each
  choice's LAST content chunk (no separate empty finish chunk), null elsewhere.
  Completions: per token one chunk per choice {index, text, finish_reason, logprobs: null}
  (no role chunk). With ``stream_options.include_usage`` every chunk has ``"usage": null``
  and one extra final chunk has ``"choices": []`` plus usage; with ``continuous_usage_stats``
  as well (vLLM's extension), every chunk carries the usage so far instead of null (the
  prompt, and the tokens of that chunk's choice so far, as vLLM counts them). Ends with
  ``data: [DONE]``. Started with ``--no-running-usage`` (``running_fake_backend(...,
  running_usage=False)``) it ignores ``continuous_usage_stats``, as OpenAI and most other
  OpenAI-compatible servers do: only the final usage chunk carries usage.
* ``POST /v1/embeddings``: ``input`` str or list[str]; each text -> ``expected_embedding``
  (8 floats in [-1, 1] from sha256, rounded to 6 decimals). ``encoding_format`` "float"
  (default when absent) or "base64" (little-endian float32, like OpenAI; the openai python
  client asks for base64 by default). usage: prompt_tokens = total words, total = same.
* Extension fields in the request body (send via ``extra_body``):
  ``fake_delay_ms``: sleep that long before every streamed content token (after the role
  chunk) and once before a non-stream answer. ``fake_tag``: label for the records below.
  ``fake_hold_file``: a path; the request is held before anything of its answer is sent
  until that file exists (or the client leaves), so a test decides when held work ends
  instead of guessing how long it takes.
  ``fake_break_after``: a stream drops its connection abruptly (no end of the chunked body)
  after that many content tokens, as a backend that crashes or loses its network does.
  ``fake_pause_file``: a path; a stream pauses after its first content token until that
  file exists (what reached the client meanwhile was relayed without waiting for the next token).
* Prefix cache (``ops.testing.prefix_cache``): prompts' blocks in an LRU, prefill time per
  uncached token (``HOTQ_FAKE_PREFILL_MS_PER_TOKEN``), vLLM's two counters at ``GET /metrics``.
* Error injection: chat last-user-message / completion prompt / any embedding input that
  starts with ``"FAIL <status>"`` (400..599) -> that status with
  ``{"error": {"message": "fake backend failure", "type": T, "param": null,
  "code": "fake_<status>"}}``, T = rate_limit_error (429), invalid_request_error (other
  4xx), server_error (5xx).
* Unknown model -> 404 ``{"error": {..., "type": "invalid_request_error", "param":
  "model", "code": "model_not_found"}}``. Malformed requests -> 400 invalid_request_error.
* Stats: ``GET /_stats`` -> ``{"started", "completed", "cancelled", "active",
  "cancelled_tags": {tag: time.time()}, "cancelled_tags_monotonic": {tag:
  time.monotonic()}}`` over inference POSTs (chat/completions/embeddings; error answers
  count as completed). "cancelled" = client went away mid-stream (or during a non-stream
  delay). ``POST /_reset`` zeroes the counters; "active" is always the true in-flight
  count, and requests started before a reset are not counted when they end.
  ``"cancelled_after_tokens": {tag: n}``: how many tokens (of each choice) a tagged stream
  had written when it was cancelled. ``"started_order": {tag: n}``: a tagged request was
  the n-th one started (the value "started" had right after it started).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import struct
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ops.processes import Child
from ops.testing.deadlines import STARTUP_S, STOP_S
from ops.testing.prefix_cache import PrefixCache

DEFAULT_MODEL: Final = "fake-model"
EMBEDDING_DIM: Final = 8
URL_LINE_PREFIX: Final = "FAKE_BACKEND_URL "
HOLD_POLL_S: Final = 0.02  # how often a held request looks for its file (and its client)
# A model's `command` that makes agents run this backend instead of vLLM.
FAKE_BACKEND_COMMAND: Final = ["{python}", "-m", "ops.testing.fake_backend", "--port", "{port}", "--model", "{model}"]

JsonObj = dict[str, Any]


# ---------------------------------------------------------------------------
# Pure, deterministic behaviour (shared by the server and by test expectations)
# ---------------------------------------------------------------------------


def _reply_tokens(user_text: str, max_tokens: int | None) -> tuple[list[str], str]:
    tokens = ["echo:"] + [" " + word[::-1] for word in user_text.split()]
    if max_tokens is not None and len(tokens) > max_tokens:
        return tokens[:max_tokens], "length"
    return tokens, "stop"


def _reply_tokens_cut(tokens: list[str], max_tokens: int | None) -> tuple[list[str], str]:
    if max_tokens is not None and len(tokens) > max_tokens:
        return tokens[:max_tokens], "length"
    return tokens, "stop"


def expected_chat_tokens(user_text: str, max_tokens: int | None) -> tuple[list[str], str]:
    """(tokens, finish_reason) the backend produces for a chat whose last user text is given."""
    return _reply_tokens(user_text, max_tokens)


def expected_completion_tokens(prompt: str, max_tokens: int | None) -> tuple[list[str], str]:
    """(tokens, finish_reason) the backend produces for a /v1/completions prompt."""
    return _reply_tokens(prompt, max_tokens)


def _continued(tokens: list[str], before: str) -> list[str]:
    """The reply tokens after the text `before` (a prefix of their concatenation)."""
    text = "".join(tokens)
    if not text.startswith(before):
        raise _bad_request(f"the text to continue is not this answer's beginning: {before[:80]!r}")
    done = ""
    for index, token in enumerate(tokens):
        if len(done) + len(token) > len(before):
            return [text[len(before) : len(done) + len(token)], *tokens[index + 1 :]]  # cut mid-token
        done += token
    return []


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
    return "".join(_reply_tokens(last_user_text(messages), max_tokens)[0])


def _word_count(text: str) -> int:
    return len(text.split())


def _usage(prompt_tokens: int, completion_tokens: int) -> JsonObj:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code
        self.param = param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _bad_request(message: str, param: str | None = None) -> _ApiError:
    return _ApiError(400, message, "invalid_request_error", None, param)


def _check_fail_injection(text: str) -> None:
    match = re.match(r"FAIL (\d{3})\b", text)
    if match is None:
        return
    status = int(match.group(1))
    if not 400 <= status <= 599:
        return
    if status == 429:
        err_type = "rate_limit_error"
    elif status < 500:
        err_type = "invalid_request_error"
    else:
        err_type = "server_error"
    raise _ApiError(status, "fake backend failure", err_type, f"fake_{status}")


@dataclass(frozen=True)
class Hold:
    """Requests sent with `hold.field` in their body wait in the backend until `release()`."""

    path: Path  # the file whose existence releases them

    @property
    def field(self) -> JsonObj:
        return {"fake_hold_file": str(self.path)}

    def release(self) -> None:
        self.path.touch()


def fake_stats(url: str) -> JsonObj:
    """The counters of the fake backend at `url` (``GET /_stats``)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with no_proxy.open(url + "/_stats", timeout=30) as response:
        stats: JsonObj = json.load(response)
        return stats


# ---------------------------------------------------------------------------
# Per-app stats (cancellation observability)
# ---------------------------------------------------------------------------


@dataclass
class FakeStats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    active: int = 0
    generation: int = 0
    cancelled_tags: dict[str, float] = field(default_factory=dict)
    cancelled_tags_monotonic: dict[str, float] = field(default_factory=dict)
    cancelled_after_tokens: dict[str, int] = field(default_factory=dict)
    started_order: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        # "active" is left alone: it counts real in-flight requests, which a reset can't end.
        self.started = self.completed = self.cancelled = 0
        self.cancelled_tags.clear()
        self.cancelled_tags_monotonic.clear()
        self.cancelled_after_tokens.clear()
        self.started_order.clear()
        self.generation += 1

    def as_json(self) -> JsonObj:
        return {
            "started": self.started,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "active": self.active,
            "cancelled_tags": dict(self.cancelled_tags),
            "cancelled_tags_monotonic": dict(self.cancelled_tags_monotonic),
            "cancelled_after_tokens": dict(self.cancelled_after_tokens),
            "started_order": dict(self.started_order),
        }


class _Call:
    """Lifecycle of one inference request; end() is idempotent so every exit path can call it."""

    def __init__(self, stats: FakeStats, tag: str | None) -> None:
        self._stats = stats
        self._tag = tag
        self._generation = stats.generation
        self._open = True
        self.tokens_sent = 0  # stream positions written so far (each choice's tokens up to it)
        stats.started += 1
        stats.active += 1
        if tag is not None:
            stats.started_order[tag] = stats.started

    def end(self, *, cancelled: bool) -> None:
        if not self._open:
            return
        self._open = False
        stats = self._stats
        stats.active -= 1
        if stats.generation != self._generation:
            return  # started before a /_reset: don't pollute the fresh counters
        if not cancelled:
            stats.completed += 1
            return
        stats.cancelled += 1
        if self._tag is not None:
            stats.cancelled_tags[self._tag] = time.time()
            stats.cancelled_tags_monotonic[self._tag] = time.monotonic()
            stats.cancelled_after_tokens[self._tag] = self.tokens_sent


# ---------------------------------------------------------------------------
# Request parsing helpers
# ---------------------------------------------------------------------------


@dataclass
class _Common:
    model: str
    stream: bool
    include_usage: bool
    continuous_usage: bool  # vLLM's stream_options.continuous_usage_stats (with include_usage)
    n: int
    max_tokens: int | None
    delay_s: float
    hold_file: str | None
    break_after: int | None
    pause_file: str | None


class _Answer:
    """What every object of one answer shares: an id, a creation time, the model; and in a stream
    that asked for usage, ``"usage": null`` in each chunk before the usage-only one."""

    def __init__(self, id_prefix: str, common: _Common) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = common.model
        self.include_usage = common.include_usage

    def part(self, object_type: str, choices: list[JsonObj]) -> JsonObj:
        part: JsonObj = {
            "id": self.id,
            "object": object_type,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            part["usage"] = None
        return part


async def _read_json(request: Request) -> JsonObj:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise _bad_request("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("request body must be a JSON object")
    return body


def _tag_of(body: JsonObj) -> str | None:
    tag = body.get("fake_tag")
    return None if tag is None else str(tag)


def _opt_int(body: JsonObj, key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad_request(f"'{key}' must be an integer >= {minimum}", key)
    return value


def _common(
    body: JsonObj, models: Sequence[str], max_tokens_keys: Sequence[str], running_usage: bool = True
) -> _Common:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad_request("'model' is required", "model")
    if model not in models:
        raise _ApiError(
            404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found", "model"
        )
    max_tokens: int | None = None
    for key in max_tokens_keys:
        max_tokens = _opt_int(body, key, 1)
        if max_tokens is not None:
            break
    n = _opt_int(body, "n", 1) or 1
    stream_options = body.get("stream_options")
    if not isinstance(stream_options, dict):
        stream_options = {}
    include_usage = bool(stream_options.get("include_usage"))
    continuous_usage = running_usage and include_usage and bool(stream_options.get("continuous_usage_stats"))
    delay = body.get("fake_delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
        raise _bad_request("'fake_delay_ms' must be a non-negative number", "fake_delay_ms")
    hold_file = body.get("fake_hold_file")
    if hold_file is not None and not isinstance(hold_file, str):
        raise _bad_request("'fake_hold_file' must be a path", "fake_hold_file")
    pause_file = body.get("fake_pause_file")
    if pause_file is not None and not isinstance(pause_file, str):
        raise _bad_request("'fake_pause_file' must be a path", "fake_pause_file")
    return _Common(
        model,
        bool(body.get("stream")),
        include_usage,
        continuous_usage,
        n,
        max_tokens,
        float(delay) / 1000.0,
        hold_file,
        _opt_int(body, "fake_break_after", 0),
        pause_file,
    )


def _sse(obj: JsonObj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _TrackedStream(StreamingResponse):
    """Ends the call as cancelled if the body generator never got to run its own cleanup."""

    def __init__(self, content: AsyncIterator[bytes], call: _Call) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A disconnect before the generator's first step cancels it un-started, so its
            # finally never runs; no-op when the generator already ended the call.
            self._call.end(cancelled=True)


_Handler = Callable[[Request, JsonObj, _Call], Awaitable[Response]]
_TokenChunk = Callable[[int, str, bool], JsonObj]


# ---------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------


class _BrokenOnPurpose(ConnectionAbortedError):
    """``fake_break_after``: the connection drops mid-answer."""


def create_app(models: list[str] | None = None, running_usage: bool = True, ready_after_s: float = 0.0) -> Starlette:
    """A fresh fake backend app serving ``models`` (default ``["fake-model"]``), own stats;
    `running_usage` False ignores ``continuous_usage_stats``; ``/health`` answers 503 for the
    first ``ready_after_s`` seconds, as a model server loading."""
    served: list[str] = list(models) if models else [DEFAULT_MODEL]
    stats = FakeStats()
    cache = PrefixCache.from_env()
    created_at = int(time.time())
    ready_at = time.monotonic() + ready_after_s

    async def health(request: Request) -> Response:
        if time.monotonic() < ready_at:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def list_models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": created_at, "owned_by": "fake-backend"} for m in served]
        return JSONResponse({"object": "list", "data": data})

    async def get_stats(request: Request) -> Response:
        return JSONResponse(stats.as_json())

    async def reset_stats(request: Request) -> Response:
        stats.reset()
        return JSONResponse({"status": "reset"})

    async def run_call(request: Request, handler: _Handler) -> Response:
        # Shared wrapper: counts the request, turns _ApiError into OpenAI error JSON, and
        # hands the _Call to streaming generators, which end it themselves.
        try:
            body = await _read_json(request)
        except _ApiError as exc:
            call = _Call(stats, None)
            call.end(cancelled=False)
            return exc.response()
        call = _Call(stats, _tag_of(body))
        handed_off = False
        try:
            response: Response = await handler(request, body, call)
            handed_off = isinstance(response, StreamingResponse)
            return response
        except _ApiError as exc:
            return exc.response()
        except asyncio.CancelledError:
            call.end(cancelled=True)
            raise
        finally:
            if not handed_off:
                call.end(cancelled=False)  # no-op if already ended as cancelled

    async def released(request: Request, common: _Common, hold_file: str | None = None) -> bool:
        """Hold the request until its hold file exists (if it has one); False if its client left first."""
        hold_file = hold_file or common.hold_file
        while hold_file is not None and not os.path.exists(hold_file):
            if await request.is_disconnected():
                return False
            await asyncio.sleep(HOLD_POLL_S)
        return True

    async def delay_then_check_disconnect(request: Request, common: _Common, call: _Call) -> Response | None:
        if not await released(request, common):
            call.end(cancelled=True)
            return Response(status_code=499)  # nobody reads it; just stop
        if common.delay_s <= 0:
            return None
        await asyncio.sleep(common.delay_s)
        if await request.is_disconnected():
            call.end(cancelled=True)
            return Response(status_code=499)
        return None

    def stream_response(
        request: Request,
        common: _Common,
        call: _Call,
        head: list[JsonObj],
        per_token: _TokenChunk,
        tokens: list[str],
        final_usage_chunk: JsonObj,
    ) -> StreamingResponse:
        prompt_tokens = final_usage_chunk["usage"]["prompt_tokens"]

        def counted(chunk: JsonObj, completion_tokens: int) -> JsonObj:
            if common.continuous_usage:
                chunk["usage"] = _usage(prompt_tokens, completion_tokens)
            return chunk

        async def events() -> AsyncIterator[bytes]:
            done = False
            try:
                if not await released(request, common):
                    return
                for chunk in head:
                    yield _sse(counted(chunk, 0))
                last = len(tokens) - 1
                for pos, token in enumerate(tokens):
                    if common.break_after is not None and pos >= common.break_after:
                        raise _BrokenOnPurpose(f"fake_break_after {common.break_after}")
                    if common.delay_s > 0:
                        await asyncio.sleep(common.delay_s)
                        # Only slow streams poll: fast ones are short and the ASGI
                        # disconnect listener cancels us (CancelledError) anyway.
                        if await request.is_disconnected():
                            return
                    for index in range(common.n):
                        yield _sse(counted(per_token(index, token, pos == last), pos + 1))
                    call.tokens_sent = pos + 1
                    if pos == 0 and common.pause_file and not await released(request, common, common.pause_file):
                        return
                if common.include_usage:
                    yield _sse(final_usage_chunk)
                yield b"data: [DONE]\n\n"
                done = True
            finally:
                # Any exit before [DONE] was sent (CancelledError from the disconnect
                # listener, GeneratorExit, OSError, polled disconnect) counts as a cancel.
                call.end(cancelled=not done)

        return _TrackedStream(events(), call)

    async def chat(request: Request, body: JsonObj, call: _Call) -> Response:
        common = _common(body, served, ("max_completion_tokens", "max_tokens"), running_usage)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _bad_request("'messages' must be a non-empty list of objects", "messages")
        user_text = last_user_text(messages)
        _check_fail_injection(user_text)
        tokens, finish = expected_chat_tokens(user_text, common.max_tokens)
        if body.get("continue_final_message") and messages[-1].get("role") == "assistant":
            rest = _continued(expected_chat_tokens(user_text, None)[0], content_text(messages[-1].get("content")))
            tokens, finish = _reply_tokens_cut(rest, common.max_tokens)
        prompt_tokens = sum(_word_count(content_text(m.get("content"))) for m in messages)
        usage = _usage(prompt_tokens, len(tokens) * common.n)
        answer = _Answer("chatcmpl", common)
        await cache.prefill(" ".join(content_text(m.get("content")) for m in messages).split())

        if not common.stream:
            early = await delay_then_check_disconnect(request, common, call)
            if early is not None:
                return early
            text = "".join(tokens)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
                for i in range(common.n)
            ]
            return JSONResponse(answer.part("chat.completion", choices) | {"usage": usage})

        def chunk(choices: list[JsonObj]) -> JsonObj:
            return answer.part("chat.completion.chunk", choices)

        def per_token(index: int, token: str, is_last: bool) -> JsonObj:
            choice = {
                "index": index,
                "delta": {"content": token},
                "logprobs": None,
                "finish_reason": finish if is_last else None,
            }
            return chunk([choice])

        head = [
            chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(common.n)
        ]
        final = chunk([]) | {"usage": usage}
        return stream_response(request, common, call, head, per_token, tokens, final)

    async def completions(request: Request, body: JsonObj, call: _Call) -> Response:
        common = _common(body, served, ("max_tokens",), running_usage)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad_request("'prompt' must be a string", "prompt")
        _check_fail_injection(prompt)
        tokens, finish = expected_completion_tokens(prompt, common.max_tokens)
        if "echo:" in prompt:
            user_text = prompt[: prompt.index("echo:")]
            rest = _continued(expected_completion_tokens(user_text, None)[0], prompt[len(user_text) :])
            tokens, finish = _reply_tokens_cut(rest, common.max_tokens)
        prompt_words = _word_count(prompt.replace("echo:", " echo:", 1))  # the text continued: a word a token
        usage = _usage(prompt_words, len(tokens) * common.n)
        answer = _Answer("cmpl", common)
        await cache.prefill(prompt.split())

        def chunk(choices: list[JsonObj]) -> JsonObj:
            return answer.part("text_completion", choices)

        if not common.stream:
            early = await delay_then_check_disconnect(request, common, call)
            if early is not None:
                return early
            text = "".join(tokens)
            choices = [{"index": i, "text": text, "finish_reason": finish, "logprobs": None} for i in range(common.n)]
            return JSONResponse(chunk(choices) | {"usage": usage})

        def per_token(index: int, token: str, is_last: bool) -> JsonObj:
            return chunk(
                [{"index": index, "text": token, "finish_reason": finish if is_last else None, "logprobs": None}]
            )

        final = chunk([]) | {"usage": usage}
        return stream_response(request, common, call, [], per_token, tokens, final)

    async def embeddings(request: Request, body: JsonObj, call: _Call) -> Response:
        common = _common(body, served, ())
        raw = body.get("input")
        inputs: list[str] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        if not inputs or not all(isinstance(text, str) for text in inputs):
            raise _bad_request("'input' must be a string or a non-empty list of strings", "input")
        for text in inputs:
            _check_fail_injection(text)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        early = await delay_then_check_disconnect(request, common, call)
        if early is not None:
            return early
        data: list[JsonObj] = []
        for index, text in enumerate(inputs):
            vector = expected_embedding(text)
            encoded: list[float] | str = vector
            if encoding == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        words = sum(_word_count(text) for text in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": common.model,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def chat_endpoint(request: Request) -> Response:
        return await run_call(request, chat)

    async def completions_endpoint(request: Request) -> Response:
        return await run_call(request, completions)

    async def embeddings_endpoint(request: Request) -> Response:
        return await run_call(request, embeddings)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_endpoint, methods=["POST"]),
            Route("/v1/completions", completions_endpoint, methods=["POST"]),
            Route("/v1/embeddings", embeddings_endpoint, methods=["POST"]),
            Route("/_stats", get_stats, methods=["GET"]),
            Route("/_reset", reset_stats, methods=["POST"]),
            Route("/metrics", cache.metrics, methods=["GET"]),
        ]
    )
    app.state.stats = stats
    app.state.models = served
    return app


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------


def _url_for(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve(models: list[str], host: str, port: int, running_usage: bool = True, ready_after_s: float = 0.0) -> None:
    """Bind (port 0 = free port), print the URL line, then serve until SIGINT/SIGTERM."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Binding ourselves (instead of letting uvicorn do it) lets port 0 work race-free:
    # the real port is known before we announce it.
    sock.listen(2048)
    config = uvicorn.Config(
        create_app(models, running_usage, ready_after_s),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Long fake streams would otherwise hold up a SIGTERM shutdown indefinitely.
        timeout_graceful_shutdown=1,
    )
    print(f"{URL_LINE_PREFIX}{_url_for(host, sock.getsockname()[1])}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.testing.fake_backend", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--model", dest="models", action="extend", nargs="+", default=[], metavar="NAME")
    parser.add_argument(
        "--no-running-usage", action="store_true", help="ignore continuous_usage_stats (like most servers)"
    )
    parser.add_argument(
        "--ready-after", dest="ready_after_s", type=float, default=0.0, help="seconds /health says 503 (loading)"
    )
    args = parser.parse_args(argv)
    serve(args.models or [DEFAULT_MODEL], args.host, args.port, not args.no_running_usage, args.ready_after_s)


@contextlib.contextmanager
def running_fake_backend(
    models: Sequence[str] | None = None, *, host: str = "127.0.0.1", port: int = 0, running_usage: bool = True
) -> Iterator[str]:
    """Run the fake backend in a subprocess; yield its base URL (no ``/v1`` suffix).
    `running_usage` False: a backend that ignores ``continuous_usage_stats``.

    A subprocess (not a thread) so tests can also SIGKILL it and so its event loop never
    competes with the code under test.
    """
    root = Path(__file__).resolve().parents[2]
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "ops.testing.fake_backend", "--host", host, "--port", str(port)]
    if models:
        argv += ["--model", *models]
    if not running_usage:
        argv.append("--no-running-usage")
    with tempfile.TemporaryDirectory(prefix="hotq-fake-backend-") as logs:
        backend = Child("fake backend", argv, Path(logs) / "fake-backend.log", env=env, cwd=root)
        try:
            backend.wait_for_log(URL_LINE_PREFIX, STARTUP_S)
            announced = next(line for line in backend.log_text().splitlines() if line.startswith(URL_LINE_PREFIX))
            url = announced.removeprefix(URL_LINE_PREFIX).strip()
            backend.wait_for_http(url + "/health", STARTUP_S, accept=lambda status: status == 200)
            yield url
        finally:
            backend.stop(STOP_S)


if __name__ == "__main__":
    main()
