"""Noticing that the HTTP client went away, so its request can be cancelled at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports that the client closed the connection.

    Call only once the request body has been read: afterwards `receive` yields
    nothing but the disconnect.
    """
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, or raise `ClientDisconnected` (cancelling it) if the client leaves first."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((work_task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelled here too if our own caller is cancelled.
        if not work_task.done():
            work_task.cancel()
        watcher.cancel()
    if work_task.cancelled() or not work_task.done():
        await asyncio.gather(work_task, return_exceptions=True)
        raise ClientDisconnected()
    return work_task.result()
