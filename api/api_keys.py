"""API keys (`hotq keys create`): every key not revoked held in memory by its hash, refreshed from
the job store every ``key_refresh_s`` so that revocations take effect."""

from __future__ import annotations

import asyncio
import time

import structlog

from api.auth_caches import TTLCache
from api.identity import Identity, domain_of
from broker.errors import AuthenticationError
from broker.jobstore import ApiKey, AsyncJobStore, hash_api_key

log = structlog.get_logger("hotq.auth")


class ApiKeyAuthenticator:
    """Keys from the job store, held in memory by hash: a known key costs one sha256 and a dict lookup."""

    def __init__(self, store: AsyncJobStore, refresh_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._keys: dict[str, tuple[Identity, float | None]] = {}  # hash -> identity, expires_at
        self._rejected: TTLCache[str] = (
            TTLCache()
        )  # hashes the store does not know (or revoked), until the next refresh

    async def refresh(self) -> None:
        keys = await self._store.run(lambda db: db.keys.list(include_revoked=False))
        self._keys = {key.key_hash: self._entry(key) for key in keys}

    async def run(self) -> None:
        """Reload the keys every `refresh_s`, so revocations by `hotq keys revoke` take effect."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a locked or vanished database must not end the refresher
                log.exception("api_key_refresh_failed")
            await asyncio.sleep(self._refresh_s)

    @staticmethod
    def _entry(key: ApiKey) -> tuple[Identity, float | None]:
        domain = domain_of(key.user)
        return Identity(user=key.user, method="api_key", domains=frozenset([domain] if domain else [])), key.expires_at

    async def authenticate(self, key: str) -> Identity:
        key_hash = hash_api_key(key)
        entry = self._keys.get(key_hash)
        if entry is None:
            entry = await self._lookup(key_hash)  # created since the last refresh, or unknown
        identity, expires_at = entry
        if expires_at is not None and expires_at <= time.time():
            raise AuthenticationError("the API key has expired")
        return identity

    async def _lookup(self, key_hash: str) -> tuple[Identity, float | None]:
        if (message := self._rejected.get(key_hash)) is not None:
            raise AuthenticationError(message)
        found = await self._store.run(lambda db: db.keys.find(key_hash))
        if found is None or found.revoked_at is not None:
            message = "the API key has been revoked" if found is not None else "the API key is not valid"
            self._rejected.put(key_hash, message, self._refresh_s)
            raise AuthenticationError(message)
        entry = self._entry(found)
        self._keys[key_hash] = entry
        return entry
