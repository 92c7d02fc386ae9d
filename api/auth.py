"""Who is calling, and may they use this model.

`[auth] modes` picks the authenticators: ``"api_key"`` (keys made by `hotq keys create`, sent as
``Authorization: Bearer hotq_...``), ``"globus"`` (Globus Auth access tokens, introspected), both,
or ``"none"`` (development only). Authentication runs once per request, in `AuthMiddleware`, before
a route reads the body or queues anything; the identity lands in ``request.state.identity`` and its
user becomes the envelope's ``caller``. `AccessPolicy` applies each model's
``allow_users``/``allow_groups``/``allow_domains``.

The authenticators live apart (`api.api_keys`, `api.globus_auth`, sharing `api.auth_caches`);
caching keeps the hot path cheap: a known API key costs a sha256 and a dict lookup, a Globus
token's introspection and groups are reused for as long as the config allows. The caller's
`Identity` is in `api.identity`.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.api_keys import ApiKeyAuthenticator
from api.bodies import discard_body
from api.errors import error_response
from api.globus_auth import GlobusAuthenticator
from api.identity import Identity
from broker.config import AuthConfig, Config
from broker.errors import AuthenticationError, ConfigError, HotqError, PermissionDenied
from broker.jobstore import API_KEY_PREFIX, AsyncJobStore

log = structlog.get_logger("hotq.auth")

# They name every model, queue and agent: with authentication on, only admins and the metrics token read them.
OPERATOR_PATHS = frozenset(["/metrics", "/ops/data"])


class Authenticator:
    """Reads the bearer credential and hands it to the authenticator its form calls for."""

    def __init__(self, config: AuthConfig, keys: ApiKeyAuthenticator | None, globus: GlobusAuthenticator | None):
        self.config = config
        self.keys = keys
        self.globus = globus
        self.metrics_token = os.environ.get(config.metrics_token_env) or None

    async def operator(self, authorization: str | None) -> None:
        """Let the metrics token or an admin read the operator endpoints; refuse anyone else."""
        token = self.metrics_token
        if token is not None and authorization is not None:
            if hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
                return
        identity = await self.authenticate(authorization)
        if identity.user not in self.config.admins:
            raise PermissionDenied(
                f"only an admin ([auth] admins) or the metrics token may read this, not {identity.user}"
            )

    async def authenticate(self, authorization: str | None) -> Identity:
        if not authorization:
            raise AuthenticationError("an `Authorization: Bearer ...` header is required")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationError("the Authorization header must be `Bearer <key or token>`")
        if credential.startswith(API_KEY_PREFIX):
            if self.keys is None:
                raise AuthenticationError("API keys are not accepted here")
            return await self.keys.authenticate(credential)
        if self.globus is None:
            raise AuthenticationError("the API key is not valid")
        return await self.globus.authenticate(credential)


class AccessPolicy:
    """Each model's allow lists; a model without any is open to every authenticated caller."""

    def __init__(self, config: Config, globus: GlobusAuthenticator | None) -> None:
        self._models = {name: model for name, model in config.models.items() if model.restricted}
        self._admins = frozenset(config.auth.admins if config.auth is not None else ())
        self._globus = globus

    async def allowed(self, identity: Identity, model: str) -> bool:
        rules = self._models.get(model)
        if rules is None:
            return True
        if identity.user in rules.allow_users or not identity.domains.isdisjoint(rules.allow_domains):
            return True
        if rules.allow_groups and identity.method == "globus" and self._globus is not None:
            return not (await self._globus.groups(identity)).isdisjoint(rules.allow_groups)
        return False

    async def require(self, identity: Identity, model: str) -> None:
        if not await self.allowed(identity, model):
            raise PermissionDenied(f"{identity.user} may not use the model `{model}`", param="model")

    async def visible(self, identity: Identity, models: Iterable[str]) -> list[str]:
        return [name for name in models if await self.allowed(identity, name)]

    def require_admin(self, identity: Identity, what: str) -> None:
        if identity.user not in self._admins:
            raise PermissionDenied(f"only an admin ([auth] admins) may {what}; {identity.user} is not one")


class AuthMiddleware:
    """Authenticates every request under /v1/ (and to the operator endpoints) before its route runs;
    failures answer 401 (or 403, 503)."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operator = scope["type"] == "http" and scope["path"] in OPERATOR_PATHS
        if scope["type"] != "http" or not (operator or scope["path"].startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        identity: Identity | None = None
        try:
            if operator:
                await self.authenticator.operator(authorization)
            else:
                identity = await self.authenticator.authenticate(authorization)
        except HotqError as error:
            response = error_response(error)
            if error.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            await discard_body(Request(scope, receive))  # a client still sending reads the answer too
            await response(scope, receive, send)
            return
        except Exception:
            log.exception("authentication_failed_unexpectedly")
            await error_response(HotqError("internal error in hotq; see the server log"))(scope, receive, send)
            return
        if identity is not None:
            scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)


@dataclass
class Auth:
    """What create_app wires in: the middleware's authenticator, the policy and the key refresher."""

    authenticator: Authenticator | None
    policy: AccessPolicy | None
    keys: ApiKeyAuthenticator | None

    async def run(self) -> None:
        if self.keys is not None:
            await self.keys.run()


def build_auth(config: Config, store: AsyncJobStore) -> Auth:
    auth = config.auth
    if auth is None or not auth.enabled:
        return Auth(None, None, None)
    keys = ApiKeyAuthenticator(store, auth.key_refresh_s) if "api_key" in auth.modes else None
    globus = GlobusAuthenticator.from_env(auth.globus) if "globus" in auth.modes else None
    return Auth(Authenticator(auth, keys, globus), AccessPolicy(config, globus), keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def check_bind(config: Config, host: str) -> str | None:
    """Refuse an unauthenticated API on anything but loopback; the warning to print for mode "none"."""
    auth = config.auth
    if auth is not None and auth.enabled:
        if "globus" in auth.modes:
            GlobusAuthenticator.from_env(auth.globus)  # fails now, not at the first request
        return None
    if not is_loopback(host):
        why = 'with [auth] modes = ["none"]' if auth is not None else "without an [auth] table"
        raise ConfigError(
            f"refusing to serve {host} {why}: anyone who can reach it could use every model."
            ' Bind 127.0.0.1, or set [auth] modes = ["api_key"] and/or ["globus"].'
        )
    if auth is not None:
        return (
            '!!! [auth] modes = ["none"]: AUTHENTICATION IS OFF. Every caller is "anonymous" and may use every'
            " model. For development only; serving loopback only. !!!"
        )
    return None
