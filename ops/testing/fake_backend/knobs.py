"""What a test steers and reads: held requests (``fake_hold_file``, ``fake_pause_file``), delays, the counters."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from ops.testing.fake_backend.behaviour import JsonObj
from ops.testing.fake_backend.parsing import Common
from ops.testing.fake_backend.stats import Call

HOLD_POLL_S: Final = 0.02  # how often a held request looks for its file (and its client)


@dataclass(frozen=True)
class Hold:
    """Requests sent with `hold.field` in their body wait in the backend until `release()`."""

    path: Path  # the file whose existence releases them

    @property
    def field(self) -> JsonObj:
        return {"fake_hold_file": str(self.path)}

    def release(self) -> None:
        self.path.touch()


def fake_stats(url: str) -> JsonObj:
    """The counters of the fake backend at `url` (``GET /_stats``)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with no_proxy.open(url + "/_stats", timeout=30) as response:
        stats: JsonObj = json.load(response)
        return stats


async def released(request: Request, common: Common, hold_file: str | None = None) -> bool:
    """Hold the request until its hold file exists (if it has one); False if its client left first."""
    hold_file = hold_file or common.hold_file
    while hold_file is not None and not os.path.exists(hold_file):
        if await request.is_disconnected():
            return False
        await asyncio.sleep(HOLD_POLL_S)
    return True


async def delay_then_check_disconnect(request: Request, common: Common, call: Call) -> Response | None:
    if not await released(request, common):
        call.end(cancelled=True)
        return Response(status_code=499)  # nobody reads it; just stop
    if common.delay_s <= 0:
        return None
    await asyncio.sleep(common.delay_s)
    if await request.is_disconnected():
        call.end(cancelled=True)
        return Response(status_code=499)
    return None
