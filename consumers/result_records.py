"""A batch's answers as OpenAI's Batch API writes them: one JSON record per line, and the output and
error files made of those records (`consumers.collector` records them as they arrive)."""

from __future__ import annotations

import json
from typing import Any

from broker.jobstore import JobStore, Result
from broker.messages import ErrorReply, Final

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def output_file_id(batch_id: str) -> str:
    return f"file-{batch_id}-output"


def error_file_id(batch_id: str) -> str:
    return f"file-{batch_id}-error"


def write_result_files(db: JobStore, batch_id: str) -> dict[str, str | None]:
    """The batch's output and error files (by fixed ids: writing them again replaces them)."""
    ids: dict[str, str | None] = {}
    batch = db.batches.get(batch_id)
    owner = batch.owner if batch is not None else None  # may read its results (everyone, for an old batch)
    for ok, key, file_id in (
        (True, "output_file_id", output_file_id(batch_id)),
        (False, "error_file_id", error_file_id(batch_id)),
    ):
        size = db.files.write_lines(file_id, db.results.records(batch_id, ok))  # streamed: a job may be huge
        if not size:
            ids[key] = None
            continue
        db.files.add(file_id, f"{batch_id}_{'output' if ok else 'error'}.jsonl", "batch_output", size, owner)
        ids[key] = file_id
    return ids


def result_of(frame: Final | ErrorReply, line: int, custom_id: str) -> Result:
    """One output-file line (a `Final`) or error-file line (an `ErrorReply`), as OpenAI writes them."""
    if isinstance(frame, Final):
        try:
            body = json.loads(frame.body)
        except ValueError:
            body = frame.body.decode(errors="replace")
        response = {"status_code": frame.status, "request_id": frame.request_id, "body": body}
        usage = frame.usage or {}
        record = _line_record(frame.request_id, custom_id, response, None)
        return Result(custom_id, line, True, record, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
    error = {"message": frame.message, "type": frame.error_type, "param": frame.param, "code": frame.code}
    response = {"status_code": frame.status, "request_id": frame.request_id, "body": {"error": error}}
    return Result(custom_id, line, False, _line_record(frame.request_id, custom_id, response, None))


def _line_record(request_id: str, custom_id: str, response: dict[str, Any] | None, error_code: str | None) -> str:
    error = None if error_code is None else {"code": error_code, "message": EXPIRED_MESSAGE}
    record = {"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def expired_result(request_id: str, line: int, custom_id: str) -> Result:
    """The error-file line of a line the batch's completion window closed on."""
    return Result(custom_id, line, False, _line_record(request_id, custom_id, None, "batch_expired"))
