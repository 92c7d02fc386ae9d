"""Every message that crosses RabbitMQ, as typed, versioned msgpack records.

A record is encoded as a msgpack array ``[WIRE_VERSION, tag, field, ...]`` in the
order its dataclass declares the fields: compact, fast to decode, and a version
bump is the only way to change a shape. Anything that does not decode to a
known record of the current version raises `WireError` (never pickle, never
JSON on the wire).

Request path: the API publishes a `RequestEnvelope` onto the model's queue; the
consumer answers on the envelope's reply queue with `Started` (only when the
answer takes a while), zero or more `ChunkBatch`, then exactly one `Final` or
`ErrorReply`. `Cancel` travels on the
control exchange to whichever consumer holds the request; that consumer answers
the cancel with `Abandoned`, the backend's token count at the cut, so the API can
charge the user's limits for it.

Migration: a consumer that takes a redelivered stream (its earlier consumer died or
handed it over) asks with `Resuming` what the client already got; the API answers on
the control exchange with `Resume` (the text and token count the client has), and
the consumer continues the stream from there, or with `Cancel` if it must not.

Accounting: each consumer sums what it served per user, model, lane and day and
sends the sums as a `UsageReport` on the events exchange about once a second.

Capacity: the scaler publishes a `ModelOutlook` per model on the events exchange each
tick, so the API knows whether a waiting request's capacity is coming.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar

import msgpack

from broker.errors import WireError

# Version 2 added `Abandoned` and `UsageReport`, which a version-1 peer knows nothing of; `decode`
# refuses a record of another version by name (tests/test_wire_versions.py).
WIRE_VERSION = 2
CONTENT_TYPE = "application/x-msgpack"  # every hotq record's AMQP content type

# The server-sent event that ends an OpenAI stream: a consumer relays it from the backend
# (or leaves it out of a relayed body), the API writes it after the last chunk.
DONE_EVENT = b"data: [DONE]\n\n"

# A consumer sends `Started` only if its answer takes longer than this: a fast
# answer's first frame says as much, and costs one reply message instead of two.
ANNOUNCE_AFTER_S = 0.2


class Lane(enum.StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class Endpoint(enum.StrEnum):
    """The OpenAI endpoint a request targets; the value is its path under /v1."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"

    @property
    def path(self) -> str:
        return f"/v1/{self.value}"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestEnvelope:
    TAG: ClassVar[int] = 1
    request_id: str
    model: str
    endpoint: Endpoint
    body: bytes  # the client's OpenAI JSON body, passed through untouched
    stream: bool
    deadline: float  # unix time after which nobody waits for the answer
    start_by: float  # unix time after which the request must not be started
    caller: str
    lane: Lane
    submitted_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class Started:
    """A consumer took the request; `attempt` names this delivery of it."""

    TAG: ClassVar[int] = 2
    request_id: str
    attempt: str
    worker: str


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkBatch:
    """Coalesced SSE events (``data: {...}\\n\\n`` each) of a stream, in order."""

    TAG: ClassVar[int] = 3
    request_id: str
    attempt: str
    seq: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Final:
    """The end of a successful answer.

    Non-streaming: `body` is the backend's JSON response. Streaming: `body` holds
    the SSE events not yet sent in a `ChunkBatch` (``[DONE]`` excluded).
    """

    TAG: ClassVar[int] = 4
    request_id: str
    attempt: str
    seq: int
    status: int
    body: bytes
    usage: dict[str, int] | None


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorReply:
    """The end of a failed answer, in OpenAI error terms."""

    TAG: ClassVar[int] = 5
    request_id: str
    attempt: str
    status: int
    error_type: str
    message: str
    code: str | None
    param: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """The client went away: whoever holds `request_id` should abort it."""

    TAG: ClassVar[int] = 6
    request_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Abandoned:
    """A request its client left was stopped; `usage`: what the backend generated until then."""

    TAG: ClassVar[int] = 9
    request_id: str
    usage: dict[str, int] | None


@dataclasses.dataclass(frozen=True, slots=True)
class Resuming:
    """A consumer took a redelivered stream: `attempt` waits for the API's `Resume` before it starts."""

    TAG: ClassVar[int] = 11
    request_id: str
    attempt: str
    worker: str


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    """The API's answer to `Resuming`: what the client already got. `tokens` 0: serve it from the
    start; else continue after `text` (`tokens` completion tokens), in the client's stream `stream_id`
    created at `created`."""

    TAG: ClassVar[int] = 12
    request_id: str
    attempt: str
    tokens: int
    text: str
    stream_id: str
    created: int


class AgentState(enum.StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    HOT = "hot"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True, slots=True)
class AgentStatus:
    """An agent's announcement on the events exchange: a state change or a heartbeat."""

    TAG: ClassVar[int] = 7
    agent_id: str
    model: str
    state: AgentState
    heartbeat: bool  # False for a state change
    node: str
    cluster: str
    backend: str  # the backend's base URL on its node
    inflight: int
    served: int
    tokens_per_s: float
    uptime_s: float
    sent_at: float


