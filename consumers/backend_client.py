"""The HTTP hop from a consumer to its model's OpenAI-compatible backend.

aiohttp rather than httpx: this hop is on every request's path and aiohttp's
client costs markedly less CPU per request (measured in bench/), which matters on
a node that also runs the model. One session with a keep-alive pool sized to the
consumer's concurrency.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from broker.messages import Endpoint


class BackendClient:
    def __init__(self, base_url: str, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Below vLLM's 5 s keep-alive, so we never reuse a connection the server is closing.
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=4)
            # No overall timeout: the request's own deadline bounds each call.
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=10),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    @asynccontextmanager
    async def post(self, endpoint: Endpoint, body: bytes) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST the client's body, byte for byte, to the backend's matching endpoint."""
        session = self._open_session()
        async with session.post(
            self.base_url + endpoint.path, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            yield response

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
