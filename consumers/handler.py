"""Serving one request: call the backend and stream the answer back as reply frames.

Streams are relayed event by event as the backend produces them, and coalesced
only under load (`consumers/stream_sender.py`): events that arrive while a frame is
on its way leave together in the next `ChunkBatch`, cut on event boundaries so an
error can follow any batch cleanly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import structlog

from broker.errors import BackendError, DeadlineExceeded, HotqError
from broker.messages import DONE_EVENT, ErrorReply, Final, RequestEnvelope, Resume
from consumers.backend_client import BackendClient
from consumers.continuation import ResumedStream, continuation_body
from consumers.replies import ReplySender
from consumers.stream_sender import StreamSender
from consumers.stream_usage import StreamUsage, backend_request, prompt_estimate

log = structlog.get_logger("hotq.consumer")

EVENT_END = b"\n\n"
_FINISH_MARKS = (b'"finish_reason":"', b'"finish_reason": "')  # a finish_reason that is set


class _UsageOnly(msgspec.Struct):
    usage: dict[str, Any] | None = None


class _ErrorBody(msgspec.Struct):
    error: dict[str, Any] | None = None
    message: str | None = None
    detail: Any = None


class AttemptProgress:
    """How far one attempt at a request got, for the worker to settle and account it."""

    def __init__(self, body: bytes = b"") -> None:
        self._body = body
        self._prompt_estimate: int | None = None
        self.called_backend = False  # the backend was asked, so it may have generated tokens
        self.sent_output = False  # output went out to the client: the request is not safe to serve again ...
        self.continuable = False  # ... unless it is a stream another consumer can continue
        self.stream_usage: StreamUsage | ResumedStream | None = None
        self.answer_usage: dict[str, int] | None = None  # a complete answer's usage

    @property
    def usage(self) -> dict[str, int] | None:
        """The backend's token counts so far (a stream cut short counts what it generated)."""
        if self.answer_usage is not None or self.stream_usage is None:
            return self.answer_usage
        return self.stream_usage.usage

    def usage_at_cut(self) -> dict[str, int] | None:
        """`usage` of an attempt cut short; a non-streaming answer cut short reports nothing, but
        the backend had read its prompt: that is estimated (its completion so far is unknown)."""
        usage = self.usage
        if usage is not None or self.stream_usage is not None or not self.called_backend:
            return usage
        if self._prompt_estimate is None:
            self._prompt_estimate = prompt_estimate(self._body)
        prompt = self._prompt_estimate
        return {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt} if prompt else None


class BackendUnreachable(Exception):
    """The backend failed before any output went out, or mid-way through a stream that can be
    continued (so the request is safe to serve again)."""


def usage_of(json_body: bytes) -> dict[str, int] | None:
    try:
        usage = msgspec.json.decode(json_body, type=_UsageOnly).usage
    except msgspec.DecodeError:
        return None
    if not usage:
        return None
    return {key: value for key, value in usage.items() if isinstance(value, int)}


def split_events(data: bytes, rewrite: Callable[[bytes], bytes | None]) -> list[bytes]:
    """Complete SSE events (each ending in a blank line) as `rewrite` makes them for the
    client, with a trailing finish-only chunk folded into the content chunk before it
    (see `fold_finish_chunk`)."""
    events: list[bytes] = []
    for raw in data.split(EVENT_END):
        if not raw:
            continue
        event = rewrite(raw + EVENT_END)
        if event is None:
            continue
        if events and (_FINISH_MARKS[0] in event or _FINISH_MARKS[1] in event):
            folded = fold_finish_chunk(events[-1], event)
            if folded is not None:
                events[-1] = folded
                continue
        events.append(event)
    return events


def fold_finish_chunk(previous: bytes, finishing: bytes) -> bytes | None:
    """OpenAI sets finish_reason on the last content chunk; vLLM sends it in an extra
    chunk with empty content. Fold such a chunk into the one before it; None if it is
    not that case. Only the last two events of a stream are ever decoded here."""
    try:
        before = json.loads(previous.removeprefix(b"data: "))
        after = json.loads(finishing.removeprefix(b"data: "))
    except ValueError:
        return None
    if not isinstance(before, dict) or not isinstance(after, dict) or after.get("usage"):
        return None
    if len(before.get("choices") or ()) != 1 or len(after.get("choices") or ()) != 1:
        return None
    target, source = before["choices"][0], after["choices"][0]
    if target.get("index") != source.get("index") or target.get("finish_reason") is not None:
        return None
    if _has_output(source) or not _has_output(target):
        return None
    for key in ("finish_reason", "stop_reason"):
        if key in source:
            target[key] = source[key]
    return b"data: " + json.dumps(before, separators=(",", ":"), ensure_ascii=False).encode() + EVENT_END


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or any(value not in ("", None) for key, value in delta.items() if key != "role"))


