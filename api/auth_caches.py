"""The caches that keep authentication off the hot path: values with a lifetime, and shared lookups."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

MAX_CACHED = 100_000  # entries per cache before expired ones are swept out

T = TypeVar("T")
V = TypeVar("V")


class TTLCache(Generic[V]):
    """A dict of value and expiry (monotonic) that sweeps expired entries when it grows large."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[float, V]] = {}

    def get(self, key: str) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._data[key]
            return None
        return entry[1]

    def put(self, key: str, value: V, ttl_s: float) -> None:
        if len(self._data) >= MAX_CACHED:
            now = time.monotonic()
            self._data = {k: v for k, v in self._data.items() if v[0] > now}
            if len(self._data) >= MAX_CACHED:
                self._data.clear()
        self._data[key] = (time.monotonic() + ttl_s, value)


class SingleFlight:
    """Concurrent calls for one key share one execution."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(work())
            self._running[key] = running
            running.add_done_callback(lambda _f: self._running.pop(key, None))
        return await asyncio.shield(running)
