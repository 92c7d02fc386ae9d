"""A consumer's usage, summed per user, model, lane and day and reported about once a second.

Sums keep the traffic to a message a second whatever the request rate. A report
is sent with confirms and `mandatory` to the events exchange, where the durable
``hotq.usage`` queue keeps it for an API process to record. A report that could
not be sent (RabbitMQ away, the usage queue missing) is sent again under the same
id, so the recorder, which skips ids it has seen, counts it once; what is served
meanwhile goes on adding to the sums, which become the next report. So a consumer
keeps at most one report and one set of sums however long RabbitMQ is away. A
consumer killed outright loses what it had not sent; a graceful stop (drain, idle
exit) sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import time

import aio_pika
import structlog

from broker import messages, topology
from broker.messages import RequestEnvelope, UsageReport, UsageRow
from broker.publisher import ConfirmingPublisher

log = structlog.get_logger("hotq.consumer")

REPORT_INTERVAL_S = 1.0
_WARN_EVERY_S = 60.0

_Key = tuple[str, str, str, str]  # day, user, model, lane


class UsageReporter:
    def __init__(self, exchange: ConfirmingPublisher, worker: str, interval_s: float = REPORT_INTERVAL_S) -> None:
        self._exchange = exchange
        self._worker = worker
        self._interval_s = interval_s
        self._sums: dict[_Key, list[int]] = {}  # requests, cancelled, prompt_tokens, completion_tokens
        self._unsent: UsageReport | None = None  # taken from the sums, not yet confirmed
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_warning = float("-inf")
        self._day = ""  # today (UTC), worked out again only after midnight: record() is per request
        self._day_ends_at = 0.0

    def record(self, envelope: RequestEnvelope, usage: dict[str, int] | None, cancelled: bool) -> None:
        """Count one request the backend worked on (answered, failed, or cancelled by its client)."""
        if self._closed:
            log.error("usage_after_close", request_id=envelope.request_id)  # a bug: the worker stopped first
        key = (self._today(), envelope.caller, envelope.model, envelope.lane.value)
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = [0, 0, 0, 0]
        sums[0] += 1
        sums[1] += int(cancelled)
        if usage:
            sums[2] += usage.get("prompt_tokens", 0)
            sums[3] += usage.get("completion_tokens", 0)

    def _today(self) -> str:
        now = time.time()
        if now >= self._day_ends_at:
            today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
            self._day = today.isoformat()
            midnight = datetime.datetime.combine(today + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
            self._day_ends_at = midnight.timestamp()
        return self._day

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop reporting periodically and send what is left (once more; lost if that fails too)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._unsent is not None or self._sums:
            log.error("usage_lost_at_stop", report=self._unsent is not None, more_rows=len(self._sums))

    async def flush(self) -> None:
        """Send the report not confirmed before, if any, then the sums so far."""
        while True:
            if self._unsent is None:
                if not self._sums:
                    return
                rows = [list(UsageRow(*key, *sums)) for key, sums in self._sums.items()]
                self._unsent = UsageReport(os.urandom(12).hex(), self._worker, rows)
                self._sums = {}
            try:
                await self._exchange.publish(
                    aio_pika.Message(
                        messages.encode(self._unsent), delivery_mode=aio_pika.DeliveryMode.PERSISTENT, type="usage"
                    ),
                    routing_key=topology.USAGE_ROUTING_KEY,
                    mandatory=True,
                )
            except Exception as exc:  # noqa: BLE001 - sent again, under the same id, whatever went wrong
                self._warn(exc)
                return
            self._unsent = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:  # once a minute, not once a second
            self._last_warning = now
            log.warning("usage_report_not_sent", error=repr(exc), pending_rows=len(self._sums))
