"""A batch's results: one output- or error-file record per custom_id.

A result is unique per (batch, custom_id), so recording one is idempotent: a
redelivered answer, or a collector restarted after a crash, never duplicates a line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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

    def record(self, batch_id: str, results: list[Result], collector: str | None = None) -> tuple[int, int]:
        """Record results once each (a repeated custom_id is ignored), numbered in the order they
        arrived, and add the new ones' tokens to the batch's counts and usage; returns (new ok, new failed).
        `collector` names the process that recorded them (several API processes share a batch)."""
        with transaction(self._db, immediate=True):
            known = self._recorded(batch_id, [r.custom_id for r in results])
            new: list[Result] = []
            for result in results:
                if result.custom_id not in known:  # the first of repeats is the one recorded
                    known.add(result.custom_id)
                    new.append(result)
            if not new:
                return 0, 0
            (last,) = self._db.execute(
                "SELECT coalesce(max(seq), 0) FROM results WHERE batch_id = ?", [batch_id]
            ).fetchone()
            self._db.conn.executemany(
                "INSERT INTO results (batch_id, custom_id, line, ok, record, seq) VALUES (?, ?, ?, ?, ?, ?)",
                [(batch_id, r.custom_id, r.line, int(r.ok), r.record, last + n) for n, r in enumerate(new, start=1)],
            )
            ok = sum(1 for r in new if r.ok)
            self._db.execute(
                "UPDATE batches SET completed = completed + ?, failed = failed + ?, runner_seen_at = ?,"
                " prompt_tokens = coalesce(prompt_tokens, 0) + ?,"
                " completion_tokens = coalesce(completion_tokens, 0) + ?, collector = coalesce(?, collector)"
                " WHERE id = ?",
                [
                    ok,
                    len(new) - ok,
                    time.time(),
                    sum(r.prompt_tokens for r in new),
                    sum(r.completion_tokens for r in new),
                    collector,
                    batch_id,
                ],
            )
        return ok, len(new) - ok

    def _recorded(self, batch_id: str, custom_ids: list[str]) -> set[str]:
        """Which of `custom_ids` already have a result."""
        query = "SELECT custom_id FROM results WHERE batch_id = ? AND custom_id IN ({marks})"
        return {custom_id for (custom_id,) in rows_where_in(self._db, query, [batch_id], custom_ids)}

    def records(self, batch_id: str, ok: bool | None = None) -> Iterator[str]:
        """The batch's result records in input order: the answered (ok), the failed, or (None) all.
        Read as they are needed (a job may have millions); use them before the next write."""
        where, args = ("", [batch_id]) if ok is None else (" AND ok = ?", [batch_id, int(ok)])
        cursor = self._db.conn.execute(f"SELECT record FROM results WHERE batch_id = ?{where} ORDER BY line", args)
        for (record,) in cursor:
            yield record

    def since(self, batch_id: str, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (seq, record) of the results recorded after the `after_seq`-th, in arrival order."""
        cursor = self._db.execute(
            "SELECT seq, record FROM results WHERE batch_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            [batch_id, after_seq, limit],
        )
        return [(seq, record) for seq, record in cursor.fetchall()]

    def count(self, batch_id: str) -> int:
        return count_of(self._db, "SELECT count(*) FROM results WHERE batch_id = ?", batch_id)
