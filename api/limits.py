"""Per-user limits and fair share for interactive requests, in memory, O(1) per request.

Every (user, model) pair has at most three counters: a token bucket of requests (`requests_per_minute`
capacity, refilled continuously), a token bucket of model tokens (`tokens_per_minute`; a request is
admitted while the bucket is above zero and charged the prompt + completion tokens its answer
reports, so one large answer can put the bucket in debt; a request the client left is charged
what the consumer reports at the cut: the backend's count, or its estimate on a backend that gives
none, see consumers/stream_usage.py), and the number of its requests in flight
(`max_concurrent_per_user`). A user over any of them gets 429 with `Retry-After` at once, before
anything is queued: a flood of one user cannot fill a model's queue ahead of everyone else.

The API runs on one event loop and nothing here suspends, so checking and counting need no lock. Several
API processes (`hotq serve --workers N`) share their counters instead: `api.shared_limits`. Batch
lines never come through here (the BatchManager submits
them), so batch work is never rejected; it waits in its lane.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from broker.config import Config, LimitsConfig
from broker.errors import RateLimited

MAX_STATES = 100_000  # (user, model) pairs kept before idle ones are swept out


class UserState:
    __slots__ = ("requests", "tokens", "updated", "inflight")

    def __init__(self, limits: LimitsConfig, now: float) -> None:
        self.requests = float(limits.requests_per_minute or 0)
        self.tokens = float(limits.tokens_per_minute or 0)
        self.updated = now
        self.inflight = 0

    def refill(self, limits: LimitsConfig, now: float) -> None:
        elapsed = max(0.0, now - self.updated)  # (a wall clock shared by processes may step back)
        self.updated = now
        if limits.requests_per_minute:
            rpm = limits.requests_per_minute
            self.requests = min(float(rpm), self.requests + elapsed * rpm / 60.0)
        if limits.tokens_per_minute:
            tpm = limits.tokens_per_minute
            self.tokens = min(float(tpm), self.tokens + elapsed * tpm / 60.0)

    def take(self, limits: LimitsConfig, user: str, model: str) -> None:
        """Count a request in (after `refill`), or raise RateLimited."""
        cap = limits.max_concurrent_per_user
        if cap and self.inflight >= cap:
            raise RateLimited(
                f"{user} already has {self.inflight} requests in flight on `{model}`; the limit is {cap}",
                retry_after_s=1,
            )
        if limits.requests_per_minute and self.requests < 1:
            wait = (1 - self.requests) * 60.0 / limits.requests_per_minute
            raise RateLimited(
                f"{user} is over {limits.requests_per_minute} requests per minute on `{model}`",
                retry_after_s=max(1, math.ceil(wait - 1e-6)),  # 1e-6: float noise must not add a second
            )
        if limits.tokens_per_minute and self.tokens <= 0:
            wait = (-self.tokens + 1) * 60.0 / limits.tokens_per_minute
            raise RateLimited(
                f"{user} is over {limits.tokens_per_minute} tokens per minute on `{model}`",
                retry_after_s=max(1, math.ceil(wait - 1e-6)),  # 1e-6: float noise must not add a second
            )
        if limits.requests_per_minute:
            self.requests -= 1
        self.inflight += 1

    def charge(self, limits: LimitsConfig, usage: dict[str, int] | None) -> None:
        if usage and limits.tokens_per_minute:
            self.tokens -= usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)

    def idle(self, limits: LimitsConfig) -> bool:
        return (
            self.inflight == 0
            and self.requests >= (limits.requests_per_minute or 0)
            and self.tokens >= (limits.tokens_per_minute or 0)
        )


class Limiter:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = {
            name: model.limits if model.limits is not None else config.limits for name, model in config.models.items()
        }
        self._states: dict[tuple[str, str], UserState] = {}
        self._clock = clock

    def limits(self, model: str) -> LimitsConfig | None:
        limits = self._limits.get(model)
        return limits if limits is not None and limits.enabled else None

    async def admit(self, user: str, model: str) -> Callable[[dict[str, int] | None], None] | None:
        """Count a request in, or raise RateLimited; returns the callback that counts it out (once).

        Awaited like `SharedLimiter.admit`; it never suspends, so the check and the count stay one step."""
        limits = self.limits(model)
        if limits is None:
            return None
        now = self._clock()
        key = (user, model)
        state = self._states.get(key)
        if state is None:
            if len(self._states) >= MAX_STATES:
                self._sweep(now)
            state = self._states[key] = UserState(limits, now)
        else:
            state.refill(limits, now)
        state.take(limits, user, model)
        done = False

        def release(usage: dict[str, int] | None) -> None:
            nonlocal done
            if done:
                return
            done = True
            state.inflight -= 1
            self._charge(state, limits, usage)

        return release

    def charge(self, user: str, model: str, usage: dict[str, int] | None) -> None:
        """Charge tokens that arrive after the request left the user's limits (a stream the client
        left: the consumer reports what the backend generated until it stopped)."""
        limits = self.limits(model)
        if not usage or limits is None or not limits.tokens_per_minute:
            return
        state = self._states.get((user, model))
        if state is None:
            now = self._clock()
            if len(self._states) >= MAX_STATES:
                self._sweep(now)
            state = self._states[(user, model)] = UserState(limits, now)
        self._charge(state, limits, usage)

    def close(self) -> None:
        """Nothing to let go (`SharedLimiter.close` closes its database)."""

    def _charge(self, state: UserState, limits: LimitsConfig, usage: dict[str, int] | None) -> None:
        if usage and limits.tokens_per_minute:
            state.refill(limits, self._clock())
            state.charge(limits, usage)

    def _sweep(self, now: float) -> None:
        for key, state in list(self._states.items()):
            limits = self._limits.get(key[1])
            if limits is not None:
                state.refill(limits, now)
            if limits is None or state.idle(limits):
                del self._states[key]
