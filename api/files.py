"""OpenAI's Files API, for batch input and output: /v1/files.

A file belongs to the user who uploaded it (a batch's output files to the batch's
owner): with authentication on, others get 404 for it and do not see it listed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.types import Message, Receive

from api.bodies import discard_body
from api.identity import identity_of, owner_filter
from broker.config import Config
from broker.errors import HotqError, InvalidRequest, PayloadTooLarge
from broker.jobstore import AsyncJobStore, FileRow, new_id
from broker.openai_objects import file_object

PURPOSES = ("batch",)  # what hotq accepts uploads for
MULTIPART_SLACK = 64 * 1024  # the form's boundaries and fields around the file itself


class FileNotFound(HotqError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


def list_response(items: list[dict[str, object]], has_more: bool) -> JSONResponse:
    return JSONResponse(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": has_more,
        }
    )


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an integer", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be between {low} and {high}", param=name)
    return value


class QuotaExceeded(HotqError):
    status = 413
    error_type = "invalid_request_error"
    code = "storage_quota_exceeded"


class Files:
    """Uploads stream through a spooled temporary file (a megabyte in memory, the rest on disk) into the
    job store's files, copied in a thread of their own: memory stays bounded, and the event loop and the
    store's thread free, whatever the size."""

    def __init__(self, config: Config, store: AsyncJobStore) -> None:
        self._store = store
        self._max_bytes = config.max_file_bytes
        self._quota = config.user_storage_bytes

    async def create(self, request: Request) -> Response:
        owner = identity_of(request).user
        declared = request.headers.get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        counted = _CountedReceive(request.receive, self._max_bytes + MULTIPART_SLACK, self._too_large)
        body = Request(request.scope, counted)
        try:
            if size is not None and size > self._max_bytes + MULTIPART_SLACK:
                raise self._too_large()
            if size is not None:
                await self._check_quota(owner, size - MULTIPART_SLACK)
            if not request.headers.get("content-type", "").startswith("multipart/form-data"):
                raise InvalidRequest("upload a file as multipart/form-data with `file` and `purpose`")
            file = await self._receive(body, owner)
        except (PayloadTooLarge, QuotaExceeded):
            counted.refused = True
            await discard_body(body, started=counted.received > 0)  # the rest, so that every client reads the 413
            raise
        return JSONResponse(file_object(file))

    async def _receive(self, request: Request, owner: str) -> FileRow:
        async with request.form(max_files=1, max_fields=10) as form:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(purpose, str) or not purpose:
                raise InvalidRequest("`purpose` is required", param="purpose")
            if purpose not in PURPOSES:
                raise InvalidRequest(f"`purpose` must be one of {', '.join(PURPOSES)}", param="purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("`file` is required", param="file")
            if upload.size is not None and upload.size > self._max_bytes:
                raise self._too_large()
            await self._check_quota(owner, upload.size or 0)
            await upload.seek(0)
            file_id = new_id("file-")
            size = await self._store.write_file(file_id, upload.file)
            filename = upload.filename or "upload.jsonl"
            file = await self._store.run(lambda db: db.files.add(file_id, filename, purpose, size, owner))
        if self._quota is not None and await self._store.run(lambda db: db.files.stored_bytes(owner)) > self._quota:
            await self._store.run(lambda db: db.files.delete(file_id))  # a concurrent upload took the room
            raise self._over_quota(owner, 0)
        return file

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"files are limited to {self._max_bytes} bytes (max_file_bytes)")

    async def _check_quota(self, owner: str, adding: int) -> None:
        if self._quota is None:
            return
        used = await self._store.run(lambda db: db.files.stored_bytes(owner))
        if used + adding > self._quota:
            raise self._over_quota(owner, used)

    def _over_quota(self, owner: str, used: int) -> QuotaExceeded:
        held = f" (your files hold {used} bytes)" if used else ""
        return QuotaExceeded(f"{owner}'s files may take {self._quota} bytes in all{held}; delete files to make room")

    async def list(self, request: Request) -> Response:
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("`order` must be asc or desc", param="order")
        purpose, after = request.query_params.get("purpose"), request.query_params.get("after")
        limit, owner = int_param(request, "limit", 10000, 1, 10000), owner_filter(request)
        files, has_more = await self._store.run(lambda db: db.files.page(purpose, after, limit, order, owner))
        return list_response([file_object(file) for file in files], has_more)

    async def retrieve(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        owner = owner_filter(request)
        file = await self._store.run(lambda db: db.files.get(file_id, owner))
        if file is None:
            raise FileNotFound(f"No such File object: {file_id}", param="file_id")
        return JSONResponse(file_object(file))

    async def content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        owner = owner_filter(request)
        file = await self._store.run(lambda db: db.files.get(file_id, owner))
        if file is None or not Path(file.path).is_file():
            raise FileNotFound(f"No such File object: {file_id}", param="file_id")
        return FileResponse(file.path, media_type="application/octet-stream")  # streamed, never whole in memory

    async def delete(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        owner = owner_filter(request)
        if not await self._store.run(lambda db: db.files.delete(file_id, owner)):
            raise FileNotFound(f"No such File object: {file_id}", param="file_id")
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})


class _CountedReceive:
    """An ASGI receive that refuses a body (chunked, or lying about its length) once it passes `limit`."""

    def __init__(self, receive: Receive, limit: int, refuse: Callable[[], HotqError]) -> None:
        self._receive = receive
        self._limit = limit
        self._refuse = refuse
        self.received = 0
        self.refused = False  # once refused, the rest passes through to be discarded

    async def __call__(self) -> Message:
        message = await self._receive()
        self.received += len(message.get("body", b""))
        if self.received > self._limit and not self.refused:
            self.refused = True
            raise self._refuse()
        return message
