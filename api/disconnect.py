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
    """Await `work`, or raise `ClientDisconnected` (cancelling it) if the client leaves first.

    The work runs in the caller's task; only the watcher is a task of its own.
    """
    current = asyncio.current_task()
    assert current is not None
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    disconnected = False

    def on_disconnect(finished: asyncio.Future[None]) -> None:
        nonlocal disconnected
        if not finished.cancelled():
            disconnected = True
            current.cancel()

    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if disconnected:
            current.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.remove_done_callback(on_disconnect)
        watcher.cancel()
