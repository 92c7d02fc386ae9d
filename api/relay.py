"""Following one request's reply frames on the API side.

The rules that make delivery at-least-once safe for the client live here:
- frames belong to an *attempt* (one delivery of the request to a consumer);
  the relay follows the latest attempt that announced itself (with `Started`,
  or with its first output when it answered fast);
- a new attempt that asks what the client already got (`Resuming`: a consumer took
  the redelivered stream) becomes the followed one and continues the stream after
  what was sent (`api/migration.py` decides, and counts the migrations); the attempts
  left behind are ignored from then on;
- any other new attempt after output already reached the client cannot continue the
  stream seamlessly: the client gets `WorkerLost`, not a silent cut or a duplicated
  answer;
- stale frames (an older attempt, a repeated sequence number) are dropped;
- until some consumer starts the request it may wait `max_queue_wait_s`; past
  that it waits on while the scaler says capacity is coming (an agent launching,
  starting or loading: a cold start), up to the request's deadline, and gets
  `NoCapacity` (a 503 with the scaler's reason and estimated Retry-After) as soon
  as none is; after a consumer started it, the request deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from api.migration import Finish, Refuse, StreamMigration
from broker.errors import DeadlineExceeded, HotqError, NoCapacity, WorkerLost
from broker.messages import (
    ANNOUNCE_AFTER_S,
    Cancel,
    ChunkBatch,
    Control,
    Final,
    ModelOutlook,
    ReplyFrame,
    Resuming,
    Started,
)
from producers.request_client import ReplyItem


def _opens_attempt(frame: ReplyFrame) -> bool:
    """Whether a frame can be the first one an attempt sends (`Started` is sent only
    when an answer takes a while, so a fast answer starts with its first output)."""
    return not isinstance(frame, ChunkBatch) or frame.seq == 0


OUTLOOK_RECHECK_S = 1.0  # how often a request held for a cold start asks the scaler's outlook again


class ReplyRelay:
    def __init__(
        self,
        replies: asyncio.Queue[ReplyItem],
        deadline: float,
        max_queue_wait_s: float,
        outlook: Callable[[], ModelOutlook | None] = lambda: None,
        scaler_grace_s: float = 0.0,
        cluster: str | None = None,
        migration: StreamMigration | None = None,
        answer: Callable[[Control], object] = lambda _: None,
    ) -> None:
        """`migration` follows what the client got; `answer` sends a consumer that asks
        (`Resuming`) its `Resume` or `Cancel`. `outlook` gives the scaler's latest word on
        the model's capacity (None: no scaler speaks);
        for a model a scaler runs, `scaler_grace_s` more is given for its word to come (a scaler
        that has just started speaks after a few seconds). A request pinned to `cluster` waits
        only for capacity there."""
        now = time.monotonic()
        self._replies = replies
        self._submitted = now
        # A consumer announces itself only after ANNOUNCE_AFTER_S; allow for that.
        self._start_by = now + max_queue_wait_s + ANNOUNCE_AFTER_S + 1.0
        self._max_queue_wait_s = max_queue_wait_s
        self._outlook = outlook
        self._unheard_until = self._start_by + scaler_grace_s
        self._scaler_expected = scaler_grace_s > 0
        self._cluster = cluster
        self._deadline = now + max(0.0, deadline - time.time())
        self.queue_wait_s: float | None = None  # from submission until a consumer took it
        self._attempt: str | None = None
        self._left: set[str] = set()  # attempts a migration left behind
        self._migration = migration or StreamMigration("", 0)
        self._answer = answer
        self._next_seq = 0
        self.sent_output = False
        self.finished = False  # a consumer sent the final frame: nothing is left to cancel

    async def next_output(self, wait_s: float) -> bytes | Final | None:
        """The next thing for the client: stream bytes, the `Final` frame, or None if
        `wait_s` passed without either. Raises `HotqError` when the answer is an error."""
        give_up = time.monotonic() + wait_s
        while True:
            limit = self._start_by if self._attempt is None else self._deadline
            now = time.monotonic()
            if now >= limit:
                if self._attempt is None and now < self._deadline and self._capacity_coming(now):
                    self._start_by = min(now + OUTLOOK_RECHECK_S, self._deadline)
                    continue
                if self._attempt is None and now < self._deadline:
                    raise self._no_capacity()
                if self._attempt is None:
                    raise DeadlineExceeded("the request's deadline passed while it waited for an agent to become hot")
                raise DeadlineExceeded("the request's deadline passed before the answer was complete")
            if now >= give_up:
                return None
            try:
                async with asyncio.timeout(min(limit, give_up) - now):
                    item = await self._replies.get()
            except TimeoutError:
                continue
            output = self._accept(item)
            if output is not None:
                return output

    def _why_not_coming(self, outlook: ModelOutlook) -> str:
        """Why no capacity can come for this request ("" when it is there or coming)."""
        if self._cluster is not None and not outlook.reason.startswith("the model's agent failed"):
            return outlook.pinned.get(self._cluster, "")
        return outlook.reason

    def _capacity_coming(self, now: float) -> bool:
        outlook = self._outlook()
        return not self._why_not_coming(outlook) if outlook is not None else now < self._unheard_until

    def _no_capacity(self) -> NoCapacity:
        outlook = self._outlook()
        if outlook is None or not self._why_not_coming(outlook):
            unheard = "; no scaler said whether capacity is coming (is `hotq scale` running?)"
            return NoCapacity(
                f"no consumer took the request within {self._max_queue_wait_s:g} s; the model has no free capacity"
                + (unheard if outlook is None and self._scaler_expected else ""),
                retry_after_s=max(1, int(self._max_queue_wait_s)),
            )
        return NoCapacity(
            f"no consumer took the request within {self._max_queue_wait_s:g} s and no capacity is coming: "
            f"{self._why_not_coming(outlook)}",
            retry_after_s=max(1, round(outlook.retry_after_s)),
        )

    def _accept(self, item: ReplyItem) -> bytes | Final | None:
        if isinstance(item, HotqError):
            raise item
        if isinstance(item, Resuming):
            return self._resuming(item)
        if item.attempt != self._attempt:
            if item.attempt in self._left or not _opens_attempt(item):
                return None  # from an attempt we are no longer following
            if self.sent_output:
                raise WorkerLost("the consumer serving this stream was lost after output was sent; retry the request")
            self._follow(item.attempt, item)
        if isinstance(item, Started):
            return None
        if isinstance(item, ChunkBatch):
            if item.seq != self._next_seq:
                return None
            self._next_seq += 1
            self.sent_output = True
            self._migration.note_output(item.data)
            return item.data
        self.finished = True
        if isinstance(item, Final):
            return item
        raise HotqError(item.message, status=item.status, error_type=item.error_type, code=item.code, param=item.param)

    def _resuming(self, asking: Resuming) -> bytes | Final | None:
        """A consumer took the redelivered request and asks what the client already got."""
        if asking.attempt == self._attempt or asking.attempt in self._left:
            return None
        decision = self._migration.answer(asking)
        if isinstance(decision, Refuse):
            # Cancelled at the consumer as the stream ends (the relay is not finished).
            raise WorkerLost(f"the consumer serving this stream was lost and {decision.reason}; retry the request")
        if isinstance(decision, Finish):
            self._answer(Cancel(asking.request_id))
            self.finished = True
            return Final(asking.request_id, asking.attempt, 0, 200, b"", None)  # only [DONE] was missing
        self._follow(asking.attempt, asking)
        self._answer(decision)
        return None

    def _follow(self, attempt: str, first: ReplyFrame) -> None:
        if self._attempt is not None:
            self._left.add(self._attempt)
        self._attempt = attempt
        self._next_seq = 0
        if self.queue_wait_s is None:  # `Started` comes ANNOUNCE_AFTER_S late; a fast first output is exact
            late = ANNOUNCE_AFTER_S if isinstance(first, Started) else 0.0
            self.queue_wait_s = max(0.0, time.monotonic() - self._submitted - late)

    async def final(self) -> Final:
        """Wait for the complete answer of a non-streaming request."""
        while True:
            output = await self.next_output(float("inf"))
            if isinstance(output, Final):
                return output
