"""The Starlette application: explicit wiring, no import-time state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from api.errors import on_hotq_error, on_http_exception, on_unexpected
from api.routes import Gateway
from broker.config import Config
from broker.errors import BrokerUnavailable, HotqError
from producers.request_client import RequestClient

log = structlog.get_logger("hotq.api")

BROKER_RETRY_S = 2.0


def create_app(config: Config) -> Starlette:
    gateway = Gateway(config)

    async def connect_until_up() -> None:
        while True:
            try:
                gateway.client = await RequestClient.open(config.amqp_url, list(config.models))
                log.info("broker_connected", models=len(config.models))
                return
            except BrokerUnavailable as exc:
                log.warning("broker_unreachable_retrying", error=exc.message, retry_in_s=BROKER_RETRY_S)
                await asyncio.sleep(BROKER_RETRY_S)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Serve (with 503s) even while RabbitMQ is down; connect as soon as it is up.
        connecting = asyncio.create_task(connect_until_up())
        try:
            await asyncio.wait_for(asyncio.shield(connecting), timeout=5)
        except TimeoutError:
            pass
        yield
        connecting.cancel()
        if gateway.client is not None:
            await gateway.client.close()

    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/embeddings", gateway.embeddings, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HotqError: on_hotq_error,
            HTTPException: on_http_exception,
            Exception: on_unexpected,
        },
    )
    app.state.gateway = gateway
    return app
