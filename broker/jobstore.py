"""The job store: uploaded files, batches, their lines and their results, API keys and
usage (sqlite, WAL).

One database, ``<data_dir>/jobs.db``, shared by the API process and `hotq submit`
(WAL lets them read while one writes); file contents live on disk under
``<data_dir>/files/``. A batch is the OpenAI batch object plus its lines; each line
has a request id (the correlation id of its queued request) and a `published` flag
set only after RabbitMQ confirmed it. A result is unique per (batch, custom_id), so
recording one is idempotent: a redelivered answer, or a collector restarted after
a crash, never duplicates a line. Usage is kept as sums per (day, user, model,
lane); the ids of the reports added to them are kept too, so a report is added once.

`JobStore` is synchronous (the CLI and tests use it directly); `AsyncJobStore`
runs the same calls on one dedicated thread so an event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import io
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ParamSpec, TypeVar

import sqlite_utils

from broker.messages import UsageRow

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
API_KEY_PREFIX = "hotq_"  # tells an API key from a Globus token at a glance
# Every caller's name when authentication is off; no key may carry it (its files and batches,
# made with authentication off, would become that key user's).
ANONYMOUS_USER = "anonymous"
USAGE_REPORT_IDS_KEPT_S = 7 * 24 * 3600
USAGE_REPORT_IDS_PRUNE_EVERY_S = 3600

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Line:
    line: int  # 1-based line number in the input file
    custom_id: str
    request_id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Result:
    custom_id: str
    line: int
    ok: bool
    record: str  # the output (or error) file line, JSON
    prompt_tokens: int = 0  # as the backend reported them; summed into the batch's usage
    completion_tokens: int = 0


def new_id(prefix: str) -> str:
    return f"{prefix}{os.urandom(12).hex()}"


class JobStore:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.data_dir / "jobs.db", timeout=30, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous = NORMAL")
        self._create_tables()
        self._usage_ids_pruned_at = 0.0

    def _create_tables(self) -> None:
        db = self.db
        db["files"].create(
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
        self._add_missing_column("files", "owner", "TEXT")  # a job store from before files had owners
        db["batches"].create(
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
        self._add_missing_column("batches", "owner", "TEXT")
        self._add_missing_column("batches", "prompt_tokens", "INTEGER")
        self._add_missing_column("batches", "completion_tokens", "INTEGER")
        db.execute(
            "CREATE TABLE IF NOT EXISTS lines (batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL,"
            " request_id TEXT NOT NULL, body BLOB NOT NULL, published INTEGER NOT NULL DEFAULT 0,"
            " PRIMARY KEY (batch_id, line)) WITHOUT ROWID"
        )
        db.execute("CREATE UNIQUE INDEX IF NOT EXISTS lines_request ON lines (request_id)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS results (batch_id TEXT NOT NULL, custom_id TEXT NOT NULL,"
            " line INTEGER NOT NULL, ok INTEGER NOT NULL, record TEXT NOT NULL,"
            " PRIMARY KEY (batch_id, custom_id)) WITHOUT ROWID"
        )
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

    def _add_missing_column(self, table: str, column: str, sql_type: str) -> None:
        if column in self.db[table].columns_dict:
            return
        try:
            self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
        except sqlite3.OperationalError as exc:  # another process added it just now
            if "duplicate column" not in str(exc):
                raise

    def close(self) -> None:
        self.db.conn.close()

    # -- files ---------------------------------------------------------------

    def create_file(
        self, filename: str, purpose: str, content: bytes, owner: str | None, file_id: str | None = None
    ) -> dict[str, Any]:
        file_id = file_id or new_id("file-")
        size = self.write_file(file_id, io.BytesIO(content))
        return self.add_file(file_id, filename, purpose, size, owner)

    def write_file(self, file_id: str, source: BinaryIO) -> int:
        """Copy `source` into the file's place a megabyte at a time; its size. No database: any thread may
        (an upload is copied beside the store's own thread, which stays free for other requests)."""
        path = self.files_dir / file_id
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)
        tmp.replace(path)
        return path.stat().st_size

    def add_file(self, file_id: str, filename: str, purpose: str, size: int, owner: str | None) -> dict[str, Any]:
        """Record a file `write_file` wrote."""
        row = {
            "id": file_id,
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "path": str(self.files_dir / file_id),
            "owner": owner,
        }
        self.db["files"].upsert(row, pk="id")
        return _file_object(row)

    def stored_bytes(self, owner: str | None) -> int:
        """What `owner`'s files take (their uploads and their batches' results)."""
        row = self.db.execute("SELECT coalesce(sum(bytes), 0) FROM files WHERE owner IS ?", [owner]).fetchone()
        return int(row[0])

    def get_file(self, file_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The file, if it exists and (with `owner`) is that user's."""
        rows = list(self.db.query(f"SELECT * FROM files WHERE id = ?{_OWNED}", [file_id, *_owned(owner)]))
        return _file_object(rows[0]) if rows else None

    def file_path(self, file_id: str, owner: str | None = None) -> Path | None:
        """Where the file's content is (read it outside the store's thread), if it exists and is `owner`'s."""
        rows = list(self.db.query(f"SELECT path FROM files WHERE id = ?{_OWNED}", [file_id, *_owned(owner)]))
        return Path(rows[0]["path"]) if rows else None

    def list_files(
        self,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
        owner: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        query = f"SELECT * FROM files WHERE 1{_OWNED} ORDER BY created_at, rowid"
        rows = [_file_object(row) for row in self.db.query(query, _owned(owner))]
        if order == "desc":
            rows.reverse()
        if purpose:
            rows = [row for row in rows if row["purpose"] == purpose]
        return _page(rows, after, limit)

    def delete_file(self, file_id: str, owner: str | None = None) -> bool:
        rows = list(self.db.query(f"SELECT path FROM files WHERE id = ?{_OWNED}", [file_id, *_owned(owner)]))
        if not rows:
            return False
        self.db.execute("DELETE FROM files WHERE id = ?", [file_id])
        Path(rows[0]["path"]).unlink(missing_ok=True)
        return True

    # -- batches ---------------------------------------------------------------

    def create_batch(
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
    ) -> dict[str, Any]:
        """A batch that starts `in_progress` with its lines, or `failed` with `errors` (no lines)."""
        now = time.time()
        row: dict[str, Any] = {
            "id": batch_id,
            "endpoint": endpoint,
            "model": model,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "failed" if errors else "in_progress",
            "created_at": int(now),
            "expires_at": now + window_s,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "errors": json.dumps({"object": "list", "data": errors}) if errors else None,
            "metadata": json.dumps(metadata) if metadata is not None else None,
            "source": source,
            "owner": owner,
        }
        if errors:
            row["failed_at"] = int(now)
            self._insert_batch(row)
            return self.get_batch(batch_id)  # type: ignore[return-value]
        row["in_progress_at"] = int(now)
        rows = [(batch_id, line, custom_id, new_id(""), body) for line, custom_id, body in lines]
        row["total"] = len(rows)
        with self.db.conn:
            self.db.execute("BEGIN")
            self._insert_batch(row)
            self.db.conn.executemany(
                "INSERT INTO lines (batch_id, line, custom_id, request_id, body) VALUES (?, ?, ?, ?, ?)", rows
            )
        return self.get_batch(batch_id)  # type: ignore[return-value]

    def _insert_batch(self, row: dict[str, Any]) -> None:
        # Plain SQL: sqlite-utils' insert commits on its own, which would split a transaction.
        self.db.execute(
            f"INSERT INTO batches ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
        )

    def batch_row(self, batch_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM batches WHERE id = ?", [batch_id]))
        return rows[0] if rows else None

    def get_batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The batch object, if it exists and (with `owner`) is that user's."""
        rows = list(self.db.query(f"SELECT * FROM batches WHERE id = ?{_OWNED}", [batch_id, *_owned(owner)]))
        return batch_object(rows[0]) if rows else None

    def list_batches(
        self, after: str | None = None, limit: int = 20, owner: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        query = f"SELECT * FROM batches WHERE 1{_OWNED} ORDER BY created_at DESC, rowid DESC"
        rows = list(self.db.query(query, _owned(owner)))
        page, more = _page(rows, after, limit)
        return [batch_object(row) for row in page], more

    def set_status(self, batch_id: str, status: str, only_from: Iterable[str] | None = None, **fields: Any) -> bool:
        """Move a batch to `status` (stamping its *_at); with `only_from`, only from those statuses.
        Returns whether the batch changed."""
        assert status in BATCH_STATUSES
        values = dict(fields, status=status)
        if status in _TIMESTAMPS:
            values[_TIMESTAMPS[status]] = int(time.time())
        sets = ", ".join(f"{key} = ?" for key in values)
        sql = f"UPDATE batches SET {sets} WHERE id = ?"
        params = [*values.values(), batch_id]
        if only_from is not None:
            allowed = list(only_from)
            sql += f" AND status IN ({', '.join('?' * len(allowed))})"
            params += allowed
        cursor = self.db.execute(sql, params)
        return cursor.rowcount > 0

    def touch(self, batch_id: str) -> None:
        """The runner of this batch is alive."""
        self.db.execute("UPDATE batches SET runner_seen_at = ? WHERE id = ?", [time.time(), batch_id])

    def runner_alive(self, batch_id: str) -> bool:
        row = self.batch_row(batch_id)
        return bool(row and row["runner_seen_at"] and time.time() - row["runner_seen_at"] < RUNNER_ALIVE_S)

    def active_batches(self, source: str | None = None) -> list[str]:
        sql = f"SELECT id FROM batches WHERE status IN ({', '.join('?' * len(ACTIVE_STATUSES))})"
        params: list[Any] = list(ACTIVE_STATUSES)
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        return [row["id"] for row in self.db.query(sql, params)]

    # -- lines -----------------------------------------------------------------

    def unpublished_lines(self, batch_id: str, after_line: int, limit: int) -> list[Line]:
        cursor = self.db.execute(
            "SELECT line, custom_id, request_id, body FROM lines WHERE batch_id = ? AND line > ? AND published = 0"
            " ORDER BY line LIMIT ?",
            [batch_id, after_line, limit],
        )
        return [Line(*row) for row in cursor.fetchall()]

    def mark_published(self, batch_id: str, lines: list[int]) -> None:
        with self.db.conn:
            self.db.execute("BEGIN")
            self.db.conn.executemany(
                "UPDATE lines SET published = 1 WHERE batch_id = ? AND line = ?", [(batch_id, n) for n in lines]
            )

    def published_count(self, batch_id: str) -> int:
        return self.db.execute(
            "SELECT count(*) FROM lines WHERE batch_id = ? AND published = 1", [batch_id]
        ).fetchone()[0]

    def lines_for(self, request_ids: list[str]) -> dict[str, tuple[str, int, str]]:
        """request_id -> (batch_id, line, custom_id)."""
        query = "SELECT request_id, batch_id, line, custom_id FROM lines WHERE request_id IN ({marks})"
        return {
            request_id: (batch_id, line, custom_id)
            for request_id, batch_id, line, custom_id in self._rows_where_in(query, [], request_ids)
        }

    def unfinished_lines(self, batch_id: str) -> list[tuple[int, str, str]]:
        """(line, custom_id, request_id) of lines that have no result yet."""
        cursor = self.db.execute(
            "SELECT l.line, l.custom_id, l.request_id FROM lines l LEFT JOIN results r"
            " ON r.batch_id = l.batch_id AND r.custom_id = l.custom_id WHERE l.batch_id = ? AND r.custom_id IS NULL"
            " ORDER BY l.line",
            [batch_id],
        )
        return cursor.fetchall()

    # -- results ---------------------------------------------------------------

    def record_results(self, batch_id: str, results: list[Result]) -> tuple[int, int]:
        """Record results once each (a repeated custom_id is ignored) and add the new ones' tokens to
        the batch's usage; returns (new ok, new failed)."""
        added = [0, 0]
        with self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
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
                    cursor = self.db.conn.executemany(
                        "INSERT OR IGNORE INTO results (batch_id, custom_id, line, ok, record) VALUES (?, ?, ?, ?, ?)",
                        rows,
                    )
                    added[0 if ok else 1] = cursor.rowcount
            if added[0] or added[1]:
                self.db.execute(
                    "UPDATE batches SET completed = completed + ?, failed = failed + ?, runner_seen_at = ?,"
                    " prompt_tokens = coalesce(prompt_tokens, 0) + ?,"
                    " completion_tokens = coalesce(completion_tokens, 0) + ? WHERE id = ?",
                    [added[0], added[1], time.time(), prompt_tokens, completion_tokens, batch_id],
                )
        return added[0], added[1]

    def _recorded(self, batch_id: str, custom_ids: list[str]) -> set[str]:
        """Which of `custom_ids` already have a result."""
        query = "SELECT custom_id FROM results WHERE batch_id = ? AND custom_id IN ({marks})"
        return {custom_id for (custom_id,) in self._rows_where_in(query, [batch_id], custom_ids)}

    def _rows_where_in(self, query: str, args: list[str], values: list[str]) -> Iterator[tuple[Any, ...]]:
        """Rows of `query` with its ``{marks}`` standing for `values`, asked 500 at a time (SQLite
        caps the parameters of one statement)."""
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            yield from self.db.execute(query.format(marks=", ".join("?" * len(chunk))), [*args, *chunk]).fetchall()

    def result_records(self, batch_id: str, ok: bool) -> list[str]:
        cursor = self.db.execute(
            "SELECT record FROM results WHERE batch_id = ? AND ok = ? ORDER BY line", [batch_id, int(ok)]
        )
        return [row[0] for row in cursor.fetchall()]

    def result_count(self, batch_id: str) -> int:
        return self.db.execute("SELECT count(*) FROM results WHERE batch_id = ?", [batch_id]).fetchone()[0]

    # -- API keys --------------------------------------------------------------

    def create_api_key(self, user: str, expires_at: float | None = None) -> tuple[dict[str, Any], str]:
        """A new key for `user`: its record and the key itself (the only time it exists in clear)."""
        if user == ANONYMOUS_USER:
            raise ValueError(f"{ANONYMOUS_USER!r} is reserved for callers without authentication")
        if not user or user != user.strip() or not user.isprintable():
            raise ValueError(f"{user!r} is not a user name: it must be non-empty, printable, without outer spaces")
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        row = {
            "id": new_id("key_"),
            "user": user,
            "key_hash": hash_api_key(key),
            "created_at": time.time(),
            "expires_at": expires_at,
            "revoked_at": None,
        }
        self.db.execute(
            "INSERT INTO api_keys (id, user, key_hash, created_at, expires_at, revoked_at)"
            " VALUES (:id, :user, :key_hash, :created_at, :expires_at, :revoked_at)",
            row,
        )
        return _key_record(row), key

    def list_api_keys(self, include_revoked: bool = True) -> list[dict[str, Any]]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        return [_key_record(row) for row in self.db.query(f"SELECT * FROM api_keys{where} ORDER BY created_at")]

    def api_key_hashes(self) -> list[dict[str, Any]]:
        """Every key not revoked, with its hash: what the API caches."""
        return list(self.db.query("SELECT * FROM api_keys WHERE revoked_at IS NULL"))

    def find_api_key(self, key_hash: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM api_keys WHERE key_hash = ?", [key_hash]))
        return rows[0] if rows else None

    def revoke_api_key(self, key_or_id: str) -> dict[str, Any] | None:
        """Revoke a key named by its id or by the key itself; None if there is no such key."""
        by_key = key_or_id.startswith(API_KEY_PREFIX)
        column, value = ("key_hash", hash_api_key(key_or_id)) if by_key else ("id", key_or_id)
        self.db.execute(
            f"UPDATE api_keys SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL", [time.time(), value]
        )
        rows = list(self.db.query(f"SELECT * FROM api_keys WHERE {column} = ?", [value]))
        return _key_record(rows[0]) if rows else None

    # -- usage -----------------------------------------------------------------

    def record_usage(self, report_id: str, rows: Iterable[UsageRow]) -> bool:
        """Add a usage report's rows to the sums; False (and nothing added) if it was added before."""
        now = time.time()
        with self.db.conn:
            self.db.execute("BEGIN")
            added = self.db.execute(
                "INSERT OR IGNORE INTO usage_reports (id, added_at) VALUES (?, ?)", [report_id, now]
            )
            if added.rowcount == 0:
                return False
            self.db.conn.executemany(
                "INSERT INTO usage (day, user, model, lane, requests, cancelled, prompt_tokens, completion_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, user, model, lane) DO UPDATE SET"
                " requests = requests + excluded.requests, cancelled = cancelled + excluded.cancelled,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens",
                [tuple(row) for row in rows],
            )
            if now - self._usage_ids_pruned_at > USAGE_REPORT_IDS_PRUNE_EVERY_S:
                # A report comes again within hours at most; its id need not be kept for ever.
                self.db.execute("DELETE FROM usage_reports WHERE added_at < ?", [now - USAGE_REPORT_IDS_KEPT_S])
                self._usage_ids_pruned_at = now
        return True

    def usage(
        self, user: str | None = None, model: str | None = None, since: str | None = None
    ) -> list[dict[str, Any]]:
        """Usage sums per day, user, model and lane, oldest first; `since` is a day (YYYY-MM-DD)."""
        where, args = [], []
        for column, value, test in (("user", user, "="), ("model", model, "="), ("day", since, ">=")):
            if value is not None:
                where.append(f"{column} {test} ?")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.query(f"SELECT * FROM usage{clause} ORDER BY day, user, model, lane", args)
        return [row | {"total_tokens": row["prompt_tokens"] + row["completion_tokens"]} for row in rows]


class AsyncJobStore:
    """The same store for an event loop: every call runs on one dedicated thread."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")

    async def call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: method(*args, **kwargs))

    def shutdown(self) -> None:
        """Finish the calls under way; the store stays open."""
        self._executor.shutdown(wait=True)

    def close(self) -> None:
        self.shutdown()
        self.store.close()


def since_day(text: str, today: datetime.date | None = None) -> str:
    """A usage query's first day from "YYYY-MM-DD" or "<N>d" (the last N days, today included)."""
    today = today or datetime.datetime.now(datetime.UTC).date()
    try:
        if text.endswith("d") and text[:-1].isdigit() and int(text[:-1]) >= 1:
            return (today - datetime.timedelta(days=int(text[:-1]) - 1)).isoformat()
        return datetime.date.fromisoformat(text).isoformat()
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is neither a day (YYYY-MM-DD) nor a number of days (such as 7d)") from None


# Files and batches belong to the user who made them. One stored before they had owners (owner
# NULL) is nobody's: only a caller who sees everything (the CLI, the API without [auth]) sees it.
_OWNED = " AND (? IS NULL OR owner = ?)"


def _owned(owner: str | None) -> list[str | None]:
    """The parameters of `_OWNED`: no owner given matches every row."""
    return [owner, owner]


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_record(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in ("id", "user", "created_at", "expires_at", "revoked_at")}


def _file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": row["status"],
        "expires_at": None,
        "status_details": None,
    }


def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI batch object of a stored batch, with the tokens of its answers so far."""
    prompt_tokens, completion_tokens = row.get("prompt_tokens") or 0, row.get("completion_tokens") or 0
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"],
        "errors": json.loads(row["errors"]) if row["errors"] else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        "in_progress_at": row["in_progress_at"],
        "expires_at": int(row["expires_at"]) if row["expires_at"] is not None else None,
        "finalizing_at": row["finalizing_at"],
        "completed_at": row["completed_at"],
        "failed_at": row["failed_at"],
        "expired_at": row["expired_at"],
        "cancelling_at": row["cancelling_at"],
        "cancelled_at": row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "usage": {
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            # Required by OpenAI's schema; hotq does not count cached or reasoning tokens apart.
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def _page(rows: list[dict[str, Any]], after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    if after is not None:
        ids = [row["id"] for row in rows]
        rows = rows[ids.index(after) + 1 :] if after in ids else []
    return rows[:limit], len(rows) > limit
