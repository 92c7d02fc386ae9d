"""Direct jobs from Python: publish requests straight onto a model's batch lane, read the results.

    async with await Job.open("hotq.toml", model="my-model") as job:
        await job.add({"messages": [{"role": "user", "content": p}]} for p in prompts)
        await job.close_input()
        async for result in job.results():  # OpenAI batch output lines, as they arrive
            ...

A job is a batch in the job store (source "submit"), run in this process: its requests
are stored a chunk at a time (`producers.job_input`), published with publisher confirms
(`producers.bulk`), and answered into its durable results queue, where the collector
(`consumers.collector.BatchRunner`) records each answer once. `add` holds back
(back-pressure) while `max_pending` requests wait for answers, so memory, the store and
RabbitMQ keep a window of a job of any size. Open the job again by its id, in this
process or another, and it goes on where it stopped; `SyncJob` is the same without
asyncio. `hotq submit` runs on this (`create_from_file`, then `Job.open`).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

from aio_pika.abc import AbstractRobustConnection

from broker.config import Config, load_config
from broker.connection import connect_with
from broker.jobstore import TERMINAL_STATUSES, AsyncJobStore, BatchRow, JobStore, new_id
from broker.messages import Endpoint
from broker.openai_objects import batch_object
from consumers.collector import DISPATCH_WINDOW, POLL_S, BatchRunner
from producers.job_input import JobInput

T = TypeVar("T")
Request = bytes | dict[str, Any]  # an OpenAI batch line or a request body, as JSON bytes or a dict
RESULTS_PAGE = 1000


class JobInputError(Exception):
    """Requests that failed the checks, as OpenAI's `errors.data[]` entries (with their line numbers)."""

    def __init__(self, message: str, errors: list[dict[str, Any]], stored: int) -> None:
        super().__init__(message)
        self.errors = errors
        self.stored = stored  # how many requests of this call were stored (and will run) before the bad ones


