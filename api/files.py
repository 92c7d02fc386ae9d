"""OpenAI's Files API, for batch input and output: /v1/files.

A file belongs to the user who uploaded it (a batch's output files to the batch's
owner): with authentication on, others get 404 for it and do not see it listed.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.identity import identity_of, owner_filter
from broker.errors import HotqError, InvalidRequest
from broker.jobstore import AsyncJobStore
from broker.openai_objects import file_object

MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
PURPOSES = ("batch",)  # what hotq accepts uploads for


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


class Files:
    def __init__(self, store: AsyncJobStore) -> None:
        self._store = store

    async def create(self, request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_FILE_BYTES + 65536:
            raise HotqError(
                f"files are limited to {MAX_FILE_BYTES} bytes", status=413, error_type="invalid_request_error"
            )
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequest("upload a file as multipart/form-data with `file` and `purpose`")
        async with request.form(max_files=1, max_fields=10) as form:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(purpose, str) or not purpose:
                raise InvalidRequest("`purpose` is required", param="purpose")
            if purpose not in PURPOSES:
                raise InvalidRequest(f"`purpose` must be one of {', '.join(PURPOSES)}", param="purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("`file` is required", param="file")
            content = await upload.read()
            filename = upload.filename or "upload.jsonl"
        if len(content) > MAX_FILE_BYTES:
            raise HotqError(
                f"files are limited to {MAX_FILE_BYTES} bytes", status=413, error_type="invalid_request_error"
            )
        owner = identity_of(request).user
        file = await self._store.run(lambda db: db.files.create(filename, purpose, content, owner))
        return JSONResponse(file_object(file))

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
        content = await self._store.run(lambda db: db.files.content(file_id, owner))
        if content is None:
            raise FileNotFound(f"No such File object: {file_id}", param="file_id")
        return Response(content, media_type="application/octet-stream")

    async def delete(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        owner = owner_filter(request)
        if not await self._store.run(lambda db: db.files.delete(file_id, owner)):
            raise FileNotFound(f"No such File object: {file_id}", param="file_id")
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})
