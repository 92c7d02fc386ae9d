"""A scaler running in the test's own event loop, with the launchers the test chose."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from broker.config import Config
from broker.connection import connect
from hpc_agents.directory import AgentDirectory
from hpc_agents.launchers import Launcher
from hpc_agents.scaler import Scaler


@contextlib.asynccontextmanager
async def running_scaler(
    config: Config, launchers: dict[str, Launcher], amqp_url: str, tick_s: float = 0.25
) -> AsyncIterator[Scaler]:
    """The scaler ticking until the block ends; then its launchers shut down (their agents drain)."""
    connection = await connect(amqp_url, "test-scaler")
    try:
        directory = AgentDirectory(config.heartbeat_s)
        await directory.subscribe(connection)
        scaler = Scaler(config, launchers, directory, tick_s=tick_s)
        stop = asyncio.Event()
        ticking = asyncio.create_task(scaler.run(await connection.channel(), stop))
        try:
            yield scaler
        finally:
            stop.set()
            await ticking
            for launcher in launchers.values():
                await asyncio.to_thread(launcher.shutdown)
    finally:
        await connection.close()
