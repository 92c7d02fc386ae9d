"""The OpenAI-compatible endpoints: validate, enqueue, relay the answer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from api.auth import AccessPolicy
from api.bodies import read_body
from api.identity import identity_of
from api.interactive import Ask, InteractiveRequest
from api.limits import Limiter
from api.shared_limits import SharedLimiter
from broker.config import Config
from broker.errors import BrokerUnavailable, InvalidRequest, ModelNotFound
from broker.messages import Endpoint, ModelOutlook, ModelState
from broker.schemas import affinity_key, validate
from ops.metrics import ApiMetrics
from producers.placement import Placement
from producers.request_client import RequestClient

log = structlog.get_logger("hotq.api")

CLUSTER_HEADER = "X-Hotq-Cluster"  # pins a request to one cluster's agents


class Gateway:
    """Holds what the endpoints share: the config, the process's broker client and its metrics."""

    def __init__(self, config: Config, metrics: ApiMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.client: RequestClient | None = None
        self.policy: AccessPolicy | None = None  # per-model access lists, when [auth] is on
        # Per-user [limits] of interactive requests: in memory, or shared with the other API processes.
        self.limiter: Limiter | SharedLimiter = Limiter(config)
        self.outlook: Callable[[str], ModelOutlook | None] = lambda _model: None  # the scaler's word, if it speaks
        self.placement = Placement(config, lambda _model: [])  # app.py hands it the agents it hears
        self.started_at = int(time.time())
        self._background: set[asyncio.Task[Any]] = set()

    def connected_client(self) -> RequestClient:
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
        # 429 now if over a limit; nothing queued
        release = await self.limiter.admit(identity.user, parsed.model)
        request_id = os.urandom(16).hex()  # as unique as a uuid4, at a fraction of the cost
        # Hashed only where placement can use it; a pinned request waits in its cluster's queue.
        key = affinity_key(parsed) if self.config.models[parsed.model].affinity_on and not cluster else None
        ask = Ask(request_id, endpoint, parsed.model, body, parsed.stream, identity.user, cluster, release, key)
        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id, model=parsed.model):
                return await InteractiveRequest(self, ask).respond(request)
        except BaseException:
            if release is not None:
                release(None)  # idempotent: a no-op when the relay already counted the request out
            raise

    def _pinned_cluster(self, request: Request, model: str) -> str | None:
        """The cluster named by X-Hotq-Cluster, which must be one that serves the model."""
        cluster = request.headers.get(CLUSTER_HEADER)
        if cluster is None:
            return None
        allowed = self.config.clusters_of(model)
        if cluster not in allowed:
            known = ", ".join(allowed) or "none"
            shown = cluster if len(cluster) <= 64 else cluster[:64] + "..."  # never echo a huge header back whole
            raise InvalidRequest(
                f"cluster {shown!r} does not serve model {model!r} (clusters: {known})", param=CLUSTER_HEADER
            )
        return cluster

    def spawn(self, work: Any) -> None:
        """Run `work` in the background (a cancel sent after the request ended)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)  # keep a reference until it finishes
        task.add_done_callback(self._background.discard)


def _capacity(outlook: ModelOutlook | None, consumers: int | None) -> dict[str, object]:
    """/v1/models' view of a model's capacity: from the scaler's outlook, else from its consumers."""
    if outlook is None:
        state = None if consumers is None else ModelState.HOT if consumers else ModelState.COLD
        return {"state": state, "agents_starting": None, "expected_hot_s": None}
    expected = outlook.expected_hot_s if outlook.expected_hot_s >= 0 else None
    return {"state": outlook.state.value, "agents_starting": outlook.agents_starting, "expected_hot_s": expected}
