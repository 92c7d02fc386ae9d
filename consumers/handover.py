"""Taking over a stream another consumer started: ask the API what its client already got.

A redelivered stream may have sent part of its answer before its consumer died or handed it
over; only the API knows how much reached the client. So the consumer that takes it sends
`Resuming` and waits for the API's `Resume` (on the control exchange, which every consumer
reads) before it calls the backend; the API answers `Cancel` instead when the stream must
not go on (its client left, or it cannot be continued), which cancels the waiting attempt
like any other cancel.
"""

from __future__ import annotations

import asyncio

from broker.messages import Resume, Resuming
from consumers.replies import ReplySender

# An API that does not answer (one that does not know `Resuming`) leaves the stream ending as
# before migration existed: with an error event.
RESUME_WAIT_S = 30.0


class ResumeWaits:
    """The attempts waiting for their `Resume`, by request id and attempt."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], asyncio.Future[Resume]] = {}

    def deliver(self, resume: Resume) -> bool:
        """Hand `resume` to the attempt waiting for it; False if none here is."""
        future = self._waiting.get((resume.request_id, resume.attempt))
        if future is None or future.done():
            return False
        future.set_result(resume)
        return True

    async def ask(self, replies: ReplySender, asking: Resuming, wait_s: float = RESUME_WAIT_S) -> Resume | None:
        """Send `asking` and wait for its answer; None if none came within `wait_s`."""
        key = (asking.request_id, asking.attempt)
        future: asyncio.Future[Resume] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future  # before asking: the answer may come at once
        try:
            await replies.send(asking)
            async with asyncio.timeout(wait_s):
                return await future
        except TimeoutError:
            return None
        finally:
            del self._waiting[key]
