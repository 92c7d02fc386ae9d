"""The job store's SQLite database: opening it, its tables, and what the per-concern stores share.

One database, ``<data_dir>/jobs.db``, shared by the API process and `hotq submit` (WAL
lets them read while one writes). Tables made by an older hotq get the columns added
since, so a job store is never recreated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlite_utils

# Files and batches belong to the user who made them. One stored before they had owners (owner
# NULL) is nobody's: only a caller who sees everything (the CLI, the API without [auth]) sees it.
OWNED = " AND (? IS NULL OR owner = ?)"
SQLITE_MAX_PARAMS = 500  # values per statement, below SQLite's cap on parameters

R = TypeVar("R")


class HasId(Protocol):
    @property
    def id(self) -> str: ...


Paged = TypeVar("Paged", bound=HasId)


def new_id(prefix: str) -> str:
    return f"{prefix}{os.urandom(12).hex()}"


def open_database(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA busy_timeout = 30000")
    # Several API processes open the store at once (`hotq serve --workers N`): switching to WAL and
    # creating tables are not covered by the busy timeout, so one process at a time does them.
    with open(path.with_name(path.name + ".setup-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        db.enable_wal()
        db.execute("PRAGMA synchronous = NORMAL")
        _create_tables(db)
    return db


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database, immediate: bool = False) -> Iterator[None]:
    """One transaction (IMMEDIATE takes the write lock at once: read-then-write stays consistent)."""
    with db.conn:
        db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        yield


def owned(owner: str | None) -> list[str | None]:
    """The parameters of `OWNED`: no owner given matches every row."""
    return [owner, owner]


def rows_where_in(db: sqlite_utils.Database, query: str, args: list[str], values: list[str]) -> Iterator[Any]:
    """Rows of `query` with its ``{marks}`` standing for `values`, asked a few hundred at a time."""
    for start in range(0, len(values), SQLITE_MAX_PARAMS):
        chunk = values[start : start + SQLITE_MAX_PARAMS]
        yield from db.execute(query.format(marks=", ".join("?" * len(chunk))), [*args, *chunk]).fetchall()


def count_of(db: sqlite_utils.Database, query: str, *args: object) -> int:
    (found,) = db.execute(query, list(args)).fetchone()
    return int(found)


def row_as(cls: type[R], row: Mapping[str, Any]) -> R:
    """A typed row from a database row (columns it does not name are left out)."""
    assert dataclasses.is_dataclass(cls)
    return cls(**{field.name: row.get(field.name) for field in dataclasses.fields(cls)})


def paginate(rows: list[Paged], after: str | None, limit: int) -> tuple[list[Paged], bool]:
    """The rows after the one with id `after`, at most `limit` of them, and whether more follow."""
    if after is not None:
        ids = [row.id for row in rows]
        rows = rows[ids.index(after) + 1 :] if after in ids else []
    return rows[:limit], len(rows) > limit


def _create_tables(db: sqlite_utils.Database) -> None:
    db.table("files").create(
        {
            "id": str,
            "bytes": int,
            "created_at": int,
            "filename": str,
            "purpose": str,
            "status": str,
            "path": str,
            "owner": str,
        },
        pk="id",
        if_not_exists=True,
    )
    _add_missing_column(db, "files", "owner", "TEXT")  # a job store from before files had owners
    db.table("batches").create(
        {
            "id": str,
            "endpoint": str,
            "model": str,
            "input_file_id": str,
            "completion_window": str,
            "status": str,
            "output_file_id": str,
            "error_file_id": str,
            "created_at": int,
            "in_progress_at": int,
            "expires_at": float,
            "finalizing_at": int,
            "completed_at": int,
            "failed_at": int,
            "expired_at": int,
            "cancelling_at": int,
            "cancelled_at": int,
            "total": int,
            "completed": int,
            "failed": int,
            "errors": str,
            "metadata": str,
            "source": str,
            "runner_seen_at": float,
            "owner": str,
            "prompt_tokens": int,
            "completion_tokens": int,
        },
        pk="id",
        if_not_exists=True,
    )
    # Columns a job store from before batches had owners and usage lacks.
    _add_missing_column(db, "batches", "owner", "TEXT")
    _add_missing_column(db, "batches", "prompt_tokens", "INTEGER")
    _add_missing_column(db, "batches", "completion_tokens", "INTEGER")
    _add_missing_column(db, "batches", "input_open", "INTEGER")  # 1: a direct job still taking requests
    # Several API processes: which one runs the batch (a lease, until `runner_until`) and which recorded last.
    _add_missing_column(db, "batches", "runner", "TEXT")
    _add_missing_column(db, "batches", "runner_until", "REAL")
    _add_missing_column(db, "batches", "collector", "TEXT")
    db.execute(
        "CREATE TABLE IF NOT EXISTS lines (batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL,"
        " request_id TEXT NOT NULL, body BLOB NOT NULL, published INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (batch_id, line)) WITHOUT ROWID"
    )
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS lines_request ON lines (request_id)")
    # A job's requests arrive in chunks: the store, not a set in memory, keeps custom ids unique.
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS lines_custom_id ON lines (batch_id, custom_id)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS results (batch_id TEXT NOT NULL, custom_id TEXT NOT NULL,"
        " line INTEGER NOT NULL, ok INTEGER NOT NULL, record TEXT NOT NULL,"
        " PRIMARY KEY (batch_id, custom_id)) WITHOUT ROWID"
    )
    # The order results arrived in (1, 2, ... per batch), so a reader can follow them as they come.
    _add_missing_column(db, "results", "seq", "INTEGER")
    db.execute("CREATE INDEX IF NOT EXISTS results_seq ON results (batch_id, seq)")
    db.execute("CREATE INDEX IF NOT EXISTS results_line ON results (batch_id, line)")  # output files, in order
    # API keys: only a sha256 of each key (high-entropy, so a plain hash suffices) is kept.
    db.execute(
        "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, user TEXT NOT NULL,"
        " key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, expires_at REAL, revoked_at REAL)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, user TEXT NOT NULL, model TEXT NOT NULL,"
        " lane TEXT NOT NULL, requests INTEGER NOT NULL, cancelled INTEGER NOT NULL,"
        " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
        " PRIMARY KEY (day, user, model, lane)) WITHOUT ROWID"
    )
    db.execute("CREATE TABLE IF NOT EXISTS usage_reports (id TEXT PRIMARY KEY, added_at REAL NOT NULL)")
    db.execute("CREATE INDEX IF NOT EXISTS usage_reports_added ON usage_reports (added_at)")


def _add_missing_column(db: sqlite_utils.Database, table: str, column: str, sql_type: str) -> None:
    if column in db.table(table).columns_dict:
        return
    try:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
    except sqlite3.OperationalError as exc:  # another process added it just now
        if "duplicate column" not in str(exc):
            raise