def backend_error(status: int, body: bytes) -> BackendError:
    """Turn a backend's error response into OpenAI error terms, keeping its status and fields."""
    try:
        parsed = msgspec.json.decode(body, type=_ErrorBody)
    except msgspec.DecodeError:
        parsed = _ErrorBody()
    error = parsed.error or {}
    message = error.get("message") or parsed.message or parsed.detail
    error_type = error.get("type")
    return BackendError(
        str(message) if message else f"the backend answered HTTP {status}: {body[:200].decode(errors='replace')}",
        status=status,
        error_type=str(error_type) if error_type else ("invalid_request_error" if status < 500 else "server_error"),
        code=error.get("code") if isinstance(error.get("code"), str) else None,
        param=error.get("param") if isinstance(error.get("param"), str) else None,
    )


def error_frame(envelope: RequestEnvelope, attempt: str, error: HotqError) -> ErrorReply:
    return ErrorReply(
        request_id=envelope.request_id,
        attempt=attempt,
        status=error.status,
        error_type=error.error_type,
        message=error.message,
        code=error.code,
        param=error.param,
    )


class RequestHandler:
    """Runs a request against the backend and sends every frame after `Started`."""

    def __init__(self, backend: BackendClient, flush_interval_s: float) -> None:
        self._backend = backend
        self._flush_interval_s = flush_interval_s
        # Generated tokens the backend reported in usage; read by the agent's heartbeat.
        self.completion_tokens = 0

    async def serve(
        self,
        envelope: RequestEnvelope,
        attempt: str,
        replies: ReplySender,
        progress: AttemptProgress,
        resume: Resume | None = None,
    ) -> None:
        """Send exactly one final frame (`Final` or `ErrorReply`); raise `BackendUnreachable`
        instead if the request is safe to serve again elsewhere. `progress` follows the attempt,
        also when it is cancelled. With `resume`, continue the stream the client already got part of."""
        remaining = envelope.deadline - time.time()
        try:
            async with asyncio.timeout(remaining):
                await self._call_backend(envelope, attempt, replies, progress, resume)
        except TimeoutError:
            error = DeadlineExceeded(f"the request's deadline passed after {remaining:.0f} s")
            await replies.send(error_frame(envelope, attempt, error))
        except HotqError as error:
            await replies.send(error_frame(envelope, attempt, error))

    async def _call_backend(
        self,
        envelope: RequestEnvelope,
        attempt: str,
        replies: ReplySender,
        progress: AttemptProgress,
        resume: Resume | None,
    ) -> None:
        body = envelope.body
        if resume is not None and (resume.tokens or resume.text):
            body = continuation_body(envelope.endpoint, body, resume)
        if envelope.stream:
            body, stream_usage = backend_request(body)
            # Once the client has any of the stream, the rest goes on as the same stream.
            progress.stream_usage = ResumedStream(stream_usage, resume) if resume and resume.stream_id else stream_usage
        progress.called_backend = True
        try:
            async with self._backend.post(envelope.endpoint, body) as response:
                if response.status >= 400:
                    raise backend_error(response.status, await response.read())
                if envelope.stream:
                    await self._relay_stream(envelope, attempt, response, replies, progress)
                else:
                    answer = await response.read()
                    progress.answer_usage = usage_of(answer)
                    await replies.send(Final(envelope.request_id, attempt, 0, response.status, answer, progress.usage))
                    self._count(progress.usage)
        except (aiohttp.ClientError, ConnectionError) as exc:
            if not progress.sent_output or progress.continuable:
                # Nothing reached the client, or another consumer can continue the stream: the
                # request can be served again, here or elsewhere.
                raise BackendUnreachable(repr(exc)) from exc
            raise BackendError(f"the backend failed mid-answer: {exc!r}", status=502) from exc

    def _count(self, usage: dict[str, int] | None) -> None:
        self.completion_tokens += (usage or {}).get("completion_tokens", 0)

    async def _relay_stream(
        self,
        envelope: RequestEnvelope,
        attempt: str,
        response: aiohttp.ClientResponse,
        replies: ReplySender,
        progress: AttemptProgress,
    ) -> None:
        stream_usage = progress.stream_usage
        assert stream_usage is not None, "a stream's usage is followed from its request on"
        pending = bytearray()

        def sent() -> None:
            progress.sent_output = True

        sender = StreamSender(replies, envelope.request_id, attempt, self._flush_interval_s, sent)
        try:
            async for piece in response.content.iter_any():
                pending += piece
                complete_end = pending.rfind(EVENT_END) + len(EVENT_END)
                if complete_end < len(EVENT_END):
                    continue
                # Each event goes out as soon as it is complete: never held for the next one. vLLM's
                # finish-only chunk is folded into the content chunk before it when both came together.
                events = split_events(bytes(pending[:complete_end]), stream_usage.client_event)
                del pending[:complete_end]
                sender.put([event for event in events if event != DONE_EVENT])  # the API writes [DONE] itself
            events = split_events(bytes(pending), stream_usage.client_event)
            sender.put([event for event in events if event != DONE_EVENT])
            rest = await sender.finish()
        except BaseException:
            sender.cancel()
            # Cut short (the client left, the backend failed): the events read but not yet sent count too.
            complete_end = pending.rfind(EVENT_END)
            if complete_end >= 0:
                split_events(bytes(pending[: complete_end + len(EVENT_END)]), stream_usage.client_event)
            self._count(stream_usage.usage)
            raise
        await replies.send(Final(envelope.request_id, attempt, sender.seq, response.status, rest, stream_usage.usage))
        self._count(stream_usage.usage)
