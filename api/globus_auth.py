"""Globus Auth access tokens: introspected by hotq's confidential client (cached for
min(``introspect_ttl_s``, time to expiry), a rejection for ``failure_ttl_s``), and the caller's
groups through a dependent token (cached for ``groups_ttl_s``). globus-sdk is synchronous, so
its calls run in threads, one per distinct token at a time."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from api.auth_caches import SingleFlight, TTLCache
from api.identity import Identity, domain_of
from broker.config import GlobusAuthConfig
from broker.errors import AuthenticationError, ConfigError, ServiceUnavailable

log = structlog.get_logger("hotq.auth")

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"

T = TypeVar("T")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class GlobusAuthenticator:
    """Globus Auth access tokens, introspected by hotq's confidential client; groups via dependent tokens."""

    def __init__(self, config: GlobusAuthConfig, client: Any) -> None:
        self.config = config
        self.client = client  # a globus_sdk.ConfidentialAppAuthClient
        self.audience = config.audience or str(client.client_id)
        self._introspected: TTLCache[Identity | AuthenticationError] = (
            TTLCache()
        )  # token hash -> Identity or the AuthenticationError
        self._groups: TTLCache[frozenset[str]] = TTLCache()  # identity id -> frozenset of group ids
        self._groups_tokens: TTLCache[str] = TTLCache()  # token hash -> groups access token
        self._flights = SingleFlight()

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
        domains = frozenset(domain for name in usernames if (domain := domain_of(name)))
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
