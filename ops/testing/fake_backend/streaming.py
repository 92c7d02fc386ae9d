"""Streamed answers: SSE chunks, token by token, with the knobs that cut or pause them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ops.testing.fake_backend.behaviour import JsonObj, usage_of
from ops.testing.fake_backend.knobs import released
from ops.testing.fake_backend.parsing import Common
from ops.testing.fake_backend.stats import Call


class Answer:
    """What every object of one answer shares: an id, a creation time, the model; and in a stream
    that asked for usage, ``"usage": null`` in each chunk before the usage-only one."""

    def __init__(self, id_prefix: str, common: Common) -> None:
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


def sse(obj: JsonObj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class TrackedStream(StreamingResponse):
    """Ends the call as cancelled if the body generator never got to run its own cleanup."""

    def __init__(self, content: AsyncIterator[bytes], call: Call) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A disconnect before the generator's first step cancels it un-started, so its
            # finally never runs; no-op when the generator already ended the call.
            self._call.end(cancelled=True)


TokenChunk = Callable[[int, str, bool], JsonObj]


class BrokenOnPurpose(ConnectionAbortedError):
    """``fake_break_after``: the connection drops mid-answer."""


def stream_response(
    request: Request,
    common: Common,
    call: Call,
    head: list[JsonObj],
    per_token: TokenChunk,
    tokens: list[str],
    final_usage_chunk: JsonObj,
) -> StreamingResponse:
    prompt_tokens = final_usage_chunk["usage"]["prompt_tokens"]

    def counted(chunk: JsonObj, completion_tokens: int) -> JsonObj:
        if common.continuous_usage:
            chunk["usage"] = usage_of(prompt_tokens, completion_tokens)
        return chunk

    async def events() -> AsyncIterator[bytes]:
        done = False
        try:
            if not await released(request, common):
                return
            for chunk in head:
                yield sse(counted(chunk, 0))
            last = len(tokens) - 1
            for pos, token in enumerate(tokens):
                if common.break_after is not None and pos >= common.break_after:
                    raise BrokenOnPurpose(f"fake_break_after {common.break_after}")
                if common.delay_s > 0:
                    await asyncio.sleep(common.delay_s)
                    # Only slow streams poll: fast ones are short and the ASGI
                    # disconnect listener cancels us (CancelledError) anyway.
                    if await request.is_disconnected():
                        return
                for index in range(common.n):
                    yield sse(counted(per_token(index, token, pos == last), pos + 1))
                call.tokens_sent = pos + 1
                if pos == 0 and common.pause_file and not await released(request, common, common.pause_file):
                    return
            if common.include_usage:
                yield sse(final_usage_chunk)
            yield b"data: [DONE]\n\n"
            done = True
        finally:
            # Any exit before [DONE] was sent (CancelledError from the disconnect
            # listener, GeneratorExit, OSError, polled disconnect) counts as a cancel.
            call.end(cancelled=not done)

    return TrackedStream(events(), call)
