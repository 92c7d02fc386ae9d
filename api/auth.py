"""Who is calling, and may they use this model.

`[auth] modes` picks the authenticators: ``"api_key"`` (keys made by `hotq keys create`, sent as
``Authorization: Bearer hotq_...``), ``"globus"`` (Globus Auth access tokens, introspected), both,
or ``"none"`` (development only). Authentication runs once per request, in `AuthMiddleware`, before
a route reads the body or queues anything; the identity lands in ``request.state.identity`` and its
user becomes the envelope's ``caller``. `AccessPolicy` applies each model's
``allow_users``/``allow_groups``/``allow_domains``.

Caching keeps the hot path cheap: every API key not revoked sits in a dict keyed by its sha256
(refreshed from the job store every ``key_refresh_s``); a Globus token's introspection is reused for
min(``introspect_ttl_s``, time to expiry), a rejected one for ``failure_ttl_s``, group memberships for
``groups_ttl_s``. globus-sdk is synchronous, so its calls run in threads, one per distinct token at a
time (concurrent requests with the same token share one introspection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.bodies import discard_body
from api.errors import error_response
from broker.config import AuthConfig, Config, GlobusAuthConfig
from broker.errors import AuthenticationError, ConfigError, HotqError, PermissionDenied, ServiceUnavailable
from broker.jobstore import ANONYMOUS_USER, API_KEY_PREFIX, ApiKey, AsyncJobStore, hash_api_key

log = structlog.get_logger("hotq.auth")

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
# They name every model, queue and agent: with authentication on, only admins and the metrics token read them.
OPERATOR_PATHS = frozenset(["/metrics", "/ops/data"])
MAX_CACHED = 100_000  # entries per cache before expired ones are swept out
T = TypeVar("T")
V = TypeVar("V")


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


def _domain(username: str) -> str | None:
    return username.rsplit("@", 1)[1].lower() if "@" in username else None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _TTLCache(Generic[V]):
    """A dict of value and expiry (monotonic) that sweeps expired entries when it grows large."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[float, V]] = {}

    def get(self, key: str) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._data[key]
            return None
        return entry[1]

    def put(self, key: str, value: V, ttl_s: float) -> None:
        if len(self._data) >= MAX_CACHED:
            now = time.monotonic()
            self._data = {k: v for k, v in self._data.items() if v[0] > now}
            if len(self._data) >= MAX_CACHED:
                self._data.clear()
        self._data[key] = (time.monotonic() + ttl_s, value)


class _SingleFlight:
    """Concurrent calls for one key share one execution."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(work())
            self._running[key] = running
            running.add_done_callback(lambda _f: self._running.pop(key, None))
        return await asyncio.shield(running)


class ApiKeyAuthenticator:
    """Keys from the job store, held in memory by hash: a known key costs one sha256 and a dict lookup."""

    def __init__(self, store: AsyncJobStore, refresh_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._keys: dict[str, tuple[Identity, float | None]] = {}  # hash -> identity, expires_at
        self._rejected: _TTLCache[str] = (
            _TTLCache()
        )  # hashes the store does not know (or revoked), until the next refresh

    async def refresh(self) -> None:
        keys = await self._store.run(lambda db: db.keys.list(include_revoked=False))
        self._keys = {key.key_hash: self._entry(key) for key in keys}

    async def run(self) -> None:
        """Reload the keys every `refresh_s`, so revocations by `hotq keys revoke` take effect."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a locked or vanished database must not end the refresher
                log.exception("api_key_refresh_failed")
            await asyncio.sleep(self._refresh_s)

    @staticmethod
    def _entry(key: ApiKey) -> tuple[Identity, float | None]:
        domain = _domain(key.user)
        return Identity(user=key.user, method="api_key", domains=frozenset([domain] if domain else [])), key.expires_at

    async def authenticate(self, key: str) -> Identity:
        key_hash = hash_api_key(key)
        entry = self._keys.get(key_hash)
        if entry is None:
            entry = await self._lookup(key_hash)  # created since the last refresh, or unknown
        identity, expires_at = entry
        if expires_at is not None and expires_at <= time.time():
            raise AuthenticationError("the API key has expired")
        return identity

    async def _lookup(self, key_hash: str) -> tuple[Identity, float | None]:
        if (message := self._rejected.get(key_hash)) is not None:
            raise AuthenticationError(message)
        found = await self._store.run(lambda db: db.keys.find(key_hash))
        if found is None or found.revoked_at is not None:
            message = "the API key has been revoked" if found is not None else "the API key is not valid"
            self._rejected.put(key_hash, message, self._refresh_s)
            raise AuthenticationError(message)
        entry = self._entry(found)
        self._keys[key_hash] = entry
        return entry


