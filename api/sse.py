"""The Server-Sent Events response of a streaming request.

Written as a plain ASGI response rather than Starlette's StreamingResponse so
that a client disconnect is noticed while the stream is idle too (waiting in
the queue, or between tokens), and the consumer is told to stop at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from api.disconnect import wait_for_disconnect
from api.errors import error_event
from api.relay import ReplyRelay
from broker.errors import HotqError
from broker.messages import DONE_EVENT, Endpoint, Final

_OBJECT = {Endpoint.CHAT: "chat.completion.chunk", Endpoint.COMPLETIONS: "text_completion"}


def keepalive_event(endpoint: Endpoint, model: str, request_id: str) -> bytes:
    """What keeps a waiting stream alive: a chunk with no choices, the shape of OpenAI's own usage
    chunk, which every OpenAI client skips. (An SSE comment is lost on parsers that strip each
    network read and concatenate, as vLLM's benchmark client does: nothing parses after it.)"""
    chunk = {"id": f"hotq-{request_id}", "object": _OBJECT[endpoint], "created": int(time.time()), "model": model}
    return b"data: " + json.dumps({**chunk, "choices": []}, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse:
    def __init__(
        self,
        relay: ReplyRelay,
        first: bytes | Final | None,
        keepalive_s: float,
        keepalive: bytes,
        headers: dict[str, str],
        on_done: Callable[[float | None, dict[str, int] | None], None],
    ) -> None:
        """`on_done` gets when the first output bytes went out (monotonic; None if none did)
        and the usage the answer's `Final` frame carried."""
        self._relay = relay
        self._first = first
        self._keepalive_s = keepalive_s
        self._keepalive = keepalive
        self._headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self._on_done = on_done
        self._first_output_at: float | None = None
        self._usage: dict[str, int] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pump.cancel()
            watcher.cancel()
            self._on_done(self._first_output_at, self._usage)
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            exc = pump.exception()
            if not isinstance(exc, OSError):  # a write to a closed socket is a disconnect too
                raise exc  # type: ignore[misc]

    async def _pump(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),  # tell reverse proxies not to buffer the stream
                    *self._headers,
                ],
            }
        )
        output = self._first
        try:
            while True:
                if output is None:
                    await send({"type": "http.response.body", "body": self._keepalive, "more_body": True})
                elif isinstance(output, Final):
                    self._usage = output.usage
                    await send({"type": "http.response.body", "body": output.body + DONE_EVENT, "more_body": False})
                    if self._first_output_at is None:
                        self._first_output_at = time.monotonic()
                    return
                else:
                    await send({"type": "http.response.body", "body": output, "more_body": True})
                    if self._first_output_at is None:
                        self._first_output_at = time.monotonic()
                output = await self._relay.next_output(self._keepalive_s)
        except HotqError as error:
            await send({"type": "http.response.body", "body": error_event(error), "more_body": False})