class Job:
    def __init__(
        self,
        config: Config,
        store: JobStore,
        connection: AbstractRobustConnection,
        row: BatchRow,
        collect: bool,
        max_pending: int,
        on_published: Callable[[int], None] | None,
        on_collected: Callable[[int], None] | None,
    ) -> None:
        self._config = config
        self._store = store
        self._astore = AsyncJobStore(store)
        self._connection = connection
        self.id = row.id
        self._model = row.model
        self._collect = collect
        self._max_pending = max_pending
        self._collected = asyncio.Event()

        def collected(count: int) -> None:
            self._collected.set()
            if on_collected is not None:
                on_collected(count)

        self._runner = BatchRunner(
            connection, self._astore, row.id, collect=collect, on_published=on_published, on_collected=collected
        )
        self._running: asyncio.Task[dict[str, Any]] | None = None

    @classmethod
    async def open(
        cls,
        config: Config | str | os.PathLike[str] | None = None,
        model: str | None = None,
        *,
        job_id: str | None = None,
        endpoint: str = "/v1/chat/completions",
        owner: str | None = None,
        collect: bool = True,
        max_pending: int = 2 * DISPATCH_WINDOW,
        on_published: Callable[[int], None] | None = None,
        on_collected: Callable[[int], None] | None = None,
    ) -> Job:
        """The job `job_id` (resumed), or a new one for `model` taking requests until `close_input`.
        `config`: a Config or its file (default $HOTQ_CONFIG, then ./hotq.toml). `owner`: whose usage
        it counts as (default: the login name). `collect=False`: publish only (collect later)."""
        config = config if isinstance(config, Config) else load_config(config)
        store = JobStore(config.data_dir)
        row = store.batches.get(job_id) if job_id else None
        if row is None:
            if model is None:
                store.close()
                raise ValueError("a new job needs its model")
            config.model(model)  # a model hotq does not serve fails here, not in a worker
            row = store.batches.create(
                batch_id=job_id or new_id("batch_"),
                endpoint=Endpoint(endpoint.removeprefix("/v1/")).path,
                model=model,
                input_file_id="",
                window_s=config.batch_window_s,
                metadata={"submitted_by": "producers.jobs"},
                source="submit",
                owner=owner or _login_name(),
                input_open=True,
            )
        elif row.status == "validating":
            store.close()
            raise JobInputError(f"job {row.id} stopped while its input was being stored; submit it anew", [], 0)
        connection = await connect_with(config, "job")
        job = cls(config, store, connection, row, collect, max_pending, on_published, on_collected)
        job._running = asyncio.create_task(job._runner.run())
        return job

    async def add(self, requests: Iterable[Request] | AsyncIterable[Request]) -> int:
        """Check, store and publish `requests`; how many. Waits while `max_pending` requests of the
        job wait for answers. A chunk with a bad request raises `JobInputError` and stores none of
        that chunk (the chunks before it run)."""
        row = await self._row()
        if not row.input_open or row.status != "in_progress":
            raise JobInputError(
                f"job {self.id} takes no more requests (its input is closed; it is {row.status})", [], 0
            )
        last = await self._astore.run(lambda db: db.lines.last_line(row.id))
        endpoint = Endpoint(row.endpoint.removeprefix("/v1/"))
        job_input = JobInput(
            self._astore, row.id, endpoint, row.model, self._config.models, self._config.max_body_bytes, last + 1
        )
        if isinstance(requests, AsyncIterable):
            async for request in requests:
                await self._take(job_input, request)
        else:
            for request in requests:
                await self._take(job_input, request)
        await self._flush(job_input)
        return job_input.stored

    async def _take(self, job_input: JobInput, request: Request) -> None:
        job_input.add(request)
        if job_input.full:
            await self._flush(job_input)
            await self._hold_back()

    async def _flush(self, job_input: JobInput) -> None:
        if not await job_input.flush():
            errors = job_input.checked.errors
            problems = "; ".join(f"line {e['line']}: {e['code']}: {e['message']}" for e in errors[:5])
            raise JobInputError(f"{len(errors)} request(s) refused: {problems}", errors, job_input.stored)
        self._runner.wake()

    async def _hold_back(self) -> None:
        """Back-pressure: wait while `max_pending` requests wait for answers (only a collecting job frees them)."""
        while self._collect:
            row = await self._row()
            if row.total - row.completed - row.failed < self._max_pending or row.status in TERMINAL_STATUSES:
                return
            self._collected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._collected.wait(), POLL_S)

    async def close_input(self) -> None:
        """No more requests: the job completes when each has its answer."""
        await self._astore.run(lambda db: db.batches.close_input(self.id))
        self._runner.wake()

    async def results(self, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The job's results (OpenAI batch output lines: `custom_id`, `response`, `error`) in the order
        they arrived, as they arrive, until the job is finished; `after`: skip that many (a reader
        that resumes)."""
        while True:
            self._collected.clear()
            page = await self._astore.run(lambda db: db.results.since(self.id, after, RESULTS_PAGE))  # noqa: B023
            for seq, record in page:
                yield json.loads(record)
                after = seq
            if page:
                continue
            if (await self._row()).status in TERMINAL_STATUSES:
                if not await self._astore.run(lambda db: db.results.since(self.id, after, 1)):  # noqa: B023
                    return
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._collected.wait(), POLL_S)

    async def wait(self) -> dict[str, Any]:
        """The job's batch object once it is finished (or, not collecting, published)."""
        assert self._running is not None
        return await asyncio.shield(self._running)

    async def status(self) -> dict[str, Any]:
        return batch_object(await self._row())

    async def close(self) -> None:
        """Stop publishing and collecting here; the job stays in the store, to be opened again."""
        if self._running is not None and not self._running.done():
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
        await self._connection.close()
        self._astore.close()

    async def __aenter__(self) -> Job:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _row(self) -> BatchRow:
        row = await self._astore.run(lambda db: db.batches.get(self.id))
        assert row is not None
        return row


async def create_from_file(
    config: Config, source: BinaryIO, filename: str, model: str, *, job_id: str | None = None, owner: str
) -> BatchRow:
    """A job of a JSONL stream (a file, stdin) with its input closed, ready for `Job.open`: copied into
    the store, then checked and stored a chunk at a time before anything runs. An invalid input
    raises `JobInputError` naming every bad line (the first 1000), and runs nothing."""
    store = JobStore(config.data_dir)
    astore = AsyncJobStore(store)
    try:
        file_id = new_id("file-")
        size = await astore.write_file(file_id, source)
        file = await astore.run(lambda db: db.files.add(file_id, filename, "batch", size, owner))
        row = await astore.run(
            lambda db: db.batches.create(
                batch_id=job_id or new_id("batch_"),
                endpoint="",
                model=model,
                input_file_id=file.id,
                window_s=config.batch_window_s,
                metadata={"submitted_by": "hotq submit", "input": filename},
                source="submit",
                owner=owner,
                input_open=True,
                validating=True,
            )
        )
        await _store_file(astore, config, row.id, model, file.id, Path(file.path))
        started = await astore.run(lambda db: db.batches.get(row.id))
        assert started is not None
        return started
    finally:
        astore.close()


async def _store_file(store: AsyncJobStore, config: Config, job_id: str, model: str, file_id: str, path: Path) -> None:
    """Check and store a stored input file's lines into its validating job, then start it (or, if
    any is bad, discard the job and the file)."""
    job_input = JobInput(store, job_id, None, model, config.models, config.max_body_bytes, 1)
    with open(path, "rb") as lines:
        for line in lines:
            job_input.add(line.rstrip(b"\r\n"))
            if job_input.full:
                await job_input.flush()
    await job_input.flush()
    checked = job_input.checked
    if not checked.error_count and not job_input.stored:
        checked.error(None, "empty_file", "the input file has no requests")
    if checked.error_count:
        await store.run(lambda db: db.batches.discard(job_id))  # as if never submitted: no batch, no copy
        await store.run(lambda db: db.files.delete(file_id))
        problems = "\n".join(f"  line {e['line']}: {e['code']}: {e['message']}" for e in checked.errors[:20])
        more = f"\n  ... and {checked.error_count - 20} more" if checked.error_count > 20 else ""
        raise JobInputError(f"{checked.error_count} invalid line(s); nothing was submitted:\n{problems}{more}",
                            checked.errors, 0)  # fmt: skip
    assert checked.endpoint is not None
    endpoint = checked.endpoint.path
    await store.run(lambda db: db.batches.start(job_id, endpoint))


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        raise ValueError("cannot tell who you are here; name the job's owner") from None


class SyncJob:
    """`Job` without asyncio (a notebook, a Parsl or Globus Compute function): the same methods,
    run on an event loop of its own in a background thread.

        with SyncJob.open("hotq.toml", model="my-model") as job:
            job.add(requests)
            job.close_input()
            for result in job.results(): ...
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, job: Job) -> None:
        self._loop, self._thread, self.job = loop, thread, job
        self.id = job.id

    @classmethod
    def open(
        cls, config: Config | str | os.PathLike[str] | None = None, model: str | None = None, **options: Any
    ) -> SyncJob:
        """`Job.open` with the same arguments."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="hotq-job", daemon=True)
        thread.start()
        try:
            job = asyncio.run_coroutine_threadsafe(Job.open(config, model, **options), loop).result()
        except BaseException:
            _stop(loop, thread)
            raise
        return cls(loop, thread, job)

    def _call(self, work: Awaitable[T]) -> T:
        async def run() -> T:
            return await work

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def add(self, requests: Iterable[Request]) -> int:
        return self._call(self.job.add(requests))

    def close_input(self) -> None:
        self._call(self.job.close_input())

    def results(self, after: int = 0) -> Iterator[dict[str, Any]]:
        results = self.job.results(after)
        while True:
            try:
                yield self._call(results.__anext__())
            except StopAsyncIteration:
                return

    def wait(self) -> dict[str, Any]:
        return self._call(self.job.wait())

    def status(self) -> dict[str, Any]:
        return self._call(self.job.status())

    def close(self) -> None:
        try:
            self._call(self.job.close())
        finally:
            _stop(self._loop, self._thread)

    def __enter__(self) -> SyncJob:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
