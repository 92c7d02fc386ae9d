"""A direct job's input: requests checked one at a time and stored in chunks, never all held.

Each request (an OpenAI batch line or a plain request body, as JSON bytes or a dict)
passes the checks of `broker.batch_input.check_line`; custom ids are kept unique by the
job store (within a chunk by a set, across chunks by its index), so memory stays the
same for a job of any size. A chunk is stored only if all its requests passed.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from broker.batch_input import ParsedBatch, check_line
from broker.jobstore import AsyncJobStore
from broker.messages import Endpoint

STORE_CHUNK = 5000  # requests stored (and checked for duplicates) in one transaction


class JobInput:
    """Requests for one job, numbered from `first_line`; `flush` stores what `add` checked."""

    def __init__(
        self,
        store: AsyncJobStore,
        job_id: str,
        endpoint: Endpoint | None,
        model: str | None,
        models: Collection[str],
        max_line_bytes: int,
        first_line: int,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._models = models
        self._max_line_bytes = max_line_bytes
        self.checked = ParsedBatch(endpoint=endpoint, model=model)  # its errors: every problem so far
        self.next_line = first_line
        self.stored = 0
        self._chunk: list[tuple[int, str, bytes]] = []
        self._chunk_errors = 0
        self._seen: set[str] = set()  # custom ids in the chunk

    @property
    def full(self) -> bool:
        return len(self._chunk) + self._chunk_errors >= STORE_CHUNK

    def add(self, request: bytes | dict[str, Any]) -> None:
        """Check one request (a JSONL line or a dict); a blank line only takes its number."""
        number = self.next_line
        self.next_line += 1
        raw = request if isinstance(request, bytes) else json.dumps(request, ensure_ascii=False).encode()
        if not raw.strip():
            return
        errors_before = self.checked.error_count
        checked = check_line(self.checked, number, raw, self._models, self._max_line_bytes, True, self._seen)
        if checked is not None:
            self._chunk.append(checked)
        self._chunk_errors += self.checked.error_count - errors_before

    async def flush(self) -> bool:
        """Store the chunk if every request in it passed (duplicates of stored custom ids fail it);
        whether it was stored. Either way the next chunk starts empty."""
        chunk, self._chunk, self._chunk_errors, clean = self._chunk, [], 0, self._chunk_errors == 0
        self._seen = set()
        if not chunk:
            return clean
        job_id = self._job_id
        known = await self._store.run(lambda db: db.lines.known_custom_ids(job_id, [c for _, c, _ in chunk]))
        for line, custom_id, _ in chunk:
            if custom_id in known:
                message = f"`custom_id` {custom_id!r} is used more than once"
                self.checked.error(line, "duplicate_custom_id", message, "custom_id")
        if known or not clean:
            return False
        await self._store.run(lambda db: db.batches.add_lines(job_id, chunk))
        self.stored += len(chunk)
        return True
