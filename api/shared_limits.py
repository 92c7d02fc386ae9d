"""Per-user limits shared by several API processes on one host (`hotq serve --workers N`).

The same counters and rules as `api.limits` (whose `UserState` decides), kept in a small SQLite
database of their own, ``<data_dir>/limits.db``, instead of process memory: each admission is one
short IMMEDIATE transaction (read the user's buckets and in-flight count, decide, write back), so
the processes never both spend the last token. Its own file and its own thread keep it off the job
store's lock. The buckets are refilled by the wall clock, which every process reads alike. Requests
in flight are counted per process, so those of a process that died are dropped when another starts
(the supervisor replaces it) instead of holding the user's concurrency cap for ever. The file holds
nothing worth keeping: no fsync (synchronous OFF).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from api.limits import Limiter, UserState
from broker.config import Config, LimitsConfig
from ops.processes import pid_alive

log = structlog.get_logger("hotq.api")

Usage = dict[str, int] | None


class SharedLimiter:
    """`Limiter`'s interface for an event loop: `admit` is awaited; counting out and charging are sent
    to the database's thread and not waited for."""

    def __init__(self, config: Config, path: Path) -> None:
        self._rules = Limiter(config)  # the per-model limits
        self._pid = os.getpid()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="limits")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 30000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS buckets (user TEXT NOT NULL, model TEXT NOT NULL, requests REAL NOT NULL,"
            " tokens REAL NOT NULL, updated REAL NOT NULL, PRIMARY KEY (user, model)) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS inflight (user TEXT NOT NULL, model TEXT NOT NULL, pid INTEGER NOT NULL,"
            " n INTEGER NOT NULL, PRIMARY KEY (user, model, pid)) WITHOUT ROWID"
        )
        self._forget_dead_processes()

    def limits(self, model: str) -> LimitsConfig | None:
        return self._rules.limits(model)

    async def admit(self, user: str, model: str) -> Callable[[Usage], None] | None:
        """Count a request in, or raise RateLimited; returns the callback that counts it out (once)."""
        limits = self.limits(model)
        if limits is None:
            return None
        await asyncio.get_running_loop().run_in_executor(self._executor, self._take, user, model, limits)
        done = False

        def release(usage: Usage) -> None:
            nonlocal done
            if not done:
                done = True
                self._executor.submit(self._logged, self._release, user, model, limits, usage)

        return release

    def charge(self, user: str, model: str, usage: Usage) -> None:
        """Charge tokens reported after the request left the user's limits (see `Limiter.charge`)."""
        limits = self.limits(model)
        if usage and limits is not None and limits.tokens_per_minute:
            self._executor.submit(self._logged, self._charge, user, model, limits, usage, False)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._db.close()

    def _take(self, user: str, model: str, limits: LimitsConfig) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            state = self._load(user, model, limits)
            (inflight,) = self._db.execute(
                "SELECT coalesce(sum(n), 0) FROM inflight WHERE user = ? AND model = ?", [user, model]
            ).fetchone()
            state.inflight = int(inflight)
            state.take(limits, user, model)  # raises RateLimited: the transaction rolls back
            self._store(user, model, state)
            self._db.execute(
                "INSERT INTO inflight (user, model, pid, n) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (user, model, pid) DO UPDATE SET n = n + 1",
                [user, model, self._pid],
            )

    def _release(self, user: str, model: str, limits: LimitsConfig, usage: Usage) -> None:
        self._charge(user, model, limits, usage, True)

    def _charge(self, user: str, model: str, limits: LimitsConfig, usage: Usage, count_out: bool) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if count_out:
                self._db.execute(
                    "UPDATE inflight SET n = n - 1 WHERE user = ? AND model = ? AND pid = ?", [user, model, self._pid]
                )
            if usage and limits.tokens_per_minute:
                state = self._load(user, model, limits)
                state.charge(limits, usage)
                self._store(user, model, state)

    def _load(self, user: str, model: str, limits: LimitsConfig) -> UserState:
        now = time.time()
        state = UserState(limits, now)
        row = self._db.execute(
            "SELECT requests, tokens, updated FROM buckets WHERE user = ? AND model = ?", [user, model]
        ).fetchone()
        if row is not None:
            state.requests, state.tokens, state.updated = row
            state.refill(limits, now)
        return state

    def _store(self, user: str, model: str, state: UserState) -> None:
        self._db.execute(
            "INSERT INTO buckets (user, model, requests, tokens, updated) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (user, model) DO UPDATE SET requests = excluded.requests, tokens = excluded.tokens,"
            " updated = excluded.updated",
            [user, model, state.requests, state.tokens, state.updated],
        )

    def _forget_dead_processes(self) -> None:
        """Drop the in-flight counts of processes that are gone (this pid's are a predecessor's)."""
        pids = [pid for (pid,) in self._db.execute("SELECT DISTINCT pid FROM inflight").fetchall()]
        gone = [pid for pid in pids if pid == self._pid or not pid_alive(pid)]
        for pid in gone:
            self._db.execute("DELETE FROM inflight WHERE pid = ?", [pid])

    def _logged(self, work: Callable[..., None], *args: object) -> None:
        try:
            work(*args)
        except Exception:
            log.exception("shared_limits_update_failed")
