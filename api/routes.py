"""The OpenAI-compatible endpoints: validate, enqueue, relay the answer."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from typing import Any, cast

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from api.auth import AccessPolicy, identity_of
from api.disconnect import ClientDisconnected, unless_disconnected
from api.errors import error_response
from api.limits import Limiter
from api.relay import ReplyRelay
from api.schemas import validate
from api.sse import EventStreamResponse, keepalive_event
from broker.config import Config
from broker.errors import BrokerUnavailable, HotqError, InvalidRequest, ModelNotFound, PayloadTooLarge
from broker.messages import Endpoint, Final, Lane, ModelOutlook, ModelState, RequestEnvelope
from ops.metrics import ApiMetrics
from producers.request_client import RequestClient

log = structlog.get_logger("hotq.api")

CLUSTER_HEADER = "X-Hotq-Cluster"  # pins a request to one cluster's agents
QUEUE_WAIT_HEADER = "X-Hotq-Queue-Wait-Ms"  # how long the answer's request waited for a consumer
SCALER_GRACE_S = 30.0  # a scaler-run model's request waits this much more for a scaler that has not spoken yet


class Gateway:
    """Holds what the endpoints share: the config, the process's broker client and its metrics."""

    def __init__(self, config: Config, metrics: ApiMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.client: RequestClient | None = None
        self.policy: AccessPolicy | None = None  # per-model access lists, when [auth] is on
        self.limiter = Limiter(config)  # per-user [limits] of interactive requests
        self.outlook: Callable[[str], ModelOutlook | None] = lambda _model: None  # the scaler's word, if it speaks
        self.started_at = int(time.time())
        self._background: set[asyncio.Task[Any]] = set()

    def _client(self) -> RequestClient:
        if self.client is None:
            raise BrokerUnavailable("hotq is not connected to RabbitMQ yet", retry_after_s=2)
        return self.client

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.COMPLETIONS)

    async def embeddings(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.EMBEDDINGS)

    async def list_models(self, request: Request) -> Response:
        client = self.client
        names = list(self.config.models)
        if self.policy is not None:
            names = await self.policy.visible(identity_of(request), names)
        stats = await asyncio.gather(*(client.queue_stats(name) for name in names)) if client else [None] * len(names)
        data = []
        for name, stat in zip(names, stats):
            outlook = self.outlook(name)
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.started_at,
                    "owned_by": "hotq",
                    # Extension: what an operator or a patient client wants to know.
                    "hotq": {
                        "queue_depth": stat.messages if stat else None,
                        "consumers": stat.consumers if stat else None,
                        **_capacity(outlook, stat.consumers if stat else None),
                    },
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def _serve(self, request: Request, endpoint: Endpoint) -> Response:
        try:
            body = await read_body(request, self.config.max_body_bytes)
        except ClientDisconnect:  # left mid-upload: nothing was queued, nobody to answer
            log.info("client_disconnected_during_upload", path=request.url.path)
            return Response(status_code=499)
        parsed = validate(endpoint, body)
        if parsed.model not in self.config.models:
            raise ModelNotFound(f"The model `{parsed.model}` does not exist", param="model")
        identity = identity_of(request)  # authenticated by AuthMiddleware before the route ran
        if self.policy is not None:
            await self.policy.require(identity, parsed.model)
        cluster = self._pinned_cluster(request, parsed.model)
        release = self.limiter.admit(identity.user, parsed.model)  # 429 now if over a limit; nothing queued
        request_id = os.urandom(16).hex()  # as unique as a uuid4, at a fraction of the cost
        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id, model=parsed.model):
                return await self._relay(
                    request, endpoint, body, parsed.model, parsed.stream, request_id, cluster, identity.user, release
                )
        except BaseException:
            if release is not None:
                release(None)  # idempotent: a no-op when the relay already counted the request out
            raise

    def _pinned_cluster(self, request: Request, model: str) -> str | None:
        """The cluster named by X-Hotq-Cluster, which must be one that serves the model."""
        cluster = request.headers.get(CLUSTER_HEADER)
        if cluster is None:
            return None
        allowed = self.config.models[model].clusters or list(self.config.clusters)
        if cluster not in allowed:
            known = ", ".join(allowed) or "none"
            raise InvalidRequest(
                f"cluster {cluster!r} does not serve model {model!r} (clusters: {known})", param=CLUSTER_HEADER
            )
        return cluster

    async def _relay(
        self,
        request: Request,
        endpoint: Endpoint,
        body: bytes,
        model: str,
        stream: bool,
        request_id: str,
        cluster: str | None,
        caller: str,
        release: Callable[[dict[str, int] | None], None] | None = None,
    ) -> Response:
        config = self.config
        now = time.time()
        timeout = min(config.request_timeout_s, _client_timeout(request) or config.request_timeout_s)
        # Where a scaler starts the model's agents (it runs one's backend, or says it is coming), the
        # API decides when to give up (after a cold start, say): a consumer may start it until its deadline.
        model_config = config.models[model]
        scaled = model_config.backend_url is None or model_config.command is not None
        queue_wait_s = timeout if scaled or self.outlook(model) is not None else config.max_queue_wait_s
        envelope = RequestEnvelope(
            request_id=request_id,
            model=model,
            endpoint=endpoint,
            body=body,
            stream=stream,
            deadline=now + timeout,
            start_by=now + queue_wait_s,
            caller=caller,
            lane=Lane.INTERACTIVE,
            submitted_at=now,
        )
        headers = {"x-request-id": request_id}
        started = time.monotonic()
        outcome: dict[str, object] = {"status": 200}  # what the client got, for the request log
        client: RequestClient | None = None
        relay: ReplyRelay | None = None

        def finish(first_output_at: float | None = None, usage: dict[str, int] | None = None) -> None:
            if release is not None:
                release(usage)  # the request leaves the caller's limits, charged its tokens
            if client is not None:
                if relay is not None and not relay.finished:  # the client left or we gave up: stop the work
                    # Under limits, what the backend generated until the cut is charged once it is known.
                    charge = functools.partial(self.limiter.charge, caller, model) if release is not None else None
                    client.abandon(request_id, charge)
                    self._spawn(client.cancel(request_id))
                else:
                    client.release(request_id)
            ttft_s = None if first_output_at is None else first_output_at - started
            self.metrics.observe_request(
                model, endpoint.value, stream, cast(int, outcome["status"]), time.monotonic() - started, ttft_s, usage
            )
            log.info(
                "request_done",
                request_id=request_id,  # bound explicitly: a stream ends outside the request's context
                model=model,
                endpoint=endpoint.value,
                stream=stream,
                ms=round((time.monotonic() - started) * 1000, 2),
                **outcome,
            )

        streaming_response = False
        final: Final | None = None
        try:
            client = self._client()
            relay = ReplyRelay(
                await client.submit(envelope, cluster),
                envelope.deadline,
                config.max_queue_wait_s,
                functools.partial(self.outlook, model),
                SCALER_GRACE_S if scaled else 0.0,
                cluster,
            )
            if not stream:
                final = await unless_disconnected(request.receive, relay.final())
                outcome["status"] = final.status
                _add_queue_wait(headers, relay)
                return Response(final.body, status_code=final.status, headers=headers, media_type="application/json")
            # Wait briefly for the first output so early errors still get a real HTTP status.
            first = await unless_disconnected(request.receive, relay.next_output(config.keepalive_s))
            _add_queue_wait(headers, relay)  # known if a consumer took it before the stream's headers go
            streaming_response = True
            keepalive = keepalive_event(endpoint, model, request_id)
            return EventStreamResponse(relay, first, config.keepalive_s, keepalive, headers, on_done=finish)  # type: ignore[return-value]
        except ClientDisconnected:
            outcome.update(status=499, error="client_disconnected")
            return Response(status_code=499)
        except HotqError as error:
            outcome.update(status=error.status, error=error.code or error.error_type)
            response = error_response(error)
            response.headers.update(headers)
            return response
        finally:
            if final is not None:
                finish(time.monotonic(), final.usage)  # the whole answer is its first output
            elif not streaming_response:
                finish()

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)  # keep a reference until it finishes
        task.add_done_callback(self._background.discard)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it all when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _add_queue_wait(headers: dict[str, str], relay: ReplyRelay) -> None:
    if relay.queue_wait_s is not None:
        headers[QUEUE_WAIT_HEADER] = str(round(relay.queue_wait_s * 1000))


def _capacity(outlook: ModelOutlook | None, consumers: int | None) -> dict[str, object]:
    """/v1/models' view of a model's capacity: from the scaler's outlook, else from its consumers."""
    if outlook is None:
        state = None if consumers is None else ModelState.HOT if consumers else ModelState.COLD
        return {"state": state, "agents_starting": None, "expected_hot_s": None}
    expected = outlook.expected_hot_s if outlook.expected_hot_s >= 0 else None
    return {"state": outlook.state.value, "agents_starting": outlook.agents_starting, "expected_hot_s": expected}


def _client_timeout(request: Request) -> float | None:
    """The openai client announces its read timeout; no point computing past it."""
    value = request.headers.get("x-stainless-read-timeout")
    try:
        return float(value) if value else None
    except ValueError:
        return None
