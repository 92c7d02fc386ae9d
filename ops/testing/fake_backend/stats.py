"""The backend's counters (``GET /_stats``), and one request's life in them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ops.testing.fake_backend.behaviour import JsonObj


@dataclass
class FakeStats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    active: int = 0
    generation: int = 0
    cancelled_tags: dict[str, float] = field(default_factory=dict)
    cancelled_tags_monotonic: dict[str, float] = field(default_factory=dict)
    cancelled_after_tokens: dict[str, int] = field(default_factory=dict)
    started_order: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        # "active" is left alone: it counts real in-flight requests, which a reset can't end.
        self.started = self.completed = self.cancelled = 0
        self.cancelled_tags.clear()
        self.cancelled_tags_monotonic.clear()
        self.cancelled_after_tokens.clear()
        self.started_order.clear()
        self.generation += 1

    def as_json(self) -> JsonObj:
        return {
            "started": self.started,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "active": self.active,
            "cancelled_tags": dict(self.cancelled_tags),
            "cancelled_tags_monotonic": dict(self.cancelled_tags_monotonic),
            "cancelled_after_tokens": dict(self.cancelled_after_tokens),
            "started_order": dict(self.started_order),
        }


class Call:
    """Lifecycle of one inference request; end() is idempotent so every exit path can call it."""

    def __init__(self, stats: FakeStats, tag: str | None) -> None:
        self._stats = stats
        self._tag = tag
        self._generation = stats.generation
        self._open = True
        self.tokens_sent = 0  # stream positions written so far (each choice's tokens up to it)
        stats.started += 1
        stats.active += 1
        if tag is not None:
            stats.started_order[tag] = stats.started

    def end(self, *, cancelled: bool) -> None:
        if not self._open:
            return
        self._open = False
        stats = self._stats
        stats.active -= 1
        if stats.generation != self._generation:
            return  # started before a /_reset: don't pollute the fresh counters
        if not cancelled:
            stats.completed += 1
            return
        stats.cancelled += 1
        if self._tag is not None:
            stats.cancelled_tags[self._tag] = time.time()
            stats.cancelled_tags_monotonic[self._tag] = time.monotonic()
            stats.cancelled_after_tokens[self._tag] = self.tokens_sent