class GlobusAuthenticator:
    """Globus Auth access tokens, introspected by hotq's confidential client; groups via dependent tokens."""

    def __init__(self, config: GlobusAuthConfig, client: Any) -> None:
        self.config = config
        self.client = client  # a globus_sdk.ConfidentialAppAuthClient
        self.audience = config.audience or str(client.client_id)
        self._introspected: _TTLCache[Identity | AuthenticationError] = (
            _TTLCache()
        )  # token hash -> Identity or the AuthenticationError
        self._groups: _TTLCache[frozenset[str]] = _TTLCache()  # identity id -> frozenset of group ids
        self._groups_tokens: _TTLCache[str] = _TTLCache()  # token hash -> groups access token
        self._flights = _SingleFlight()

    @classmethod
    def from_env(cls, config: GlobusAuthConfig) -> GlobusAuthenticator:
        import globus_sdk
        from globus_sdk.transport import RetryConfig

        client_id = os.environ.get(config.client_id_env)
        secret = os.environ.get(config.client_secret_env)
        if not client_id or not secret:
            raise ConfigError(
                f'[auth] mode "globus" needs the client id and secret in ${config.client_id_env}'
                f" and ${config.client_secret_env}"
            )
        # One quick retry at most: a client is waiting, and a failure answers 503 (not cached).
        retry = RetryConfig(max_retries=1, max_sleep=1)
        return cls(config, globus_sdk.ConfidentialAppAuthClient(client_id, secret, retry_config=retry))

    async def authenticate(self, token: str) -> Identity:
        key = _token_hash(token)
        cached = self._introspected.get(key)
        if cached is None:
            cached = await self._flights.run("i" + key, lambda: self._introspect(token, key))
        if isinstance(cached, AuthenticationError):
            raise cached
        return cached

    async def _introspect(self, token: str, key: str) -> Identity | AuthenticationError:
        data = await _globus_call(
            self.client.oauth2_token_introspect, token, include="identity_set,identity_set_detail"
        )
        now = time.time()
        try:
            identity, ttl_s = self._check(data, token, now), self.config.introspect_ttl_s
            ttl_s = min(ttl_s, float(data["exp"]) - now)
        except AuthenticationError as error:
            self._introspected.put(key, error, self.config.failure_ttl_s)
            log.info("globus_token_rejected", reason=error.message)
            return error
        self._introspected.put(key, identity, ttl_s)
        return identity

    def _check(self, data: dict[str, Any], token: str, now: float) -> Identity:
        if not data.get("active"):
            raise AuthenticationError("the access token is not active (expired or revoked)")
        exp, nbf = data.get("exp"), data.get("nbf")
        if not isinstance(exp, int | float) or exp <= now:
            raise AuthenticationError("the access token has expired")
        if isinstance(nbf, int | float) and nbf > now + 5:  # a little leeway for clock skew
            raise AuthenticationError("the access token is not valid yet")
        audience = data.get("aud") or []
        if isinstance(audience, str):
            audience = [audience]
        if self.audience not in audience:
            raise AuthenticationError("the access token was not issued for hotq (wrong audience)")
        required = self.config.required_scope
        if required and required not in str(data.get("scope", "")).split():
            raise AuthenticationError(f"the access token lacks the scope {required}")
        username = data.get("username")
        if not isinstance(username, str) or not username:
            raise AuthenticationError("the access token names no identity")
        usernames = [username] + [
            detail.get("username", "") for detail in data.get("identity_set_detail") or [] if isinstance(detail, dict)
        ]
        domains = frozenset(domain for name in usernames if (domain := _domain(name)))
        return Identity(user=username, method="globus", domains=domains, sub=data.get("sub"), token=token)

    async def groups(self, identity: Identity) -> frozenset[str]:
        """The ids of the caller's active Globus groups (cached per identity)."""
        key = identity.sub or identity.user
        cached = self._groups.get(key)
        if cached is None:
            cached = await self._flights.run("g" + key, lambda: self._lookup_groups(identity, key))
        return cached

    async def _lookup_groups(self, identity: Identity, key: str) -> frozenset[str]:
        import globus_sdk

        assert identity.token is not None
        token_key = _token_hash(identity.token)
        groups_token = self._groups_tokens.get(token_key)
        if groups_token is None:
            tokens = await _globus_call(
                self.client.oauth2_get_dependent_tokens, identity.token, scope=self.config.groups_scope
            )
            grant = tokens.by_resource_server.get(GROUPS_RESOURCE_SERVER)
            if grant is None:
                # hotq's scope does not list the Groups scope as a dependent scope: no group can match.
                log.warning("globus_no_groups_token", hint="add the Groups scope as a dependent scope of hotq's")
                self._groups.put(key, frozenset(), self.config.groups_ttl_s)
                return frozenset()
            groups_token = grant["access_token"]
            lifetime = float(grant.get("expires_at_seconds") or 0) - time.time() - 30
            if lifetime > 0:
                self._groups_tokens.put(token_key, groups_token, lifetime)
        groups_client = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(groups_token))
        answer = await _globus_call(groups_client.get_my_groups, statuses="active")
        groups = frozenset(str(group["id"]) for group in answer)
        self._groups.put(key, groups, self.config.groups_ttl_s)
        return groups


async def _globus_call(method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A globus-sdk call in a thread; Globus being down or refusing hotq's client is a 503."""
    import globus_sdk

    try:
        return await asyncio.to_thread(method, *args, **kwargs)
    except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as exc:
        log.warning("globus_call_failed", call=getattr(method, "__name__", "?"), error=str(exc)[:300])
        raise ServiceUnavailable(
            "Globus Auth cannot check the credentials now", retry_after_s=5, code="auth_unavailable"
        ) from None


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
