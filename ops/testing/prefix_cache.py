"""The fake backend's prefix cache: an LRU of prompt blocks, and prefill time for what it misses.

A prompt (its words, as the fake backend counts tokens) is cut into blocks of
`BLOCK_TOKENS`; each block is known by a hash chained over every block before it, as
vLLM's automatic prefix caching does, so a block is a hit only when the whole prefix up
to it was seen. A request's prefill sleeps `prefill_ms_per_token` for each token not
cached, so placement that finds the cache shows up as a shorter time to first token.
Counters in vLLM's names at ``GET /metrics``.

Set by environment (the agent starts the backend; a model's ``env`` reaches it):
``HOTQ_FAKE_PREFILL_MS_PER_TOKEN`` (default 0: no prefill time, counting only) and
``HOTQ_FAKE_CACHE_BLOCKS`` (default 4096).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

BLOCK_TOKENS = 16


class PrefixCache:
    def __init__(self, prefill_ms_per_token: float = 0.0, capacity_blocks: int = 4096) -> None:
        self.prefill_s_per_token = prefill_ms_per_token / 1000
        self.capacity = capacity_blocks
        self._blocks: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.queries = 0  # tokens looked up
        self.hits = 0  # of those, found cached

    @classmethod
    def from_env(cls) -> PrefixCache:
        return cls(
            float(os.environ.get("HOTQ_FAKE_PREFILL_MS_PER_TOKEN", "0")),
            int(os.environ.get("HOTQ_FAKE_CACHE_BLOCKS", "4096")),
        )

    def lookup(self, tokens: Sequence[str]) -> int:
        """How many leading tokens were cached; caches every full block of `tokens` from now on."""
        cached, missed, chained = 0, False, b""
        for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            chained = hashlib.blake2b(chained + "\0".join(tokens[start : start + BLOCK_TOKENS]).encode()).digest()
            if not missed and chained in self._blocks:
                cached += BLOCK_TOKENS
                self._blocks.move_to_end(chained)
            else:
                missed = True
                self._blocks[chained] = None
                if len(self._blocks) > self.capacity:
                    self._blocks.popitem(last=False)
        self.queries += len(tokens)
        self.hits += cached
        return cached

    async def prefill(self, tokens: Sequence[str]) -> None:
        uncached = len(tokens) - self.lookup(tokens)
        if self.prefill_s_per_token > 0 and uncached > 0:
            await asyncio.sleep(uncached * self.prefill_s_per_token)

    async def metrics(self, _request: Request) -> Response:
        return PlainTextResponse(
            f"vllm:prefix_cache_queries_total {self.queries}\nvllm:prefix_cache_hits_total {self.hits}\n"
        )
