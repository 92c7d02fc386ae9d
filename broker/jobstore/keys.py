"""API keys: only a sha256 of each key is kept (keys are high-entropy, so a plain hash suffices)."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import sqlite_utils

from broker.jobstore.database import new_id, row_as

API_KEY_PREFIX = "hotq_"  # tells an API key from a Globus token at a glance
# Every caller's name when authentication is off; no key may carry it (its files and batches,
# made with authentication off, would become that key user's).
ANONYMOUS_USER = "anonymous"


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    user: str
    key_hash: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db

    def create(self, user: str, expires_at: float | None = None) -> tuple[ApiKey, str]:
        """A new key for `user`: its record and the key itself (the only time it exists in clear)."""
        if user == ANONYMOUS_USER:
            raise ValueError(f"{ANONYMOUS_USER!r} is reserved for callers without authentication")
        if not user or user != user.strip() or not user.isprintable():
            raise ValueError(f"{user!r} is not a user name: it must be non-empty, printable, without outer spaces")
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(new_id("key_"), user, hash_api_key(key), time.time(), expires_at, None)
        self._db.execute(
            "INSERT INTO api_keys (id, user, key_hash, created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?)",
            [record.id, record.user, record.key_hash, record.created_at, record.expires_at, record.revoked_at],
        )
        return record, key

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        return [row_as(ApiKey, row) for row in self._db.query(f"SELECT * FROM api_keys{where} ORDER BY created_at")]

    def find(self, key_hash: str) -> ApiKey | None:
        rows = list(self._db.query("SELECT * FROM api_keys WHERE key_hash = ?", [key_hash]))
        return row_as(ApiKey, rows[0]) if rows else None

    def revoke(self, key_or_id: str) -> ApiKey | None:
        """Revoke a key named by its id or by the key itself; None if there is no such key."""
        by_key = key_or_id.startswith(API_KEY_PREFIX)
        column, value = ("key_hash", hash_api_key(key_or_id)) if by_key else ("id", key_or_id)
        self._db.execute(
            f"UPDATE api_keys SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL", [time.time(), value]
        )
        rows = list(self._db.query(f"SELECT * FROM api_keys WHERE {column} = ?", [value]))
        return row_as(ApiKey, rows[0]) if rows else None
