"""The OpenAI file and batch objects that the Files and Batch APIs (and `hotq jobs`) answer with."""

from __future__ import annotations

import json
from typing import Any

from broker.jobstore import BatchRow, FileRow


def file_object(file: FileRow) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "expires_at": None,
        "status_details": None,
    }


def batch_object(batch: BatchRow) -> dict[str, Any]:
    """The OpenAI batch object of a stored batch, with the tokens of its answers so far."""
    prompt_tokens, completion_tokens = batch.prompt_tokens or 0, batch.completion_tokens or 0
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": json.loads(batch.errors) if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": int(batch.expires_at) if batch.expires_at is not None else None,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": json.loads(batch.metadata) if batch.metadata else None,
        "usage": {
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            # Required by OpenAI's schema; hotq does not count cached or reasoning tokens apart.
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
