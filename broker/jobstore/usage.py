"""Usage: sums per (day, user, model, lane) of what the backends counted.

The ids of the reports added to the sums are kept too (for a week), so a report
delivered again is added once.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from typing import TypedDict

import sqlite_utils

from broker.jobstore.database import transaction
from broker.messages import UsageRow

USAGE_REPORT_IDS_KEPT_S = 7 * 24 * 3600
USAGE_REPORT_IDS_PRUNE_EVERY_S = 3600


class UsageTotal(TypedDict):
    """A row of GET /v1/usage and `hotq usage --json`."""

    day: str
    user: str
    model: str
    lane: str
    requests: int
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageStore:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db
        self._ids_pruned_at = 0.0

    def record(self, report_id: str, rows: Iterable[UsageRow]) -> bool:
        """Add a usage report's rows to the sums; False (and nothing added) if it was added before."""
        now = time.time()
        with transaction(self._db):
            added = self._db.execute(
                "INSERT OR IGNORE INTO usage_reports (id, added_at) VALUES (?, ?)", [report_id, now]
            )
            if added.rowcount == 0:
                return False
            self._db.conn.executemany(
                "INSERT INTO usage (day, user, model, lane, requests, cancelled, prompt_tokens, completion_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, user, model, lane) DO UPDATE SET"
                " requests = requests + excluded.requests, cancelled = cancelled + excluded.cancelled,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens",
                [tuple(row) for row in rows],
            )
            if now - self._ids_pruned_at > USAGE_REPORT_IDS_PRUNE_EVERY_S:
                # A report comes again within hours at most; its id need not be kept for ever.
                self._db.execute("DELETE FROM usage_reports WHERE added_at < ?", [now - USAGE_REPORT_IDS_KEPT_S])
                self._ids_pruned_at = now
        return True

    def totals(self, user: str | None = None, model: str | None = None, since: str | None = None) -> list[UsageTotal]:
        """Usage sums per day, user, model and lane, oldest first; `since` is a day (YYYY-MM-DD)."""
        where, args = [], []
        for column, value, test in (("user", user, "="), ("model", model, "="), ("day", since, ">=")):
            if value is not None:
                where.append(f"{column} {test} ?")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.query(f"SELECT * FROM usage{clause} ORDER BY day, user, model, lane", args)
        return [
            UsageTotal(
                day=row["day"],
                user=row["user"],
                model=row["model"],
                lane=row["lane"],
                requests=row["requests"],
                cancelled=row["cancelled"],
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                total_tokens=row["prompt_tokens"] + row["completion_tokens"],
            )
            for row in rows
        ]


def since_day(text: str, today: datetime.date | None = None) -> str:
    """A usage query's first day from "YYYY-MM-DD" or "<N>d" (the last N days, today included)."""
    today = today or datetime.datetime.now(datetime.UTC).date()
    try:
        if text.endswith("d") and text[:-1].isdigit() and int(text[:-1]) >= 1:
            return (today - datetime.timedelta(days=int(text[:-1]) - 1)).isoformat()
        return datetime.date.fromisoformat(text).isoformat()
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is neither a day (YYYY-MM-DD) nor a number of days (such as 7d)") from None
