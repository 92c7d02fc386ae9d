"""`JobStore`: the per-concern stores over one database; `AsyncJobStore`: the same for an event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from broker.jobstore.batches import BatchStore
from broker.jobstore.database import open_database
from broker.jobstore.files import FileStore
from broker.jobstore.keys import KeyStore
from broker.jobstore.lines import LineStore
from broker.jobstore.results import ResultStore
from broker.jobstore.usage import UsageStore

T = TypeVar("T")


class JobStore:
    """Synchronous: the CLI and tests use it directly; an event loop goes through `AsyncJobStore`."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self._db = open_database(data_dir / "jobs.db")
        self.files = FileStore(self._db, data_dir / "files")
        self.batches = BatchStore(self._db)
        self.lines = LineStore(self._db)
        self.results = ResultStore(self._db)
        self.keys = KeyStore(self._db)
        self.usage = UsageStore(self._db)

    def close(self) -> None:
        self._db.conn.close()


class AsyncJobStore:
    """The job store for an event loop: `run` does its work on one dedicated thread, so the loop
    never blocks on disk and the store's connection is used by one thread at a time."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")

    async def run(self, work: Callable[[JobStore], T]) -> T:
        """``await store.run(lambda db: db.batches.get(batch_id))``."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, self._store)

    async def write_file(self, file_id: str, source: BinaryIO) -> int:
        """Copy a file's content (`FileStore.write`) beside the store's thread, which stays free for other
        requests meanwhile; record it with `run` after."""
        return await asyncio.to_thread(self._store.files.write, file_id, source)

    def shutdown(self) -> None:
        """Finish the work under way; the store stays open."""
        self._executor.shutdown(wait=True)

    def close(self) -> None:
        self.shutdown()
        self._store.close()
