"""`hotq submit` and `hotq jobs`: a JSONL file (or stdin) run as a direct job, with progress bars.

`hotq submit` stores its input as a job (`producers.jobs.create_from_file`: a batch with
source "submit", so GET /v1/batches lists it too), then runs it in this process through
the Python API (`producers.jobs.Job`) with a progress bar. Running it again with the job
id resumes it. Nothing here holds the whole input or all results: they stream through
the job store.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from broker.config import Config
from broker.jobstore import JobStore
from broker.openai_objects import batch_object
from producers.jobs import Job, JobInputError, create_from_file


class SubmitError(Exception):
    """What `hotq submit` / `hotq jobs` report to the user (and exit 1 on)."""


def create_job(config: Config, source: str, model: str, job_id: str | None, owner: str) -> dict[str, Any]:
    """Check the input (a path, or "-" for stdin) and store it as `owner`'s job; raise SubmitError if invalid."""
    name = "stdin" if source == "-" else Path(source).name
    try:
        if source == "-":
            row = asyncio.run(create_from_file(config, sys.stdin.buffer, name, model, job_id=job_id, owner=owner))
        else:
            with open(source, "rb") as file:
                row = asyncio.run(create_from_file(config, file, name, model, job_id=job_id, owner=owner))
    except JobInputError as exc:
        raise SubmitError(f"{source}: {exc}") from None
    return batch_object(row)


def write_results(store: JobStore, batch_id: str, out: Path) -> int:
    """Every answer of the job in OpenAI's batch output format, in input order (failed ones too),
    read from the store as they are written."""
    tmp = out.with_name(out.name + ".part")
    written = 0
    with open(tmp, "w") as file:
        for record in store.results.records(batch_id):
            file.write(record + "\n")
            written += 1
    tmp.replace(out)
    return written


async def run_job(config: Config, store: JobStore, batch_id: str, collect: bool, show_progress: bool) -> dict[str, Any]:
    """Dispatch a stored job's unconfirmed lines and (with `collect`) collect until it is finished."""
    row = store.batches.get(batch_id)
    assert row is not None
    progress = Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9}/s"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
    )
    published = progress.add_task(
        "published", total=row.total, completed=store.lines.published_count(batch_id), rate="-"
    )
    collected = progress.add_task(
        "collected", total=row.total, completed=store.results.count(batch_id), rate="-", visible=collect
    )

    def advance(task: TaskID, count: int) -> None:
        progress.advance(task, count)
        speed = progress.tasks[task].speed
        progress.update(task, rate=f"{speed:,.0f}" if speed else "-")

    try:
        job = await Job.open(
            config,
            job_id=batch_id,
            collect=collect,
            on_published=lambda n: advance(published, n),
            on_collected=lambda n: advance(collected, n),
        )
    except JobInputError as exc:
        raise SubmitError(str(exc)) from None
    try:
        with progress:
            return await job.wait()
    finally:
        await job.close()


def cancel_job(config: Config, store: JobStore, batch_id: str) -> dict[str, Any]:
    batch = store.batches.get(batch_id)
    if batch is None:
        raise SubmitError(f"no job {batch_id}")
    if batch.status in ("cancelling", "cancelled"):
        return batch_object(batch)
    if not store.batches.set_status(batch_id, "cancelling", only_from=["validating", "in_progress"]):
        raise SubmitError(f"job {batch_id} is {batch.status}; it cannot be cancelled")
    if store.batches.runner_alive(batch_id):  # its runner finishes the cancel
        cancelling = store.batches.get(batch_id)
        assert cancelling is not None
        return batch_object(cancelling)
    return asyncio.run(run_job(config, store, batch_id, collect=True, show_progress=False))
