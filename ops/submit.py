"""`hotq submit` and `hotq jobs`: a JSONL file run as a job, with progress bars.

`hotq submit` stores a JSONL file as a job (a batch with source "submit", so it is
listed by GET /v1/batches too), then runs it in this process with a progress bar: the
same `BatchRunner` the API uses (dispatch, collect, write the result files). Running
it again with the job id resumes it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from broker.batch_input import parse_batch_file
from broker.config import Config
from broker.connection import connect_with
from broker.jobstore import AsyncJobStore, JobStore, new_id
from broker.openai_objects import batch_object
from consumers.collector import BatchRunner


class SubmitError(Exception):
    """What `hotq submit` / `hotq jobs` report to the user (and exit 1 on)."""


def create_job(
    config: Config, store: JobStore, path: Path, model: str, job_id: str | None, owner: str
) -> dict[str, Any]:
    """Validate the input file and store it as `owner`'s batch (source "submit"); raise SubmitError if invalid."""
    data = path.read_bytes()
    parsed = parse_batch_file(data, None, config.models, config.max_body_bytes, default_model=model, allow_plain=True)
    if parsed.errors:
        problems = "\n".join(f"  line {e['line']}: {e['code']}: {e['message']}" for e in parsed.errors[:20])
        more = f"\n  ... and {len(parsed.errors) - 20} more" if len(parsed.errors) > 20 else ""
        raise SubmitError(f"{path} has {len(parsed.errors)} invalid line(s); nothing was submitted:\n{problems}{more}")
    assert parsed.endpoint is not None
    file = store.files.create(path.name, "batch", data, owner)
    batch = store.batches.create(
        batch_id=job_id or new_id("batch_"),
        endpoint=parsed.endpoint.path,
        model=parsed.model,
        input_file_id=file.id,
        window_s=config.batch_window_s,
        metadata={"submitted_by": "hotq submit", "input": str(path)},
        source="submit",
        owner=owner,
        lines=parsed.lines,
    )
    return batch_object(batch)


def write_results(store: JobStore, batch_id: str, out: Path) -> int:
    """Every answer of the job in OpenAI's batch output format, in input order (failed ones too)."""
    records = store.results.records(batch_id)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w") as file:
        for record in records:
            file.write(record + "\n")
    tmp.replace(out)
    return len(records)


async def run_job(config: Config, store: JobStore, batch_id: str, collect: bool, show_progress: bool) -> dict[str, Any]:
    """Dispatch a stored job's unconfirmed lines and (with `collect`) collect until it is finished."""
    row = store.batches.get(batch_id)
    assert row is not None
    astore = AsyncJobStore(store)
    connection = await connect_with(config, "submit")
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

    runner = BatchRunner(
        connection,
        astore,
        batch_id,
        collect=collect,
        on_published=lambda n: advance(published, n),
        on_collected=lambda n: advance(collected, n),
    )
    try:
        with progress:
            return await runner.run()
    finally:
        await connection.close()
        astore.shutdown()


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
