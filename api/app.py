"""The Starlette application: explicit wiring, no import-time state."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from api.auth import AuthMiddleware, build_auth
from api.batches import Batches, BatchManager
from api.errors import on_hotq_error, on_http_exception, on_unexpected
from api.files import Files
from api.ops_page import OpsMonitor
from api.process_header import ProcessHeader
from api.routes import Gateway
from api.shared_limits import SharedLimiter
from api.usage import Usage
from broker.config import Config
from broker.connection import connect_until_up
from broker.errors import BrokerUnavailable, HotqError
from broker.jobstore import AsyncJobStore, JobStore
from consumers.usage_recorder import UsageRecorder
from ops.metrics import ApiMetrics
from producers.placement import Placement
from producers.request_client import RequestClient

log = structlog.get_logger("hotq.api")

CLIENT_RETRY_S = 2.0  # while RabbitMQ refuses the request client (its queues are not declared yet)
USAGE_RETRY_S = 10.0
# The close at shutdown (after requests in flight had `[api] drain_grace_s`) gets this long; a step that
# hangs past it is named in the log and left, so that the process still exits.
SHUTDOWN_CLOSE_S = 10.0


def create_app(config: Config, shared: bool = False) -> Starlette:
    """The API; `shared`: one of several processes serving one port (`hotq serve --workers N`), which
    share the per-user limits (`api.shared_limits`) and name themselves in `X-Hotq-Process`."""
    metrics = ApiMetrics(CollectorRegistry())
    gateway = Gateway(config, metrics)
    if shared:
        gateway.limiter = SharedLimiter(config, Path(config.data_dir) / "limits.db")
    ops = OpsMonitor(config, metrics)
    store = AsyncJobStore(JobStore(config.data_dir))
    batch_manager = BatchManager(config, store)
    files = Files(config, store)
    batches = Batches(config, store, batch_manager)
    usage = Usage(store)
    auth = build_auth(config, store)
    gateway.policy = batches.policy = usage.policy = auth.policy
    gateway.outlook = ops.directory.outlook  # the scaler's capacity outlooks, heard by the ops sampler
    gateway.placement = batch_manager.placement = Placement(config, ops.directory.agents)  # heard likewise
    recorder = UsageRecorder(store)  # consumers' usage reports, into the job store

    connected: list[AbstractRobustConnection] = []  # the process's one connection, once up
    serving = asyncio.Event()  # the request client is open

    async def open_client(connection: AbstractRobustConnection) -> None:
        while True:
            try:
                gateway.client = await RequestClient.open(connection, list(config.models), config.pinned_clusters())
                break
            except BrokerUnavailable as exc:
                log.warning("request_client_refused_retrying", error=exc.message, retry_in_s=CLIENT_RETRY_S)
                await asyncio.sleep(CLIENT_RETRY_S)
        serving.set()
        log.info("broker_connected", models=len(config.models))
        while True:  # requests are served meanwhile; their usage waits in its queue
            try:
                await recorder.start(connection)
                return
            except Exception:
                log.exception("usage_recorder_failed_retrying", retry_in_s=USAGE_RETRY_S)
                await asyncio.sleep(USAGE_RETRY_S)

    async def run_on_broker() -> None:
        """Connect (waiting while RabbitMQ is down), then start everything that uses the connection."""
        connection = await connect_until_up(config, "api")
        connected.append(connection)
        await asyncio.gather(
            open_client(connection),
            batch_manager.start(connection),  # resumes unfinished batches
            ops.run(connection),  # samples until cancelled
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Serve (with 503s) even while RabbitMQ is down; connect as soon as it is up.
        on_broker = asyncio.create_task(run_on_broker())
        if auth.keys is not None:
            await auth.keys.refresh()  # every key works from the first request
        refreshing_keys = asyncio.create_task(auth.run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(serving.wait(), timeout=5)
        yield
        log.info("api_stopping")
        started = time.monotonic()
        on_broker.cancel()
        refreshing_keys.cancel()
        step = "the broker tasks"
        try:
            async with asyncio.timeout(SHUTDOWN_CLOSE_S):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await on_broker
                step = "the usage recorder"
                await recorder.close()
                step = "the batch runners"
                await batch_manager.close()
                store.close()
                gateway.limiter.close()
                step = "the request client"
                if gateway.client is not None:
                    await gateway.client.close()
                step = "the broker connection"
                for connection in connected:
                    await connection.close()
        except TimeoutError:
            log.error("api_close_timed_out", step=step, timeout_s=SHUTDOWN_CLOSE_S)
        log.info("api_stopped", close_s=round(time.monotonic() - started, 3))

    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/embeddings", gateway.embeddings, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/files", files.create, methods=["POST"]),
        Route("/v1/files", files.list, methods=["GET"]),
        Route("/v1/files/{file_id}", files.retrieve, methods=["GET"]),
        Route("/v1/files/{file_id}", files.delete, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", files.content, methods=["GET"]),
        Route("/v1/batches", batches.create, methods=["POST"]),
        Route("/v1/batches", batches.list, methods=["GET"]),
        Route("/v1/batches/{batch_id}", batches.retrieve, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", batches.cancel, methods=["POST"]),
        Route("/v1/usage", usage.list, methods=["GET"]),
        Route("/metrics", ops.prometheus, methods=["GET"]),
        Route("/ops", ops.page, methods=["GET"]),
        Route("/ops/data", ops.data, methods=["GET"]),
    ]
    middleware = [] if auth.authenticator is None else [Middleware(AuthMiddleware, authenticator=auth.authenticator)]
    if shared:
        middleware.insert(0, Middleware(ProcessHeader))  # outermost: every answer names its process
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={
            HotqError: on_hotq_error,
            HTTPException: on_http_exception,
            Exception: on_unexpected,
        },
    )
    # Starlette's trailing-slash redirect builds an absolute URL from the Host header (an open
    # redirect); /metrics/ is simply not a route.
    app.router.redirect_slashes = False
    app.state.gateway = gateway
    return app
