"""What hotq checks in an OpenAI request body before queueing it (interactive or a batch line).

Only the fields hotq itself relies on, and the numbers a backend could choke on,
are declared; every other field passes through to the backend untouched (the body
is forwarded as the client's bytes, never re-encoded). Validation errors name the
offending field as OpenAI's `param`. What no parser or backend should be handed
(deep nesting, numbers past what they hold) is refused by `broker.json_limits`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from broker.affinity import key_of
from broker.errors import InvalidRequest
from broker.json_limits import check_structure, too_deep
from broker.messages import Endpoint

MAX_CHOICES = 128  # OpenAI's own limit on `n`
MAX_TOKENS = 2**31 - 1  # backends count tokens in 32-bit integers
Role = Literal["system", "user", "assistant", "tool", "function", "developer"]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)]
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]
# Sampling numbers: any finite value passes (the backend judges its own range); 1e999 does not.
Finite = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]


class ChatMessage(msgspec.Struct):
    role: Role
    content: str | list[Any] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct):
    model: str
    stream: bool = False
    n: Choices = 1
    best_of: Choices | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    temperature: Finite | None = None
    top_p: Finite | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    prompt_cache_key: str | None = None  # OpenAI's: requests sharing it share a prefix (affinity placement)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=list)
    max_completion_tokens: Count | None = None


class CompletionRequest(_Common):
    prompt: str | list[Any] | None = None


class EmbeddingRequest(msgspec.Struct):
    model: str
    input: str | list[Any] | None = None

    @property
    def stream(self) -> bool:
        return False


_DECODERS: dict[Endpoint, msgspec.json.Decoder[Any]] = {}
_REQUIRED: dict[Endpoint, str] = {
    Endpoint.CHAT: "messages",
    Endpoint.COMPLETIONS: "prompt",
    Endpoint.EMBEDDINGS: "input",
}
_TYPES: dict[Endpoint, type[Any]] = {
    Endpoint.CHAT: ChatCompletionRequest,
    Endpoint.COMPLETIONS: CompletionRequest,
    Endpoint.EMBEDDINGS: EmbeddingRequest,
}
_WHERE = re.compile(r" - at `\$\.?(?P<param>[^`]*)`$")


def _decoder(endpoint: Endpoint) -> msgspec.json.Decoder[Any]:
    decoder = _DECODERS.get(endpoint)
    if decoder is None:
        decoder = _DECODERS[endpoint] = msgspec.json.Decoder(_TYPES[endpoint])
    return decoder


def validate(endpoint: Endpoint, body: bytes) -> ChatCompletionRequest | CompletionRequest | EmbeddingRequest:
    """Decode and check a request body, raising `InvalidRequest` with the field at fault."""
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest = _decoder(endpoint).decode(body)
        check_structure(body)
    except RecursionError:
        raise too_deep() from None
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _WHERE.search(message)
        param = match.group("param") if match else None
        missing = re.search(r"missing required field `([^`]+)`", message)
        if missing:
            param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        raise InvalidRequest(f"invalid request body: {message}", param=param or None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    required = _REQUIRED[endpoint]
    value = getattr(request, required)
    if value is None or value == [] or value == "" and endpoint is not Endpoint.COMPLETIONS:
        raise InvalidRequest(f"`{required}` is required and must not be empty", param=required)
    return request


def affinity_key(
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest, batch_line: bool = False
) -> bytes | None:
    """The validated request's affinity key (`broker.affinity`); embeddings have none."""
    if isinstance(request, ChatCompletionRequest):
        return key_of(request.prompt_cache_key, request.messages, None, instructions_only=batch_line)
    if isinstance(request, CompletionRequest):
        return key_of(request.prompt_cache_key, None, request.prompt)
    return None