class UsageRow(typing.NamedTuple):
    """What one consumer served for one user, model, lane and UTC day, with the backend's token counts."""

    day: str  # YYYY-MM-DD
    user: str
    model: str
    lane: str
    requests: int  # served to the end or cancelled by the client; not attempts handed back
    cancelled: int  # of those, cancelled by the client mid-way
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class UsageReport:
    """Sums of usage since a consumer's previous report; `report_id` makes recording it idempotent."""

    TAG: ClassVar[int] = 8
    report_id: str
    worker: str
    rows: list[list[Any]]  # UsageRow fields in order; `usage_rows` checks them

    def usage_rows(self) -> list[UsageRow]:
        rows = []
        for row in self.rows:
            if not isinstance(row, list) or len(row) != len(UsageRow._fields):
                raise WireError(f"UsageReport row has the wrong shape: {row!r:.200}")
            texts, counts = row[:4], row[4:]
            if not all(isinstance(v, str) for v in texts) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts
            ):
                raise WireError(f"UsageReport row has the wrong types: {row!r:.200}")
            rows.append(UsageRow(*row))
        return rows


class ModelState(enum.StrEnum):
    COLD = "cold"  # no agent: the first request waits a full cold start
    STARTING = "starting"  # an agent is launching, starting or loading; none hot yet
    HOT = "hot"  # at least one agent serves


@dataclasses.dataclass(frozen=True, slots=True)
class ModelOutlook:
    """The scaler's word, each tick, on whether capacity for a model is there or coming.

    The API holds a request that no consumer started within `max_queue_wait_s` as long
    as `coming` is true, and answers 503 with `reason` and `retry_after_s` otherwise.
    """

    TAG: ClassVar[int] = 10
    model: str
    state: ModelState
    agents_hot: int
    agents_starting: int  # announced starting or loading, plus launched and not announced yet
    expected_hot_s: float  # seconds until the first agent is expected hot; 0 when hot, -1 unknown
    coming: bool  # an agent is on its way, or the scaler will launch one at its next tick
    reason: str  # when not coming: why no capacity can come
    retry_after_s: float  # when not coming: when a retry may find capacity
    pinned: dict[str, str]  # cluster -> why requests pinned to it get no capacity (absent: there or coming)
    sent_at: float  # unix time


ReplyFrame = Started | ChunkBatch | Final | ErrorReply | Resuming
Control = Cancel | Resume  # what the control exchange carries to every consumer
Record = RequestEnvelope | ReplyFrame | Abandoned | Control | AgentStatus | UsageReport | ModelOutlook

_RECORDS: tuple[type[Record], ...] = (
    RequestEnvelope,
    Started,
    ChunkBatch,
    Final,
    ErrorReply,
    Cancel,
    AgentStatus,
    UsageReport,
    Abandoned,
    ModelOutlook,
    Resuming,
    Resume,
)
_UnionType = type(int | None)


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldCheck:
    name: str
    accepts: type[Any] | tuple[type[Any], ...]  # isinstance target for the msgpack value
    convert: type[enum.Enum] | None  # enums travel as their string values


def _field_checks(cls: type[Any]) -> tuple[_FieldCheck, ...]:
    """How to check each field of a record, derived once from its annotations."""
    hints = typing.get_type_hints(cls)
    checks = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
        accepts = tuple(typing.get_origin(m) or m for m in members)
        if float in accepts:
            accepts += (int,)  # msgpack keeps 3.0 as a float but a producer may send 3
        convert = hint if isinstance(hint, type) and issubclass(hint, enum.Enum) else None
        checks.append(_FieldCheck(field.name, str if convert else accepts, convert))
    return tuple(checks)


_CHECKS: dict[int, tuple[type[Record], tuple[_FieldCheck, ...]]] = {
    cls.TAG: (cls, _field_checks(cls)) for cls in _RECORDS
}


def encode(record: Record) -> bytes:
    values = [WIRE_VERSION, record.TAG]
    values.extend(getattr(record, field.name) for field in dataclasses.fields(record))
    packed: bytes = msgpack.packb(values, use_bin_type=True)
    return packed


def decode(raw: bytes) -> Record:
    try:
        values = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:
        raise WireError(f"undecodable message: {exc}") from exc
    if not isinstance(values, list) or len(values) < 2:
        raise WireError("message is not a hotq record")
    version, tag, *fields = values
    if version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version!r} (this build speaks {WIRE_VERSION})")
    try:
        cls, checks = _CHECKS[tag]
    except (KeyError, TypeError):
        raise WireError(f"unknown record tag {tag!r}") from None
    if len(fields) != len(checks):
        raise WireError(f"{cls.__name__} has {len(checks)} fields, got {len(fields)}")
    for index, (value, check) in enumerate(zip(fields, checks)):
        if not isinstance(value, check.accepts):
            raise WireError(f"{cls.__name__}.{check.name} has the wrong type {type(value).__name__}")
        if check.convert is not None:
            try:
                fields[index] = check.convert(value)
            except ValueError:
                raise WireError(f"{cls.__name__}.{check.name} has the unknown value {value!r}") from None
    return cls(*fields)


def decode_as(raw: bytes, expected: type[Any] | types.UnionType) -> Any:
    """Decode and insist on one record type (a reply queue only takes reply frames)."""
    record = decode(raw)
    if not isinstance(record, expected):
        raise WireError(f"expected {expected}, got {type(record).__name__}")
    return record
