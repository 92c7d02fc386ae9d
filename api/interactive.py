"""One interactive request, from its envelope to its line in the request log.

`InteractiveRequest.respond` reads in the order things happen: the request is queued
as an envelope, its answer is relayed (whole, or as a stream), and it is finished
exactly once, whichever way it ends (answered, failed, its client gone, or its
stream over): its limits are released with the tokens it used, its work is stopped
at the consumer if nobody waits for it any more, and its metrics and log line are
written.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from starlette.requests import Request
from starlette.responses import Response

from api.disconnect import ClientDisconnected, unless_disconnected
from api.errors import error_response
from api.migration import StreamMigration
from api.relay import ReplyRelay
from api.sse import EventStreamResponse, keepalive_event
from broker.errors import HotqError
from broker.messages import Endpoint, Lane, RequestEnvelope
from producers.placement import Placed
from producers.request_client import RequestClient

if TYPE_CHECKING:
    from api.routes import Gateway

log = structlog.get_logger("hotq.api")

QUEUE_WAIT_HEADER = "X-Hotq-Queue-Wait-Ms"  # how long the answer's request waited for a consumer
SCALER_GRACE_S = 30.0  # a scaler-run model's request waits this much more for a scaler that has not spoken yet


@dataclass(frozen=True, slots=True)
class Ask:
    """What the caller asked, once validated and admitted."""

    request_id: str
    endpoint: Endpoint
    model: str
    body: bytes
    stream: bool
    caller: str
    cluster: str | None  # pinned by X-Hotq-Cluster
    release: Callable[[dict[str, int] | None], None] | None  # counts it out of the caller's [limits]
    affinity_key: bytes | None = None  # requests sharing it go to the same agent (broker.affinity)


class InteractiveRequest:
    def __init__(self, gateway: Gateway, ask: Ask) -> None:
        self._gateway = gateway
        self.ask = ask
        self._started = time.monotonic()
        self._client: RequestClient | None = None
        self._relay: ReplyRelay | None = None
        self._status = 200  # what the client got, for the metrics and the request log
        self._error: str | None = None
        self._headers = {"x-request-id": ask.request_id}
        self._finished = False
        self._placed: Placed | None = None  # the agent it was placed on, whose load it counts in

    async def respond(self, request: Request) -> Response:
        streaming = False
        try:
            self._client = self._gateway.connected_client()
            self._relay = await self._submit(self._client, request)
            if not self.ask.stream:
                return await self._whole_answer(request, self._relay)
            response = await self._stream(request, self._relay)
            streaming = True  # from here the stream finishes it, when it ends
            return response
        except ClientDisconnected:
            self._status, self._error = 499, "client_disconnected"
            return Response(status_code=499)
        except asyncio.CancelledError:
            # The server gave up on it: still running when its `[api] drain_grace_s` at shutdown ended.
            # uvicorn answers 500; the log and metrics say so, not the 200 it started as.
            self._status, self._error = 500, "cancelled_at_shutdown"
            raise
        except HotqError as error:
            self._status, self._error = error.status, error.code or error.error_type
            response = error_response(error)
            response.headers.update(self._headers)
            return response
        finally:
            if not streaming:
                self.finish()

    async def _submit(self, client: RequestClient, request: Request) -> ReplyRelay:
        config = self._gateway.config
        now = time.time()
        timeout = min(config.request_timeout_s, _client_timeout(request) or config.request_timeout_s)
        # Where a scaler starts the model's agents (it runs one's backend, or says it is coming), the
        # API decides when to give up (after a cold start, say): a consumer may start it until its deadline.
        model_config = config.models[self.ask.model]
        scaled = model_config.backend_url is None or model_config.command is not None
        outlook = functools.partial(self._gateway.outlook, self.ask.model)
        queue_wait_s = timeout if scaled or outlook() is not None else config.max_queue_wait_s
        envelope = RequestEnvelope(
            request_id=self.ask.request_id,
            model=self.ask.model,
            endpoint=self.ask.endpoint,
            body=self.ask.body,
            stream=self.ask.stream,
            deadline=now + timeout,
            start_by=now + queue_wait_s,
            caller=self.ask.caller,
            lane=Lane.INTERACTIVE,
            submitted_at=now,
        )
        placed = self._placed = self._gateway.placement.place(
            self.ask.model, Lane.INTERACTIVE, self.ask.affinity_key, counted=True
        )
        self._gateway.metrics.count_placement(self.ask.model, Lane.INTERACTIVE.value, placed is not None)
        replies = await client.submit(envelope, self.ask.cluster, placed)
        return ReplyRelay(
            replies,
            envelope.deadline,
            config.max_queue_wait_s,
            outlook,
            SCALER_GRACE_S if scaled else 0.0,
            self.ask.cluster,
            StreamMigration(self.ask.model, config.max_migrations, self._gateway.metrics, self.ask.body),
            lambda record: self._gateway.spawn(client.control(record)),
        )

    async def _whole_answer(self, request: Request, relay: ReplyRelay) -> Response:
        final = await unless_disconnected(request.receive, relay.final())
        self._status = final.status
        self._add_queue_wait(relay)
        self.finish(time.monotonic(), final.usage)  # the whole answer is its first output
        return Response(final.body, status_code=final.status, headers=self._headers, media_type="application/json")

    async def _stream(self, request: Request, relay: ReplyRelay) -> Response:
        keepalive_s = self._gateway.config.keepalive_s
        # Wait briefly for the first output so early errors still get a real HTTP status.
        first = await unless_disconnected(request.receive, relay.next_output(keepalive_s))
        self._add_queue_wait(relay)  # known if a consumer took it before the stream's headers go
        keepalive = keepalive_event(self.ask.endpoint, self.ask.model, self.ask.request_id)
        return EventStreamResponse(relay, first, keepalive_s, keepalive, self._headers, on_done=self.finish)  # type: ignore[return-value]

    def _add_queue_wait(self, relay: ReplyRelay) -> None:
        if relay.queue_wait_s is not None:
            self._headers[QUEUE_WAIT_HEADER] = str(round(relay.queue_wait_s * 1000))

    def finish(self, first_output_at: float | None = None, usage: dict[str, int] | None = None) -> None:
        """Release, stop or let go of the work, and record the request (once)."""
        if self._finished:
            return
        self._finished = True
        ask, gateway = self.ask, self._gateway
        if self._placed is not None:
            gateway.placement.finished(self._placed)
        if ask.release is not None:
            ask.release(usage)  # the request leaves the caller's limits, charged its tokens
        if self._client is not None:
            if self._relay is not None and not self._relay.finished:  # the client left or we gave up
                # Under limits, what the backend generated until the cut is charged once it is known.
                charge = functools.partial(gateway.limiter.charge, ask.caller, ask.model) if ask.release else None
                self._client.abandon(ask.request_id, charge)
                gateway.spawn(self._client.cancel(ask.request_id))
            else:
                self._client.release(ask.request_id)
        elapsed_s = time.monotonic() - self._started
        ttft_s = None if first_output_at is None else first_output_at - self._started
        gateway.metrics.observe_request(
            ask.model, ask.endpoint.value, ask.stream, self._status, elapsed_s, ttft_s, usage
        )
        outcome: dict[str, object] = {"status": self._status}
        if self._error is not None:
            outcome["error"] = self._error
        log.info(
            "request_done",
            request_id=ask.request_id,  # bound explicitly: a stream ends outside the request's context
            model=ask.model,
            endpoint=ask.endpoint.value,
            stream=ask.stream,
            ms=round(elapsed_s * 1000, 2),
            **outcome,
        )


def _client_timeout(request: Request) -> float | None:
    """The openai client announces its read timeout; no point computing past it."""
    value = request.headers.get("x-stainless-read-timeout")
    try:
        return float(value) if value else None
    except ValueError:
        return None
