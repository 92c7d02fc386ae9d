"""What hotq checks in an OpenAI request body before queueing it (interactive or a batch line).

Only the fields hotq itself relies on, and the numbers a backend could choke on,
are declared; every other field passes through to the backend untouched (the body
is forwarded as the client's bytes, never re-encoded). Validation errors name the
offending field as OpenAI's `param`. A body nested deeper than `MAX_JSON_DEPTH`
is refused before any parser recurses that far (here, in a consumer or a backend).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from broker.errors import InvalidRequest
from broker.messages import Endpoint

MAX_JSON_DEPTH = 64  # arrays and objects inside each other; real requests (tool schemas included) stay far below
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
        request = _decoder(endpoint).decode(body)
        check_depth(body)
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


def too_deep() -> InvalidRequest:
    return InvalidRequest(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep", code="json_too_deep")


_STRINGS = re.compile(rb'"(?:[^"\\]+|\\.)*"')
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")  # in valid JSON only the nesting matters, not the kind


def check_depth(document: bytes) -> None:
    """Raise RecursionError if a (valid) JSON document nests arrays and objects past MAX_JSON_DEPTH.

    Cheap for ordinary bodies: strings and everything but brackets are dropped in C, and each
    pass removes the innermost pairs, so a body MAX_JSON_DEPTH levels deep takes that many passes."""
    brackets = _STRINGS.sub(b"", document).translate(_AS_SQUARE, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return
        brackets = brackets.replace(b"[]", b"")
    if brackets:
        raise RecursionError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
