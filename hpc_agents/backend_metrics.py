"""The backend's prefix-cache counters, read from its Prometheus `/metrics` for the heartbeat.

vLLM counts, in tokens, what its prefix cache was asked for and what it held:
``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total`` (one sample per
engine; summed). The fake backend serves the same two. A backend without them reports none.
"""

from __future__ import annotations

import aiohttp
import structlog

log = structlog.get_logger("hotq.agent")

QUERIES = "vllm:prefix_cache_queries_total"
HITS = "vllm:prefix_cache_hits_total"
TIMEOUT_S = 2.0


def parse_prefix_cache(text: str) -> tuple[int, int] | None:
    """(queries, hits) from a Prometheus text page, or None if it has neither counter."""
    totals = {QUERIES: 0.0, HITS: 0.0}
    seen = False
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            try:
                totals[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            seen = True
    return (int(totals[QUERIES]), int(totals[HITS])) if seen else None


class PrefixCacheReader:
    """Reads one backend's counters; keeps the last good reading through a failed one."""

    def __init__(self, base_url: str) -> None:
        self._url = base_url.rstrip("/") + "/metrics"
        self.last: tuple[int, int] = (0, 0)

    async def read(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        try:
            async with session.get(self._url, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as response:
                if response.status == 200:
                    counters = parse_prefix_cache(await response.text())
                    if counters is not None:
                        self.last = counters
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("backend_metrics_unread", error=repr(exc))
        return self.last
