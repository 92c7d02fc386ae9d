"""What a stream's client already got, and whether the stream may move to another consumer.

The API is the authority on what reached the client: the relay keeps the stream's chunk
bytes as it passes them on (a reference each, nothing parsed) and reads them only when a
consumer that took the redelivered request asks (`Resuming`). Then it says, once per
asking attempt:

- `Resume`: the text so far, its token count, the stream's `id` and `created`, for the
  consumer to continue it (`consumers/continuation.py`); with nothing sent, from the start;
- finish: a `finish_reason` already went out, the answer is complete: the API ends the stream;
- refuse: tool calls were under way, or the stream already moved `max_migrations` times: the
  client gets an explicit error event, as before migration existed.

Tokens sent are counted as the content chunks sent (a backend sends one a token), or, when the
client asked for running usage (vLLM's `continuous_usage_stats`), as the last count it got.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import msgspec

from broker.messages import Resume, Resuming
from ops.metrics import ApiMetrics

_DATA = b"data: "


@dataclasses.dataclass
class Sent:
    """What the client of a stream received, read from the chunks sent."""

    text: str = ""
    tokens: int = 0
    stream_id: str = ""
    created: int = 0
    finished: bool = False  # a finish_reason went out
    tool_calls: bool = False  # tool call deltas went out


def read_sent(chunks: list[bytes]) -> Sent:
    sent = Sent()
    parts: list[str] = []
    for event in b"".join(chunks).split(b"\n\n"):
        if not event.startswith(_DATA):
            continue
        try:
            chunk = msgspec.json.decode(event[len(_DATA) :])
        except msgspec.DecodeError:
            continue
        if isinstance(chunk, dict):
            _add_chunk(sent, parts, chunk)
    sent.text = "".join(parts)
    return sent


def _add_chunk(sent: Sent, parts: list[str], chunk: dict[str, Any]) -> None:
    if not sent.stream_id and isinstance(chunk.get("id"), str):
        sent.stream_id = chunk["id"]
        sent.created = chunk["created"] if isinstance(chunk.get("created"), int) else 0
    choices = chunk.get("choices")
    counted = False
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        raw_delta = choice.get("delta")
        delta: dict[str, Any] = raw_delta if isinstance(raw_delta, dict) else {}
        text = choice.get("text") if "text" in choice else delta.get("content")
        if isinstance(text, str) and text:
            parts.append(text)
            counted = True
        if delta.get("tool_calls"):
            sent.tool_calls = True
        if choice.get("finish_reason") is not None:
            sent.finished = True
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int) and choices:
        sent.tokens = usage["completion_tokens"]  # the client's own running usage: exact
    elif counted:
        sent.tokens += 1


@dataclasses.dataclass(frozen=True)
class Refuse:
    reason: str


@dataclasses.dataclass(frozen=True)
class Finish:
    """The answer is complete already; only its end was lost."""


class StreamMigration:
    """One stream's chunks sent so far and its migrations."""

    def __init__(self, model: str, max_migrations: int, metrics: ApiMetrics | None = None) -> None:
        self._model = model
        self._max = max_migrations
        self._metrics = metrics
        self._chunks: list[bytes] = []
        self._last_output_at = 0.0
        self._gap_from: float | None = None  # moved: when its last output before the move went out
        self.migrations = 0

    def note_output(self, data: bytes) -> None:
        now = time.monotonic()
        self._chunks.append(data)
        self._last_output_at = now
        if self._gap_from is not None:
            if self._metrics is not None:
                self._metrics.resume_gap_seconds.labels(self._model).observe(now - self._gap_from)
            self._gap_from = None

    def answer(self, asking: Resuming) -> Resume | Finish | Refuse:
        """What to tell the attempt that asks (and count it)."""
        if not self._chunks:
            return Resume(asking.request_id, asking.attempt, 0, "", "", 0)  # nothing sent: from the start
        sent = read_sent(self._chunks)
        if sent.finished and not sent.tool_calls:
            return self._count(Finish(), "finished")
        if sent.tool_calls:
            return self._count(Refuse("its tool call was cut mid-way"), "refused")
        if self.migrations >= self._max:
            return self._count(Refuse(f"it moved max_migrations ({self._max}) times already"), "refused")
        self.migrations += 1
        self._gap_from = self._last_output_at
        resume = Resume(asking.request_id, asking.attempt, sent.tokens, sent.text, sent.stream_id, sent.created)
        return self._count(resume, "resumed")

    def _count(self, decision: Resume | Finish | Refuse, outcome: str) -> Resume | Finish | Refuse:
        if self._metrics is not None:
            self._metrics.stream_migrations.labels(self._model, outcome).inc()
        return decision
