"""Reading and validating a batch input file (JSONL), before anything is dispatched.

Two forms: OpenAI's batch lines ``{custom_id, method: "POST", url, body}`` (the
Batch API and `hotq submit`), and, for `hotq submit` only, plain request bodies, one
a line (their custom_id is the line number). Every problem is reported with its
1-based line number, in the shape of OpenAI's ``errors.data[]`` entries; a batch with
any error is not run at all. Each body is checked with the schema interactive requests
pass (`broker.schemas`), and no line may be larger than an interactive request may be.
`check_line` checks one line at a time, for inputs read as a stream (`producers.jobs`).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from broker.errors import InvalidRequest
from broker.json_limits import MAX_JSON_DEPTH
from broker.messages import Endpoint
from broker.schemas import validate

MAX_LINES = 50_000  # OpenAI's limit per batch (the Batch API's; direct jobs have none)
MAX_REPORTED_ERRORS = 1000
_REQUIRED_FIELD = {Endpoint.CHAT: "messages", Endpoint.COMPLETIONS: "prompt", Endpoint.EMBEDDINGS: "input"}
_BY_PATH = {endpoint.path: endpoint for endpoint in Endpoint}


@dataclass
class ParsedBatch:
    lines: list[tuple[int, str, bytes]] = field(default_factory=list)  # (line, custom_id, body JSON)
    errors: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS
    model: str | None = None
    endpoint: Endpoint | None = None
    error_count: int = 0

    def error(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def parse_batch_file(
    data: bytes,
    endpoint: Endpoint | None,
    models: Collection[str],
    max_line_bytes: int,
    default_model: str | None = None,
    allow_plain: bool = False,
) -> ParsedBatch:
    """Validate every line. `endpoint` None: take it from the lines (`hotq submit`).
    `max_line_bytes`: the config's max_body_bytes, which an interactive request is held to too.
    `default_model`: the model of bodies that name none (and the only one allowed).
    `allow_plain`: accept bare request bodies (custom_id = line number)."""
    parsed = ParsedBatch(endpoint=endpoint, model=default_model)
    seen: set[str] = set()
    count = 0
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        count += 1
        if count > MAX_LINES:
            parsed.error(number, "too_many_requests", f"a batch holds at most {MAX_LINES} requests")
            break
        checked = check_line(parsed, number, raw, models, max_line_bytes, allow_plain, seen)
        if checked is not None:
            parsed.lines.append(checked)
    if count == 0:
        parsed.error(None, "empty_file", "the input file has no requests")
    if parsed.errors:
        parsed.lines.clear()
    return parsed


def check_line(
    parsed: ParsedBatch,
    number: int,
    raw: bytes,
    models: Collection[str],
    max_line_bytes: int,
    allow_plain: bool,
    seen: set[str],
) -> tuple[int, str, bytes] | None:
    """Line `number`'s (line, custom_id, body JSON), or None with its error in `parsed`. The
    endpoint and model the first good line names hold for the rest; `seen`: custom ids so far."""
    if len(raw) > max_line_bytes:
        message = f"line {number} is {len(raw)} bytes; a request may have at most {max_line_bytes}"
        parsed.error(number, "line_too_large", message)
        return None
    try:
        item = json.loads(raw)
    except ValueError as exc:
        parsed.error(number, "invalid_json_line", f"line {number} is not valid JSON: {exc}")
        return None
    except RecursionError:
        parsed.error(number, "json_too_deep", f"line {number} is nested more than {MAX_JSON_DEPTH} levels deep")
        return None
    if not isinstance(item, dict):
        parsed.error(number, "invalid_request", f"line {number} is not a JSON object")
        return None
    openai_line = "custom_id" in item or "body" in item or "url" in item or "method" in item
    if openai_line or not allow_plain:
        for key in ("custom_id", "method", "url", "body"):
            if key not in item:
                parsed.error(number, "missing_required_parameter", f"line {number} has no `{key}`", key)
                return None
        custom_id, method, url, body = item["custom_id"], item["method"], item["url"], item["body"]
        if not isinstance(custom_id, str) or not custom_id:
            parsed.error(number, "invalid_request", "`custom_id` must be a non-empty string", "custom_id")
            return None
        if method != "POST":
            parsed.error(number, "invalid_method", f"`method` must be POST, not {method!r}", "method")
            return None
        line_endpoint = _BY_PATH.get(url) if isinstance(url, str) else None
        if line_endpoint is None or (parsed.endpoint is not None and line_endpoint is not parsed.endpoint):
            expected = parsed.endpoint.path if parsed.endpoint else " or ".join(_BY_PATH)
            parsed.error(number, "invalid_url", f"`url` {url!r} does not match the batch endpoint {expected}", "url")
            return None
    else:
        custom_id, body = str(number), item
        line_endpoint = next((e for e, key in _REQUIRED_FIELD.items() if key in body), None)
        if line_endpoint is None:
            parsed.error(number, "invalid_request", "a request body needs `messages`, `prompt` or `input`")
            return None
    if parsed.endpoint is None:
        parsed.endpoint = line_endpoint
    elif line_endpoint is not parsed.endpoint:
        parsed.error(number, "mismatched_endpoint", f"every request must target {parsed.endpoint.path}", "url")
        return None
    if custom_id in seen:
        parsed.error(number, "duplicate_custom_id", f"`custom_id` {custom_id!r} is used more than once", "custom_id")
        return None
    seen.add(custom_id)
    if not isinstance(body, dict):
        parsed.error(number, "invalid_request", "`body` must be a JSON object", "body")
        return None
    if _check_body(parsed, number, body, models):
        encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            validate(line_endpoint, encoded)  # what an interactive request must pass, field for field
        except InvalidRequest as error:
            param = f"body.{error.param}" if error.param else "body"
            parsed.error(number, error.code or "invalid_request", f"line {number}: {error.message}", param)
            return None
        return number, custom_id, encoded
    return None


def _check_body(parsed: ParsedBatch, number: int, body: dict[str, Any], models: Collection[str]) -> bool:
    model = body.get("model")
    if model is None and parsed.model is not None:
        body["model"] = model = parsed.model
    if not isinstance(model, str) or not model:
        parsed.error(number, "missing_required_parameter", "`body.model` is required", "body.model")
        return False
    if parsed.model is None:
        parsed.model = model
    elif model != parsed.model:
        parsed.error(
            number, "mismatched_model", f"all requests must use model {parsed.model!r}, not {model!r}", "body.model"
        )
        return False
    if model not in models:
        parsed.error(number, "model_not_found", f"the model `{model}` does not exist", "body.model")
        return False
    if body.get("stream"):
        parsed.error(number, "invalid_request", "batch requests cannot stream", "body.stream")
        return False
    return True
