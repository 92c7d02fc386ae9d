"""GET /v1/usage: the token usage the job store recorded, for admins.

The answer is a list of sums per day, user, model and lane (``requests``,
``cancelled``, ``prompt_tokens``, ``completion_tokens``, ``total_tokens``),
filtered by the optional query parameters ``user``, ``model`` and ``since`` (a day,
YYYY-MM-DD, or the last N days, ``7d``). With ``[auth]`` on, only the users listed in
``[auth] admins`` may read it; without authentication the API serves loopback only,
so its caller is the operator.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.auth import AccessPolicy
from api.identity import identity_of
from broker.errors import InvalidRequest
from broker.jobstore import AsyncJobStore, since_day


class Usage:
    def __init__(self, store: AsyncJobStore) -> None:
        self._store = store
        self.policy: AccessPolicy | None = None  # set when [auth] is on

    async def list(self, request: Request) -> Response:
        if self.policy is not None:
            self.policy.require_admin(identity_of(request), "read usage")
        params = request.query_params
        since = params.get("since")
        try:
            first_day = since_day(since) if since is not None else None
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="since") from None
        user, model = params.get("user"), params.get("model")
        rows = await self._store.run(lambda db: db.usage.totals(user, model, first_day))
        return JSONResponse({"object": "list", "data": rows})
