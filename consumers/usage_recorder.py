"""Takes consumers' usage reports off ``hotq.usage`` and adds them to the job store.

Runs in every API process; the API processes of one deployment share one
job store (one data_dir) and the queue, as competing consumers. A report is acked only after it is stored, and the store
skips a report id it has already added, so a report redelivered after a crash is
counted once.
"""

from __future__ import annotations

import asyncio

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from broker import messages, topology
from broker.errors import WireError
from broker.jobstore import AsyncJobStore
from broker.messages import UsageReport

log = structlog.get_logger("hotq.usage")

PREFETCH = 64
STORE_RETRY_S = 1.0  # before handing back a report the store could not take


class UsageRecorder:
    def __init__(self, store: AsyncJobStore) -> None:
        self._store = store
        self._channel: AbstractChannel | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=PREFETCH)
        queue = await topology.declare_usage_queue(self._channel)
        await queue.consume(self._on_report)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_report(self, message: AbstractIncomingMessage) -> None:
        try:
            report = messages.decode_as(message.body, UsageReport)
            rows = report.usage_rows()
        except WireError as exc:
            log.error("usage_report_undecodable", error=exc.message)
            await message.reject(requeue=False)  # to the dead-letter queue, for an operator
            return
        try:
            await self._store.run(lambda db: db.usage.record(report.report_id, rows))
        except Exception:
            log.exception("usage_report_not_stored", report_id=report.report_id)
            await asyncio.sleep(STORE_RETRY_S)
            await message.nack(requeue=True)
            return
        await message.ack()
