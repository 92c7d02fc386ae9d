"""Who is calling: the identity the middleware attaches to a request, and what it may see."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from broker.jobstore import ANONYMOUS_USER


@dataclass(frozen=True, slots=True)
class Identity:
    user: str  # the envelope's `caller`: the key's user, or the Globus username
    method: str  # "api_key", "globus" or "none"
    domains: frozenset[str] = frozenset()  # identity-provider domains of every identity in the set
    sub: str | None = None  # the Globus identity id
    token: str | None = field(default=None, repr=False)  # the Globus token, for the groups lookup


ANONYMOUS = Identity(user=ANONYMOUS_USER, method="none")


def identity_of(request: Request) -> Identity:
    """The caller the middleware authenticated (anonymous when auth is off)."""
    identity: Identity = request.scope.get("state", {}).get("identity", ANONYMOUS)
    return identity


def owner_filter(request: Request) -> str | None:
    """Whose files and batches the caller may see: their own; everyone's when authentication is
    off (every caller is then the one local operator, who also submits with `hotq submit`)."""
    identity = identity_of(request)
    return None if identity.method == "none" else identity.user


def domain_of(username: str) -> str | None:
    """The identity provider's domain of a username such as ``ada@uni.edu``."""
    return username.rsplit("@", 1)[1].lower() if "@" in username else None
