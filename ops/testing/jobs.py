"""Batches stored straight into a job store, for tests and benchmarks of the dispatcher."""

from __future__ import annotations

from collections.abc import Sequence

from broker.jobstore import BatchRow, JobStore


def store_submitted_batch(
    store: JobStore, batch_id: str, model: str, endpoint: str, bodies: Sequence[bytes], owner: str
) -> BatchRow:
    """A batch of `bodies` (lines 1..n, custom ids "1".."n") as `hotq submit` stores one, expiring in an hour."""
    return store.batches.create(
        batch_id=batch_id,
        endpoint=endpoint,
        model=model,
        input_file_id="file-x",
        window_s=3600,
        metadata=None,
        source="submit",
        owner=owner,
        lines=[(n, str(n), body) for n, body in enumerate(bodies, start=1)],
    )
