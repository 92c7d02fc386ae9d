"""Serving one request: call the backend and stream the answer back as reply frames.

Streams are coalesced: SSE events read from the backend are sent in one
`ChunkBatch` at most every `flush_interval_s` (the first one at once, for time
to first token), cut on event boundaries so an error can follow any batch
cleanly. A fast stream thus costs a few messages a second, not one per token.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
import structlog

from broker.errors import BackendError, DeadlineExceeded, HotqError
from broker.messages import ChunkBatch, ErrorReply, Final, RequestEnvelope
from consumers.backend import BackendClient
from consumers.replies import ReplySender

log = structlog.get_logger("hotq.consumer")

DONE_EVENT = b"data: [DONE]\n\n"
EVENT_END = b"\n\n"
_USAGE_TAIL_BYTES = 8192  # the usage event is the last one; it is far smaller than this


class _UsageOnly(msgspec.Struct):
    usage: dict[str, Any] | None = None


class _ErrorBody(msgspec.Struct):
    error: dict[str, Any] | None = None
    message: str | None = None
    detail: Any = None


class BackendUnreachable(Exception):
    """The backend could not be reached before it produced any output (safe to retry elsewhere)."""


def usage_of(json_body: bytes) -> dict[str, int] | None:
    try:
        usage = msgspec.json.decode(json_body, type=_UsageOnly).usage
    except msgspec.DecodeError:
        return None
    if not usage:
        return None
    return {key: value for key, value in usage.items() if isinstance(value, int)}


def usage_of_stream_tail(tail: bytes) -> dict[str, int] | None:
    """Usage from the last data event of a stream (present with stream_options.include_usage)."""
    start = tail.rfind(b"data: ", 0, len(tail) - 1)
    if start < 0:
        return None
    return usage_of(tail[start + len(b"data: ") :].strip())


def backend_error(status: int, body: bytes) -> BackendError:
    """Turn a backend's error response into OpenAI error terms, keeping its status and fields."""
    try:
        parsed = msgspec.json.decode(body, type=_ErrorBody)
    except msgspec.DecodeError:
        parsed = _ErrorBody()
    error = parsed.error or {}
    message = error.get("message") or parsed.message or (str(parsed.detail) if parsed.detail else None)
    return BackendError(
        message or f"the backend answered HTTP {status}: {body[:200].decode(errors='replace')}",
        status=status,
        error_type=error.get("type") or ("invalid_request_error" if status < 500 else "server_error"),
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

    async def serve(self, envelope: RequestEnvelope, attempt: str, replies: ReplySender) -> None:
        """Send exactly one final frame (`Final` or `ErrorReply`); raise `BackendUnreachable`
        instead if the backend could not be reached at all."""
        remaining = envelope.deadline - time.time()
        try:
            async with asyncio.timeout(remaining):
                await self._call_backend(envelope, attempt, replies)
        except TimeoutError:
            error = DeadlineExceeded(f"the request's deadline passed after {remaining:.0f} s")
            await replies.send(error_frame(envelope, attempt, error))
        except HotqError as error:
            await replies.send(error_frame(envelope, attempt, error))

    async def _call_backend(self, envelope: RequestEnvelope, attempt: str, replies: ReplySender) -> None:
        try:
            async with self._backend.post(envelope.endpoint, envelope.body) as response:
                if response.status >= 400:
                    raise backend_error(response.status, await response.read())
                if envelope.stream:
                    await self._relay_stream(envelope, attempt, response, replies)
                else:
                    body = await response.read()
                    await replies.send(Final(envelope.request_id, attempt, 0, response.status, body, usage_of(body)))
        except aiohttp.ClientConnectorError as exc:
            raise BackendUnreachable(str(exc)) from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            # Output may already have reached the client: report, do not retry.
            raise BackendError(f"the backend failed mid-answer: {exc!r}", status=502) from exc

    async def _relay_stream(
        self, envelope: RequestEnvelope, attempt: str, response: aiohttp.ClientResponse, replies: ReplySender
    ) -> None:
        pending = bytearray()
        tail = b""
        seq = 0
        last_flush = float("-inf")
        async for piece in response.content.iter_any():
            pending += piece
            now = time.monotonic()
            if now - last_flush < self._flush_interval_s:
                continue
            # [DONE] stays behind: the API writes it itself after the final frame.
            end = len(pending) - len(DONE_EVENT) if pending.endswith(DONE_EVENT) else len(pending)
            cut = pending.rfind(EVENT_END, 0, end)
            if cut < 0:
                continue
            batch = bytes(pending[: cut + len(EVENT_END)])
            del pending[: cut + len(EVENT_END)]
            await replies.send(ChunkBatch(envelope.request_id, attempt, seq, batch))
            tail = (tail + batch)[-_USAGE_TAIL_BYTES:]
            seq += 1
            last_flush = now
        rest = bytes(pending)
        if rest.endswith(DONE_EVENT):
            rest = rest[: -len(DONE_EVENT)]
        usage = usage_of_stream_tail((tail + rest)[-_USAGE_TAIL_BYTES:])
        await replies.send(Final(envelope.request_id, attempt, seq, response.status, rest, usage))
