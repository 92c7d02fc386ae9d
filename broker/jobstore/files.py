"""Uploaded files (and the batches' output files): a row each, the content on disk."""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import sqlite_utils

from broker.jobstore.database import OWNED, new_id, owned, paginate, row_as


@dataclass(frozen=True, slots=True)
class FileRow:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    path: str
    owner: str | None  # None: stored before files had owners


class FileStore:
    def __init__(self, db: sqlite_utils.Database, files_dir: Path) -> None:
        self._db = db
        self._dir = files_dir
        files_dir.mkdir(parents=True, exist_ok=True)

    def create(
        self, filename: str, purpose: str, content: bytes, owner: str | None, file_id: str | None = None
    ) -> FileRow:
        """Store a file (under `file_id`, replacing one stored under it before)."""
        file_id = file_id or new_id("file-")
        return self.add(file_id, filename, purpose, self.write(file_id, io.BytesIO(content)), owner)

    def write(self, file_id: str, source: BinaryIO) -> int:
        """Copy `source` into the file's place a megabyte at a time; its size. No database: any thread
        may (an upload is copied beside the store's own thread, which stays free for other requests)."""
        path = self._dir / file_id
        tmp = path.with_suffix(f".{os.getpid()}.part")  # two processes finishing one batch never share it
        with open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)
        tmp.replace(path)
        return path.stat().st_size

    def write_lines(self, file_id: str, lines: Iterable[str]) -> int:
        """Write `lines` (a newline after each) into the file's place as they come; its size. No
        lines: no file, 0."""
        path = self._dir / file_id
        tmp = path.with_suffix(f".{os.getpid()}.part")  # two processes finishing one batch never share it
        with open(tmp, "w", encoding="utf-8", buffering=1024 * 1024) as out:
            for line in lines:
                out.write(line)
                out.write("\n")
        size = tmp.stat().st_size
        if size == 0:
            tmp.unlink()
            return 0
        tmp.replace(path)
        return size

    def add(self, file_id: str, filename: str, purpose: str, size: int, owner: str | None) -> FileRow:
        """Record the file `write` wrote."""
        path = self._dir / file_id
        row = FileRow(file_id, size, int(time.time()), filename, purpose, "processed", str(path), owner)
        self._db.execute(
            "INSERT INTO files (id, bytes, created_at, filename, purpose, status, path, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET bytes = excluded.bytes,"
            " created_at = excluded.created_at, filename = excluded.filename, purpose = excluded.purpose,"
            " status = excluded.status, path = excluded.path, owner = excluded.owner",
            [row.id, row.bytes, row.created_at, row.filename, row.purpose, row.status, row.path, row.owner],
        )
        return row

    def stored_bytes(self, owner: str | None) -> int:
        """What `owner`'s files take (their uploads and their batches' results)."""
        row = self._db.execute("SELECT coalesce(sum(bytes), 0) FROM files WHERE owner IS ?", [owner]).fetchone()
        return int(row[0])

    def get(self, file_id: str, owner: str | None = None) -> FileRow | None:
        """The file, if it exists and (with `owner`) is that user's."""
        rows = list(self._db.query(f"SELECT * FROM files WHERE id = ?{OWNED}", [file_id, *owned(owner)]))
        return row_as(FileRow, rows[0]) if rows else None

    def page(
        self,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
        owner: str | None = None,
    ) -> tuple[list[FileRow], bool]:
        """A page of the files (OpenAI's list: after an id, at most `limit`), and whether more follow."""
        query = f"SELECT * FROM files WHERE 1{OWNED} ORDER BY created_at, rowid"
        rows = [row_as(FileRow, row) for row in self._db.query(query, owned(owner))]
        if order == "desc":
            rows.reverse()
        if purpose:
            rows = [row for row in rows if row.purpose == purpose]
        return paginate(rows, after, limit)

    def delete(self, file_id: str, owner: str | None = None) -> bool:
        file = self.get(file_id, owner)
        if file is None:
            return False
        self._db.execute("DELETE FROM files WHERE id = ?", [file_id])
        Path(file.path).unlink(missing_ok=True)
        return True
