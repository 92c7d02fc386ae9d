"""Batches: the OpenAI batch object's fields, its status moves, and whether its runner is alive.

A batch is stored with its lines in one transaction; it starts `in_progress` (or
`failed`, with the errors of an invalid input file and no lines).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from broker.jobstore.database import OWNED, owned, paginate, row_as, transaction
from broker.jobstore.lines import add_lines

BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
ACTIVE_STATUSES = ("in_progress", "finalizing", "cancelling")
TERMINAL_STATUSES = ("failed", "completed", "expired", "cancelled")
_TIMESTAMPS = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}
# A runner that touched its batch within this long is alive (another process must not adopt it).
RUNNER_ALIVE_S = 5.0


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: str
    endpoint: str
    model: str | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: float
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    total: int
    completed: int
    failed: int
    errors: str | None  # JSON: OpenAI's {"object": "list", "data": [...]}
    metadata: str | None  # JSON
    source: str  # "api" or "submit": which kind of process runs it
    runner_seen_at: float | None
    owner: str | None  # None: stored before batches had owners
    prompt_tokens: int | None  # None: stored before batches counted usage
    completion_tokens: int | None
    input_open: int | None  # 1: a direct job that still takes requests (it cannot be complete yet)

    @property
    def answered(self) -> bool:
        return not self.input_open and self.completed + self.failed >= self.total


class BatchStore:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db

    def create(
        self,
        *,
        batch_id: str,
        endpoint: str,
        model: str | None,
        input_file_id: str,
        window_s: float,
        metadata: dict[str, str] | None,
        source: str,
        owner: str,
        lines: Iterable[tuple[int, str, bytes]] = (),
        errors: list[dict[str, Any]] | None = None,
        input_open: bool = False,
        validating: bool = False,
    ) -> BatchRow:
        """A batch that starts `in_progress` with its lines, or `failed` with `errors` (no lines).
        `input_open`: more lines come (`add_lines`) until `close_input`; `validating`: nothing runs
        until `start` (a file whose lines are stored as they are checked)."""
        now = time.time()
        row: dict[str, Any] = {
            "id": batch_id,
            "endpoint": endpoint,
            "model": model,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "failed" if errors else "validating" if validating else "in_progress",
            "created_at": int(now),
            "expires_at": now + window_s,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "errors": json.dumps({"object": "list", "data": errors}) if errors else None,
            "metadata": json.dumps(metadata) if metadata is not None else None,
            "source": source,
            "owner": owner,
            "input_open": int(input_open),
        }
        if errors or not validating:
            row["failed_at" if errors else "in_progress_at"] = int(now)
        with transaction(self._db):
            row["total"] = 0 if errors else add_lines(self._db, batch_id, lines)
            # Plain SQL: sqlite-utils' insert commits on its own, which would split the transaction.
            self._db.execute(
                f"INSERT INTO batches ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
            )
        created = self.get(batch_id)
        assert created is not None
        return created

    def add_lines(self, batch_id: str, lines: list[tuple[int, str, bytes]]) -> None:
        """More (line, custom_id, body) lines for a batch whose input is open."""
        with transaction(self._db):
            added = add_lines(self._db, batch_id, lines)
            self._db.execute("UPDATE batches SET total = total + ? WHERE id = ?", [added, batch_id])

    def close_input(self, batch_id: str) -> None:
        """No more lines: the batch completes once each of its lines has a result."""
        self._db.execute("UPDATE batches SET input_open = 0 WHERE id = ?", [batch_id])

    def start(self, batch_id: str, endpoint: str) -> bool:
        """A validated batch runs, on the `endpoint` its lines name: `validating` → `in_progress`,
        input closed."""
        with transaction(self._db):
            self._db.execute("UPDATE batches SET input_open = 0 WHERE id = ?", [batch_id])
            return self.set_status(batch_id, "in_progress", only_from=["validating"], endpoint=endpoint)

    def discard(self, batch_id: str) -> None:
        """Forget a batch and its lines (an input found invalid while it was stored: nothing runs)."""
        with transaction(self._db):
            self._db.execute("DELETE FROM lines WHERE batch_id = ?", [batch_id])
            self._db.execute("DELETE FROM batches WHERE id = ?", [batch_id])

    def get(self, batch_id: str, owner: str | None = None) -> BatchRow | None:
        """The batch, if it exists and (with `owner`) is that user's."""
        rows = list(self._db.query(f"SELECT * FROM batches WHERE id = ?{OWNED}", [batch_id, *owned(owner)]))
        return row_as(BatchRow, rows[0]) if rows else None

    def page(self, after: str | None = None, limit: int = 20, owner: str | None = None) -> tuple[list[BatchRow], bool]:
        """A page of the batches, newest first (OpenAI's list: after an id, at most `limit`), and
        whether more follow."""
        query = f"SELECT * FROM batches WHERE 1{OWNED} ORDER BY created_at DESC, rowid DESC"
        return paginate([row_as(BatchRow, row) for row in self._db.query(query, owned(owner))], after, limit)

    def set_status(
        self, batch_id: str, status: str, only_from: Iterable[str] | None = None, **fields: str | None
    ) -> bool:
        """Move a batch to `status` (stamping its *_at) and set `fields`; with `only_from`, only from
        those statuses. Returns whether the batch changed."""
        assert status in BATCH_STATUSES
        values: dict[str, object] = dict(fields, status=status)
        if status in _TIMESTAMPS:
            values[_TIMESTAMPS[status]] = int(time.time())
        sets = ", ".join(f"{key} = ?" for key in values)
        sql = f"UPDATE batches SET {sets} WHERE id = ?"
        params = [*values.values(), batch_id]
        if only_from is not None:
            allowed = list(only_from)
            sql += f" AND status IN ({', '.join('?' * len(allowed))})"
            params += allowed
        return self._db.execute(sql, params).rowcount > 0

    def touch(self, batch_id: str) -> None:
        """The runner of this batch is alive."""
        self._db.execute("UPDATE batches SET runner_seen_at = ? WHERE id = ?", [time.time(), batch_id])

    def hold_runner(self, batch_id: str, holder: str, lease_s: float) -> bool:
        """Take or renew the lease on running the batch (dispatching, finishing it) for `lease_s`:
        whether `holder` has it. One statement, so two processes never both get it."""
        now = time.time()
        taken = self._db.execute(
            "UPDATE batches SET runner = ?, runner_until = ?, runner_seen_at = ? WHERE id = ?"
            " AND (runner IS NULL OR runner = ? OR runner_until IS NULL OR runner_until < ?)",
            [holder, now + lease_s, now, batch_id, holder, now],
        )
        return taken.rowcount > 0

    def let_go(self, batch_id: str, holder: str) -> None:
        """End `holder`'s lease now, so another process takes the batch over at once."""
        self._db.execute("UPDATE batches SET runner_until = 0 WHERE id = ? AND runner = ?", [batch_id, holder])

    def processes(self, batch_id: str) -> tuple[str | None, str | None]:
        """The process (`host:pid`) holding the batch's lease, and the one that recorded its latest answers."""
        row = self._db.execute("SELECT runner, collector FROM batches WHERE id = ?", [batch_id]).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def runner_alive(self, batch_id: str) -> bool:
        batch = self.get(batch_id)
        seen = batch.runner_seen_at if batch is not None else None
        return seen is not None and time.time() - seen < RUNNER_ALIVE_S

    def active(self, source: str | None = None) -> list[str]:
        """The ids of the batches not yet finished (of one source)."""
        sql = f"SELECT id FROM batches WHERE status IN ({', '.join('?' * len(ACTIVE_STATUSES))})"
        params = [*ACTIVE_STATUSES]
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        return [row["id"] for row in self._db.query(sql, params)]
