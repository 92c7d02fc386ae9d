"""A consumer's usage, summed per user, model, lane and day and reported about once a second.

Sums keep the traffic to a message a second whatever the request rate. A report
is sent with confirms and `mandatory` to the events exchange, where the durable
``hotq.usage`` queue keeps it for an API process to record. A report that could
not be sent (RabbitMQ away, or no API has declared the usage queue yet) is kept
and sent again under the same id, so the recorder, which skips ids it has seen,
counts it once. What a consumer served in the last second before it was killed
outright is lost; a graceful stop (drain, idle exit) sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import time

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange

from broker import messages, topology
from broker.messages import RequestEnvelope, UsageReport, UsageRow

log = structlog.get_logger("hotq.consumer")

REPORT_INTERVAL_S = 1.0
MAX_UNSENT = 10_000  # reports kept while none can be sent (hours of them); the oldest go first
_WARN_EVERY_S = 60.0

_Key = tuple[str, str, str, str]  # day, user, model, lane


class UsageReporter:
    def __init__(self, exchange: AbstractExchange, worker: str, interval_s: float = REPORT_INTERVAL_S) -> None:
        self._exchange = exchange
        self._worker = worker
        self._interval_s = interval_s
        self._sums: dict[_Key, list[int]] = {}  # requests, cancelled, prompt_tokens, completion_tokens
        self._unsent: list[UsageReport] = []  # taken from the sums, not yet confirmed
        self._task: asyncio.Task[None] | None = None
        self._last_warning = float("-inf")

    def record(self, envelope: RequestEnvelope, usage: dict[str, int] | None, cancelled: bool) -> None:
        """Count one request the consumer served (or began and the client cancelled)."""
        day = datetime.datetime.fromtimestamp(time.time(), datetime.UTC).strftime("%Y-%m-%d")
        key = (day, envelope.caller, envelope.model, envelope.lane.value)
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = [0, 0, 0, 0]
        sums[0] += 1
        sums[1] += int(cancelled)
        if usage:
            sums[2] += usage.get("prompt_tokens", 0)
            sums[3] += usage.get("completion_tokens", 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop reporting periodically and send what is left (once; it is lost if that fails)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._unsent:
            log.error("usage_reports_lost", reports=len(self._unsent))

    async def flush(self) -> None:
        """Send the sums so far, and any report not confirmed before."""
        if self._sums:
            rows = [list(UsageRow(*key, *sums)) for key, sums in self._sums.items()]
            self._unsent.append(UsageReport(os.urandom(12).hex(), self._worker, rows))
            self._sums = {}
            if len(self._unsent) > MAX_UNSENT:
                log.error("usage_reports_dropped", reports=len(self._unsent) - MAX_UNSENT)
                del self._unsent[:-MAX_UNSENT]
        while self._unsent:
            report = self._unsent[0]
            try:
                await self._exchange.publish(
                    aio_pika.Message(
                        messages.encode(report), delivery_mode=aio_pika.DeliveryMode.PERSISTENT, type="usage"
                    ),
                    routing_key=topology.USAGE_ROUTING_KEY,
                    mandatory=True,
                )
            except Exception as exc:  # noqa: BLE001 - kept and sent again, whatever went wrong
                self._warn(exc)
                return
            self._unsent.pop(0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:  # once a minute, not once a second
            self._last_warning = now
            log.warning("usage_report_not_sent", error=repr(exc), waiting=len(self._unsent))
