"""The fake backend's Starlette app: health, models, the three inference endpoints, and its counters."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ops.testing.fake_backend.behaviour import (
    DEFAULT_MODEL,
    JsonObj,
    content_text,
    expected_chat_tokens,
    expected_completion_tokens,
    expected_embedding,
    last_user_text,
    usage_of,
    word_count,
)
from ops.testing.fake_backend.continuation import continued, reply_tokens_cut
from ops.testing.fake_backend.knobs import delay_then_check_disconnect
from ops.testing.fake_backend.parsing import (
    ApiError,
    bad_request,
    check_fail_injection,
    parse_common,
    read_json,
    tag_of,
)
from ops.testing.fake_backend.stats import Call, FakeStats
from ops.testing.fake_backend.streaming import Answer, stream_response
from ops.testing.prefix_cache import PrefixCache

Handler = Callable[[Request, JsonObj, Call], Awaitable[Response]]


def create_app(models: list[str] | None = None, running_usage: bool = True, ready_after_s: float = 0.0) -> Starlette:
    """A fresh fake backend app serving ``models`` (default ``["fake-model"]``), own stats;
    `running_usage` False ignores ``continuous_usage_stats``; ``/health`` answers 503 for the
    first ``ready_after_s`` seconds, as a model server loading."""
    served: list[str] = list(models) if models else [DEFAULT_MODEL]
    stats = FakeStats()
    cache = PrefixCache.from_env()
    created_at = int(time.time())
    ready_at = time.monotonic() + ready_after_s

    async def health(request: Request) -> Response:
        if time.monotonic() < ready_at:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def list_models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": created_at, "owned_by": "fake-backend"} for m in served]
        return JSONResponse({"object": "list", "data": data})

    async def get_stats(request: Request) -> Response:
        return JSONResponse(stats.as_json())

    async def reset_stats(request: Request) -> Response:
        stats.reset()
        return JSONResponse({"status": "reset"})

    async def run_call(request: Request, handler: Handler) -> Response:
        # Shared wrapper: counts the request, turns ApiError into OpenAI error JSON, and
        # hands the Call to streaming generators, which end it themselves.
        try:
            body = await read_json(request)
        except ApiError as exc:
            call = Call(stats, None)
            call.end(cancelled=False)
            return exc.response()
        call = Call(stats, tag_of(body))
        handed_off = False
        try:
            response: Response = await handler(request, body, call)
            handed_off = isinstance(response, StreamingResponse)
            return response
        except ApiError as exc:
            return exc.response()
        except asyncio.CancelledError:
            call.end(cancelled=True)
            raise
        finally:
            if not handed_off:
                call.end(cancelled=False)  # no-op if already ended as cancelled

    async def chat(request: Request, body: JsonObj, call: Call) -> Response:
        common = parse_common(body, served, ("max_completion_tokens", "max_tokens"), running_usage)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request("'messages' must be a non-empty list of objects", "messages")
        user_text = last_user_text(messages)
        check_fail_injection(user_text)
        tokens, finish = expected_chat_tokens(user_text, common.max_tokens)
        if body.get("continue_final_message") and messages[-1].get("role") == "assistant":
            rest = continued(expected_chat_tokens(user_text, None)[0], content_text(messages[-1].get("content")))
            tokens, finish = reply_tokens_cut(rest, common.max_tokens)
        prompt_tokens = sum(word_count(content_text(m.get("content"))) for m in messages)
        usage = usage_of(prompt_tokens, len(tokens) * common.n)
        answer = Answer("chatcmpl", common)
        await cache.prefill(" ".join(content_text(m.get("content")) for m in messages).split())

        if not common.stream:
            early = await delay_then_check_disconnect(request, common, call)
            if early is not None:
                return early
            text = "".join(tokens)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
                for i in range(common.n)
            ]
            return JSONResponse(answer.part("chat.completion", choices) | {"usage": usage})

        def chunk(choices: list[JsonObj]) -> JsonObj:
            return answer.part("chat.completion.chunk", choices)

        def per_token(index: int, token: str, is_last: bool) -> JsonObj:
            choice = {
                "index": index,
                "delta": {"content": token},
                "logprobs": None,
                "finish_reason": finish if is_last else None,
            }
            return chunk([choice])

        head = [
            chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(common.n)
        ]
        final = chunk([]) | {"usage": usage}
        return stream_response(request, common, call, head, per_token, tokens, final)

    async def completions(request: Request, body: JsonObj, call: Call) -> Response:
        common = parse_common(body, served, ("max_tokens",), running_usage)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string", "prompt")
        check_fail_injection(prompt)
        tokens, finish = expected_completion_tokens(prompt, common.max_tokens)
        if "echo:" in prompt:
            user_text = prompt[: prompt.index("echo:")]
            rest = continued(expected_completion_tokens(user_text, None)[0], prompt[len(user_text) :])
            tokens, finish = reply_tokens_cut(rest, common.max_tokens)
        prompt_words = word_count(prompt.replace("echo:", " echo:", 1))  # the text continued: a word a token
        usage = usage_of(prompt_words, len(tokens) * common.n)
        answer = Answer("cmpl", common)
        await cache.prefill(prompt.split())

        def chunk(choices: list[JsonObj]) -> JsonObj:
            return answer.part("text_completion", choices)

        if not common.stream:
            early = await delay_then_check_disconnect(request, common, call)
            if early is not None:
                return early
            text = "".join(tokens)
            choices = [{"index": i, "text": text, "finish_reason": finish, "logprobs": None} for i in range(common.n)]
            return JSONResponse(chunk(choices) | {"usage": usage})

        def per_token(index: int, token: str, is_last: bool) -> JsonObj:
            return chunk(
                [{"index": index, "text": token, "finish_reason": finish if is_last else None, "logprobs": None}]
            )

        final = chunk([]) | {"usage": usage}
        return stream_response(request, common, call, [], per_token, tokens, final)

    async def embeddings(request: Request, body: JsonObj, call: Call) -> Response:
        common = parse_common(body, served, ())
        raw = body.get("input")
        inputs: list[str] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        if not inputs or not all(isinstance(text, str) for text in inputs):
            raise bad_request("'input' must be a string or a non-empty list of strings", "input")
        for text in inputs:
            check_fail_injection(text)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        early = await delay_then_check_disconnect(request, common, call)
        if early is not None:
            return early
        data: list[JsonObj] = []
        for index, text in enumerate(inputs):
            vector = expected_embedding(text)
            encoded: list[float] | str = vector
            if encoding == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        words = sum(word_count(text) for text in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": common.model,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def chat_endpoint(request: Request) -> Response:
        return await run_call(request, chat)

    async def completions_endpoint(request: Request) -> Response:
        return await run_call(request, completions)

    async def embeddings_endpoint(request: Request) -> Response:
        return await run_call(request, embeddings)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_endpoint, methods=["POST"]),
            Route("/v1/completions", completions_endpoint, methods=["POST"]),
            Route("/v1/embeddings", embeddings_endpoint, methods=["POST"]),
            Route("/_stats", get_stats, methods=["GET"]),
            Route("/_reset", reset_stats, methods=["POST"]),
            Route("/metrics", cache.metrics, methods=["GET"]),
        ]
    )
    app.state.stats = stats
    app.state.models = served
    return app
