"""A batch's lines: each a queued request, `published` only after RabbitMQ confirmed it.

A line's request id is the correlation id of its request, so an answer finds its line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import sqlite_utils

from broker.jobstore.database import count_of, new_id, rows_where_in, transaction


@dataclass(frozen=True, slots=True)
class Line:
    line: int  # 1-based line number in the input file
    custom_id: str
    request_id: str
    body: bytes


class LineOwner(NamedTuple):
    """Where an answer belongs."""

    batch_id: str
    line: int
    custom_id: str


class Unfinished(NamedTuple):
    """A line without a result yet."""

    line: int
    custom_id: str
    request_id: str


def add_lines(db: sqlite_utils.Database, batch_id: str, lines: Iterable[tuple[int, str, bytes]]) -> int:
    """Store a new batch's (line, custom_id, body) lines, in the caller's transaction; how many."""
    rows = [(batch_id, line, custom_id, new_id(""), body) for line, custom_id, body in lines]
    db.conn.executemany("INSERT INTO lines (batch_id, line, custom_id, request_id, body) VALUES (?, ?, ?, ?, ?)", rows)
    return len(rows)


class LineStore:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db

    def unpublished(self, batch_id: str, after_line: int, limit: int) -> list[Line]:
        cursor = self._db.execute(
            "SELECT line, custom_id, request_id, body FROM lines WHERE batch_id = ? AND line > ? AND published = 0"
            " ORDER BY line LIMIT ?",
            [batch_id, after_line, limit],
        )
        return [Line(*row) for row in cursor.fetchall()]

    def mark_published(self, batch_id: str, lines: list[int]) -> None:
        with transaction(self._db):
            self._db.conn.executemany(
                "UPDATE lines SET published = 1 WHERE batch_id = ? AND line = ?", [(batch_id, n) for n in lines]
            )

    def last_line(self, batch_id: str) -> int:
        """The batch's highest line number (0 without lines)."""
        return count_of(self._db, "SELECT coalesce(max(line), 0) FROM lines WHERE batch_id = ?", batch_id)

    def published_count(self, batch_id: str) -> int:
        return count_of(self._db, "SELECT count(*) FROM lines WHERE batch_id = ? AND published = 1", batch_id)

    def owners(self, request_ids: list[str]) -> dict[str, LineOwner]:
        """The line each request id belongs to (unknown ids are left out)."""
        query = "SELECT request_id, batch_id, line, custom_id FROM lines WHERE request_id IN ({marks})"
        return {
            request_id: LineOwner(batch_id, line, custom_id)
            for request_id, batch_id, line, custom_id in rows_where_in(self._db, query, [], request_ids)
        }

    def known_custom_ids(self, batch_id: str, custom_ids: list[str]) -> set[str]:
        """Which of `custom_ids` the batch has already."""
        query = "SELECT custom_id FROM lines WHERE batch_id = ? AND custom_id IN ({marks})"
        return {custom_id for (custom_id,) in rows_where_in(self._db, query, [batch_id], custom_ids)}

    def unfinished(self, batch_id: str, after_line: int, limit: int) -> list[Unfinished]:
        """Up to `limit` of the lines after `after_line` that have no result yet, in order."""
        cursor = self._db.execute(
            "SELECT l.line, l.custom_id, l.request_id FROM lines l LEFT JOIN results r"
            " ON r.batch_id = l.batch_id AND r.custom_id = l.custom_id WHERE l.batch_id = ? AND l.line > ?"
            " AND r.custom_id IS NULL ORDER BY l.line LIMIT ?",
            [batch_id, after_line, limit],
        )
        return [Unfinished(*row) for row in cursor.fetchall()]
