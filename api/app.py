"""The Starlette application: explicit wiring, no import-time state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
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
from api.routes import Gateway
from api.usage import Usage
from broker.config import Config
from broker.errors import BrokerUnavailable, HotqError
from broker.jobstore import AsyncJobStore, JobStore
from consumers.usage_recorder import UsageRecorder
from ops.metrics import ApiMetrics
from producers.request_client import RequestClient

log = structlog.get_logger("hotq.api")

BROKER_RETRY_S = 2.0
USAGE_RETRY_S = 10.0


def create_app(config: Config) -> Starlette:
    metrics = ApiMetrics(CollectorRegistry())
    gateway = Gateway(config, metrics)
    ops = OpsMonitor(config, metrics)
    store = AsyncJobStore(JobStore(config.data_dir))
    batch_manager = BatchManager(config, store)
    files = Files(store)
    batches = Batches(config, store, batch_manager)
    usage = Usage(store)
    auth = build_auth(config, store)
    gateway.policy = batches.policy = usage.policy = auth.policy
    gateway.outlook = ops.directory.outlook  # the scaler's capacity outlooks, heard by the ops sampler
    recorder = UsageRecorder(store)  # consumers' usage reports, into the job store

    async def connect_until_up() -> None:
        while True:
            try:
                pinned = {name: model.clusters or list(config.clusters) for name, model in config.models.items()}
                client = await RequestClient.open(config.amqp_url, list(config.models), pinned, config.amqp_tls)
                break
            except BrokerUnavailable as exc:
                log.warning("broker_unreachable_retrying", error=exc.message, retry_in_s=BROKER_RETRY_S)
                await asyncio.sleep(BROKER_RETRY_S)
        gateway.client = client
        log.info("broker_connected", models=len(config.models))
        while True:  # requests are served meanwhile; their usage waits in its queue
            try:
                await recorder.start(client.connection)
                return
            except Exception:
                log.exception("usage_recorder_failed_retrying", retry_in_s=USAGE_RETRY_S)
                await asyncio.sleep(USAGE_RETRY_S)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Serve (with 503s) even while RabbitMQ is down; connect as soon as it is up.
        connecting = asyncio.create_task(connect_until_up())
        sampling = asyncio.create_task(ops.run())
        running_batches = asyncio.create_task(batch_manager.start())  # resumes unfinished batches
        if auth.keys is not None:
            await auth.keys.refresh()  # every key works from the first request
        refreshing_keys = asyncio.create_task(auth.run())
        try:
            await asyncio.wait_for(asyncio.shield(connecting), timeout=5)
        except TimeoutError:
            pass
        yield
        connecting.cancel()
        sampling.cancel()
        running_batches.cancel()
        refreshing_keys.cancel()
        await recorder.close()
        await batch_manager.close()
        store.close()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling  # closes the sampler's connection
        if gateway.client is not None:
            await gateway.client.close()

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
    app.state.gateway = gateway
    return app
