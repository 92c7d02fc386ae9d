"""OpenAI's Batch API (/v1/batches), and the batches this API process runs.

Creating a batch validates its input file whole (a bad line fails the batch, with
every bad line named, and nothing is dispatched), stores its lines, and starts a
`BatchRunner` in this process. Every API process follows every unfinished batch created
through the API (looking for new ones in the job store every second, so a batch created
through one process is run by all): each collects the answers RabbitMQ hands it, and the
one holding the batch's lease dispatches and finishes it; when that process dies another
takes the lease over. `hotq submit` runs its own jobs, which show up here too (same job store).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import structlog
from aio_pika.abc import AbstractRobustConnection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.auth import AccessPolicy
from api.bodies import read_body
from api.files import FileNotFound, int_param, list_response
from api.identity import identity_of, owner_filter
from broker.batch_input import parse_batch_file
from broker.config import Config
from broker.errors import HotqError, InvalidRequest
from broker.jobstore import AsyncJobStore, JobStore, new_id
from broker.json_limits import too_deep
from broker.messages import Endpoint
from broker.openai_objects import batch_object
from consumers.collector import BatchRunner

log = structlog.get_logger("hotq.api")

ENDPOINTS = {endpoint.path: endpoint for endpoint in Endpoint}
RUNNER_RETRY_S = 2.0  # before a runner that failed (a lost connection) starts again
WATCH_S = 1.0  # how often a process looks for batches other processes created
LEASE_S = 10.0  # a runner renews its lease every second; a process silent this long loses it


class BatchNotFound(HotqError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class BatchManager:
    """The batch runners of this API process (each on a channel of the process's connection)."""

    def __init__(self, config: Config, store: AsyncJobStore) -> None:
        self.config = config
        self.store = store
        self.connection: AbstractRobustConnection | None = None
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # the lease holder, and the collector's name
        self._runners: dict[str, asyncio.Task[Any]] = {}
        self._watching: asyncio.Task[None] | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Run batches on `connection` from now on: the unfinished ones, and new ones as they come."""
        self.connection = connection
        await self._follow_active()
        self._watching = asyncio.create_task(self._watch())

    async def _follow_active(self) -> None:
        for batch_id in await self.store.run(lambda db: db.batches.active("api")):
            if batch_id not in self._runners:
                log.info("batch_followed", batch_id=batch_id)
                self.run(batch_id)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self._follow_active()
            except Exception:
                log.exception("batch_watch_failed")

    def run(self, batch_id: str) -> None:
        if self.connection is None or batch_id in self._runners:
            return  # not connected yet: `start` resumes it
        store, name = self.store, self.name

        async def lease() -> bool:
            return await store.run(lambda db: db.batches.hold_runner(batch_id, name, LEASE_S))

        runner = BatchRunner(self.connection, store, batch_id, shared=True, lease=lease, collector=name)
        task = asyncio.create_task(self._run(runner))
        self._runners[batch_id] = task
        task.add_done_callback(lambda _: self._runners.pop(batch_id, None))

    async def _run(self, runner: BatchRunner) -> None:
        while True:
            try:
                await runner.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch_runner_failed_restarting", batch_id=runner.batch_id)
                await asyncio.sleep(RUNNER_RETRY_S)

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
        batch_ids = list(self._runners)
        for task in list(self._runners.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        name = self.name

        def let_go(db: JobStore) -> None:  # another process takes them over at once
            for batch_id in batch_ids:
                db.batches.let_go(batch_id, name)

        with contextlib.suppress(Exception):
            await self.store.run(let_go)


class Batches:
    def __init__(self, config: Config, store: AsyncJobStore, manager: BatchManager) -> None:
        self._config = config
        self._store = store
        self._manager = manager
        self.policy: AccessPolicy | None = None  # per-model access lists, when [auth] is on

    async def create(self, request: Request) -> Response:
        try:
            params = json.loads(await read_body(request, self._config.max_body_bytes))
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON") from None
        except RecursionError:
            raise too_deep() from None
        if not isinstance(params, dict):
            raise InvalidRequest("the request body must be a JSON object")
        input_file_id = params.get("input_file_id")
        endpoint = params.get("endpoint")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise InvalidRequest("`input_file_id` is required", param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"`endpoint` must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if params.get("completion_window") != "24h":
            raise InvalidRequest("`completion_window` must be 24h", param="completion_window")
        metadata = _metadata(params.get("metadata"))
        owner = owner_filter(request)
        file = await self._store.run(lambda db: db.files.get(input_file_id, owner))
        if file is None:
            raise FileNotFound(f"No such File object: {input_file_id}", param="input_file_id")
        if file.purpose != "batch":
            raise InvalidRequest("the input file must have been uploaded with purpose `batch`", param="input_file_id")
        content = await asyncio.to_thread(_read, Path(file.path))  # beside the store's thread: inputs reach 200 MB
        parsed = await asyncio.to_thread(
            parse_batch_file, content, ENDPOINTS[endpoint], self._config.models, self._config.max_body_bytes
        )
        if self.policy is not None and parsed.model:
            await self.policy.require(identity_of(request), parsed.model)
        creator, window_s = identity_of(request).user, self._config.batch_window_s
        batch = await self._store.run(
            lambda db: db.batches.create(
                batch_id=new_id("batch_"),
                endpoint=endpoint,
                model=parsed.model,
                input_file_id=input_file_id,
                window_s=window_s,
                metadata=metadata,
                source="api",
                owner=creator,
                lines=parsed.lines,
                errors=parsed.errors,
            )
        )
        if batch.status == "failed":
            log.info("batch_invalid", batch_id=batch.id, errors=len(parsed.errors))
        else:
            log.info("batch_created", batch_id=batch.id, lines=len(parsed.lines), model=parsed.model)
            self._manager.run(batch.id)
        return JSONResponse(batch_object(batch))

    async def retrieve(self, request: Request) -> Response:
        return JSONResponse(await self._get(request, request.path_params["batch_id"]))

    async def list(self, request: Request) -> Response:
        after, limit, owner = (
            request.query_params.get("after"),
            int_param(request, "limit", 20, 1, 100),
            owner_filter(request),
        )
        batches, has_more = await self._store.run(lambda db: db.batches.page(after, limit, owner))
        return list_response([batch_object(batch) for batch in batches], has_more)

    async def cancel(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = await self._get(request, batch_id)
        if batch["status"] in ("cancelling", "cancelled"):
            return JSONResponse(batch)
        cancelling = await self._store.run(
            lambda db: db.batches.set_status(batch_id, "cancelling", only_from=["validating", "in_progress"])
        )
        if not cancelling:
            raise HotqError(
                f"Cannot cancel a batch with status {batch['status']}",
                status=409,
                error_type="invalid_request_error",
                code="batch_not_cancellable",
            )
        if not await self._store.run(lambda db: db.batches.runner_alive(batch_id)):
            self._manager.run(batch_id)  # e.g. a detached `hotq submit` job: finish the cancel here
        return JSONResponse(await self._get(request, batch_id))

    async def _get(self, request: Request, batch_id: str) -> dict[str, Any]:
        """The caller's batch; another user's is as unknown as one that does not exist."""
        owner = owner_filter(request)
        batch = await self._store.run(lambda db: db.batches.get(batch_id, owner))
        if batch is None:
            raise BatchNotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return batch_object(batch)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()
        )
    ):
        raise InvalidRequest(
            "`metadata` holds at most 16 string pairs (keys up to 64, values up to 512 characters)", param="metadata"
        )
    return value
