"""A batch's results: one output- or error-file record per custom_id.

A result is unique per (batch, custom_id), so recording one is idempotent: a
redelivered answer, or a collector restarted after a crash, never duplicates a line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlite_utils

from broker.jobstore.database import count_of, rows_where_in, transaction


@dataclass(frozen=True, slots=True)
class Result:
    custom_id: str
    line: int
    ok: bool
    record: str  # the output (or error) file line, JSON
    prompt_tokens: int = 0  # as the backend reported them; summed into the batch's usage
    completion_tokens: int = 0


class ResultStore:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db

    def record(self, batch_id: str, results: list[Result]) -> tuple[int, int]:
        """Record results once each (a repeated custom_id is ignored) and add the new ones' tokens to
        the batch's counts and usage; returns (new ok, new failed)."""
        added = [0, 0]
        with transaction(self._db, immediate=True):
            known = self._recorded(batch_id, [r.custom_id for r in results])
            prompt_tokens = completion_tokens = 0
            for result in results:
                if result.custom_id not in known:  # the first of repeats is the one recorded
                    known.add(result.custom_id)
                    prompt_tokens += result.prompt_tokens
                    completion_tokens += result.completion_tokens
            for ok in (True, False):
                rows = [(batch_id, r.custom_id, r.line, int(ok), r.record) for r in results if r.ok is ok]
                if rows:
                    cursor = self._db.conn.executemany(
                        "INSERT OR IGNORE INTO results (batch_id, custom_id, line, ok, record) VALUES (?, ?, ?, ?, ?)",
                        rows,
                    )
                    added[0 if ok else 1] = cursor.rowcount
            if added[0] or added[1]:
                self._db.execute(
                    "UPDATE batches SET completed = completed + ?, failed = failed + ?, runner_seen_at = ?,"
                    " prompt_tokens = coalesce(prompt_tokens, 0) + ?,"
                    " completion_tokens = coalesce(completion_tokens, 0) + ? WHERE id = ?",
                    [added[0], added[1], time.time(), prompt_tokens, completion_tokens, batch_id],
                )
        return added[0], added[1]

    def _recorded(self, batch_id: str, custom_ids: list[str]) -> set[str]:
        """Which of `custom_ids` already have a result."""
        query = "SELECT custom_id FROM results WHERE batch_id = ? AND custom_id IN ({marks})"
        return {custom_id for (custom_id,) in rows_where_in(self._db, query, [batch_id], custom_ids)}

    def records(self, batch_id: str, ok: bool | None = None) -> list[str]:
        """The batch's result records in input order: the answered (ok), the failed, or (None) all."""
        where, args = ("", [batch_id]) if ok is None else (" AND ok = ?", [batch_id, int(ok)])
        cursor = self._db.execute(f"SELECT record FROM results WHERE batch_id = ?{where} ORDER BY line", args)
        return [record for (record,) in cursor.fetchall()]

    def count(self, batch_id: str) -> int:
        return count_of(self._db, "SELECT count(*) FROM results WHERE batch_id = ?", batch_id)
