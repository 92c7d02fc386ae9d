"""Running a consumer alone, as a process: `hotq consumer --model NAME` (beside a backend already running)."""

from __future__ import annotations

import asyncio
import signal

import structlog

from broker.config import Config
from broker.connection import connect_with
from broker.messages import Lane
from consumers.backend_client import BackendClient
from consumers.consumer import Consumer
from consumers.handler import RequestHandler

log = structlog.get_logger("hotq.consumer")


async def run_worker(config: Config, model: str, backend_url: str, grace_s: float) -> None:
    """Serve until SIGTERM or SIGINT, then drain (finish in-flight, requeue the rest)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    model_config = config.model(model)
    connection = await connect_with(config, f"worker:{model}")
    backend = BackendClient(backend_url, max_connections=model_config.max_inflight)
    consumer = Consumer(
        connection,
        model,
        RequestHandler(backend, flush_interval_s=config.stream_flush_ms / 1000),
        max_inflight=model_config.max_inflight,
        reserved_interactive=model_config.reserved_interactive,
        lanes=tuple(Lane),
    )
    try:
        await consumer.start()
        await stop.wait()
        log.info("worker_stop_requested")
        await consumer.stop(grace_s)
    finally:
        await backend.close()
        await connection.close()
