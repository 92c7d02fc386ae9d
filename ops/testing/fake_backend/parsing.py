"""Reading a request: its body, the options every endpoint shares, and OpenAI-shaped errors."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

from ops.testing.fake_backend.behaviour import JsonObj


class ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code
        self.param = param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", None, param)


def check_fail_injection(text: str) -> None:
    match = re.match(r"FAIL (\d{3})\b", text)
    if match is None:
        return
    status = int(match.group(1))
    if not 400 <= status <= 599:
        return
    if status == 429:
        err_type = "rate_limit_error"
    elif status < 500:
        err_type = "invalid_request_error"
    else:
        err_type = "server_error"
    raise ApiError(status, "fake backend failure", err_type, f"fake_{status}")


@dataclass
class Common:
    model: str
    stream: bool
    include_usage: bool
    continuous_usage: bool  # vLLM's stream_options.continuous_usage_stats (with include_usage)
    n: int
    max_tokens: int | None
    delay_s: float
    hold_file: str | None
    break_after: int | None
    pause_file: str | None


async def read_json(request: Request) -> JsonObj:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise bad_request("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def tag_of(body: JsonObj) -> str | None:
    tag = body.get("fake_tag")
    return None if tag is None else str(tag)


def opt_int(body: JsonObj, key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_request(f"'{key}' must be an integer >= {minimum}", key)
    return value


def parse_common(
    body: JsonObj, models: Sequence[str], max_tokens_keys: Sequence[str], running_usage: bool = True
) -> Common:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required", "model")
    if model not in models:
        raise ApiError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found", "model")
    max_tokens: int | None = None
    for key in max_tokens_keys:
        max_tokens = opt_int(body, key, 1)
        if max_tokens is not None:
            break
    n = opt_int(body, "n", 1) or 1
    stream_options = body.get("stream_options")
    if not isinstance(stream_options, dict):
        stream_options = {}
    include_usage = bool(stream_options.get("include_usage"))
    continuous_usage = running_usage and include_usage and bool(stream_options.get("continuous_usage_stats"))
    delay = body.get("fake_delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
        raise bad_request("'fake_delay_ms' must be a non-negative number", "fake_delay_ms")
    hold_file = body.get("fake_hold_file")
    if hold_file is not None and not isinstance(hold_file, str):
        raise bad_request("'fake_hold_file' must be a path", "fake_hold_file")
    pause_file = body.get("fake_pause_file")
    if pause_file is not None and not isinstance(pause_file, str):
        raise bad_request("'fake_pause_file' must be a path", "fake_pause_file")
    return Common(
        model,
        bool(body.get("stream")),
        include_usage,
        continuous_usage,
        n,
        max_tokens,
        float(delay) / 1000.0,
        hold_file,
        opt_int(body, "fake_break_after", 0),
        pause_file,
    )
