"""Issue 6, authentication and per-model access: API keys and Globus Auth tokens, over real sockets.

Globus is offline: `globus_sdk.testing` registered responses (the `responses` library) answer
token introspection, dependent tokens and Groups `get_my_groups`. `responses` patches `requests`
only inside this process, so the API under test runs here (uvicorn in a thread, a real socket);
the openai client (httpx) and the workers (subprocesses) are untouched by it. API keys are made and
revoked with the real `hotq keys` CLI against the same job store.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import responses
import uvicorn
from globus_sdk.testing import RegisteredResponse
from responses import matchers

from api.api_keys import ApiKeyAuthenticator
from api.app import create_app
from broker.config import load_config
from broker.errors import AuthenticationError
from broker.jobstore import AsyncJobStore, JobStore
from ops.processes import free_port, wait_until
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S, STOP_S, in_growing_windows
from ops.testing.fake_backend import running_fake_backend
from ops.testing.http import openai_client
from ops.testing.stack import Stack, create_key, run_hotq, write_config

CLIENT_ID = "5d6a2b36-7d4e-4c4c-9a55-000000000001"
AUDIENCE = "hotq.example.org"
SCOPE = "https://auth.globus.org/scopes/hotq.example.org/inference"
GROUP = "d3974728-6458-11e4-b72d-123139141556"  # in globus_sdk.testing's get_my_groups fixture
OTHER_GROUP = "99d2a548-7218-11e2-adc0-12313d2d6e7f"
GLOBUS_ENV = {"HOTQ_GLOBUS_CLIENT_ID": CLIENT_ID, "HOTQ_GLOBUS_CLIENT_SECRET": "test-secret"}


# -- Globus, offline -----------------------------------------------------------


def _form_has(field: str, value: str) -> Callable[[Any], tuple[bool, str]]:
    """A `responses` matcher: the form-encoded body carries field=value."""

    def match(request: Any) -> tuple[bool, str]:
        body = request.body or ""
        params = urllib.parse.parse_qs(body.decode() if isinstance(body, bytes) else body)
        ok = params.get(field) == [value]
        return ok, "" if ok else f"{field} is not {value}"

    return match


def _introspection(username: str, *, linked: tuple[str, ...] = (), **override: Any) -> dict[str, Any]:
    now = int(time.time())
    data = {
        "active": True,
        "token_type": "Bearer",
        "scope": f"{SCOPE} openid",
        "client_id": "some-native-app",
        "username": username,
        "sub": f"sub-{username}",
        "exp": now + 3600,
        "iat": now - 10,
        "nbf": now - 10,
        "aud": [AUDIENCE, CLIENT_ID],
        "iss": "https://auth.globus.org",
        "identity_set": [f"sub-{name}" for name in (username, *linked)],
        "identity_set_detail": [{"sub": f"sub-{name}", "username": name} for name in (username, *linked)],
    }
    data.update(override)
    return data


TOKENS: dict[str, dict[str, Any]] = {
    # alice: in GROUP; her primary identity is at uchicago.edu, a linked one at anl.gov
    "tok-alice": _introspection("alice@uchicago.edu", linked=("alice@anl.gov",)),
    "tok-bob": _introspection("bob@example.org"),  # in no allowed group, no allowed domain
    "tok-dave": _introspection("dave@example.org"),  # only for the introspection-cache test
    "tok-erin": _introspection("erin@example.org"),  # only for the groups-cache test; in GROUP
    "tok-inactive": {"active": False},
    "tok-expired": _introspection("old@example.org", exp=int(time.time()) - 60),
    "tok-wrong-aud": _introspection("mallory@example.org", aud=["some-other-service"]),
    "tok-no-scope": _introspection("nina@example.org", scope="openid email"),
}
GROUPS = {"tok-alice": [GROUP, OTHER_GROUP], "tok-bob": [OTHER_GROUP], "tok-dave": [], "tok-erin": [GROUP]}


def _register_globus() -> None:
    for token, data in TOKENS.items():
        RegisteredResponse(
            service="auth",
            path="/v2/oauth2/token/introspect",
            method="POST",
            json=data,
            match=[_form_has("token", token)],
        ).add()
    RegisteredResponse(
        service="auth",
        path="/v2/oauth2/token/introspect",
        method="POST",
        status=500,
        json={"errors": [{"code": "InternalError", "status": "500"}]},
        match=[_form_has("token", "tok-globus-down")],
    ).add()
    for token, groups in GROUPS.items():
        groups_token = f"groups-{token}"
        RegisteredResponse(  # the shape of globus_sdk.testing's "groups" dependent-token case
            service="auth",
            path="/v2/oauth2/token",
            method="POST",
            json=[
                {
                    "scope": "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships",
                    "access_token": groups_token,
                    "token_type": "bearer",
                    "expires_in": 3600,
                    "resource_server": "groups.api.globus.org",
                }
            ],
            match=[_form_has("token", token), _form_has("grant_type", "urn:globus:auth:grant_type:dependent_token")],
        ).add()
        RegisteredResponse(
            service="groups",
            path="/v2/groups/my_groups",
            method="GET",
            json=[{"id": group, "name": f"group {group[:4]}", "my_memberships": []} for group in groups],
            match=[matchers.header_matcher({"Authorization": f"Bearer {groups_token}"})],
        ).add()


def _calls(path: str, **form: str) -> int:
    """How many HTTP calls went to a Globus path (with these form fields)."""
    count = 0
    for call in responses.calls:
        if not urllib.parse.urlparse(call.request.url or "").path.endswith(path):
            continue
        if all(_form_has(field, value)(call.request)[0] for field, value in form.items()):
            count += 1
    return count


def _group_calls(token: str) -> int:
    return sum(
        1
        for call in responses.calls
        if (call.request.url or "").split("?")[0].endswith("/groups/my_groups")
        and call.request.headers.get("Authorization") == f"Bearer groups-{token}"
    )


# -- the stack -----------------------------------------------------------------


class InProcessApi:
    """`create_app` served by uvicorn on a real socket, in a thread of this process."""

    def __init__(self, config_path: Path) -> None:
        self.app = create_app(load_config(config_path))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.callers: list[str] = []

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.server.started, STARTUP_S, "the in-process API started")
        gateway = self.app.state.gateway
        submit = gateway.client.submit

        async def recording_submit(envelope: Any, *where: Any) -> Any:
            self.callers.append(envelope.caller)  # what the envelope carries to the consumer
            return await submit(envelope, *where)

        gateway.client.submit = recording_submit

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=STOP_S)


@pytest.fixture(scope="module")
def models(session_tag: str, delete_test_queues: list[str]) -> dict[str, str]:
    names = {kind: f"test-org/auth-{kind}-{session_tag}" for kind in ("open", "group", "domain", "users")}
    delete_test_queues.extend(names.values())
    return names


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, amqp_url: str, models: dict[str, str]) -> Iterator[Path]:
    workdir = tmp_path_factory.mktemp("auth")
    with running_fake_backend(list(models.values())) as backend:
        path = write_config(
            workdir / "hotq.toml",
            amqp_url,
            {
                models["open"]: {"backend_url": backend},
                models["group"]: {"backend_url": backend, "allow_groups": [GROUP]},
                models["domain"]: {"backend_url": backend, "allow_domains": ["anl.gov"]},
                models["users"]: {"backend_url": backend, "allow_users": ["carol", "alice@uchicago.edu"]},
            },
            max_queue_wait_s=30,
        )
        # write_config has no nested tables; [auth] goes after the models, in its own tables.
        with path.open("a") as out:
            out.write(
                '[auth]\nmodes = ["api_key", "globus"]\nkey_refresh_s = 0.5\n'
                f'[auth.globus]\naudience = "{AUDIENCE}"\nrequired_scope = "{SCOPE}"\n'
            )
        yield path


@pytest.fixture(scope="module")
def workers(config_path: Path, models: dict[str, str]) -> Iterator[Stack]:
    stack = Stack(config_path, config_path.parent)  # only its workers; the API runs in-process
    try:
        for model in models.values():
            stack.start_worker(model)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def api(config_path: Path, workers: Stack) -> Iterator[InProcessApi]:
    saved = {name: os.environ.get(name) for name in GLOBUS_ENV}
    os.environ.update(GLOBUS_ENV)
    responses.start()
    _register_globus()
    server = InProcessApi(config_path)
    try:
        server.start()
        yield server
    finally:
        server.close()
        responses.stop()
        responses.reset()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _client(api: InProcessApi, credential: str) -> openai.OpenAI:
    return openai_client(api.url + "/v1", credential)


def _chat(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return answer.choices[0].message.content or ""


def _refused(call: Callable[[], object], what: str) -> openai.AuthenticationError:
    """The error `call` fails with once it fails authentication (a change takes effect soon, not at once)."""
    refused: list[openai.AuthenticationError] = []

    def fails() -> bool:
        try:
            call()
        except openai.AuthenticationError as error:
            refused.append(error)
        return bool(refused)

    wait_until(fails, EVENTUALLY_S, what, poll_s=0.2)
    return refused[0]


# -- Globus tokens ---------------------------------------------------------------


def test_active_globus_token_is_served_as_its_user(api: InProcessApi, models: dict[str, str]) -> None:
    before = len(api.callers)
    assert _chat(_client(api, "tok-bob"), models["open"])
    assert api.callers[before:] == ["bob@example.org"]  # the envelope's caller is the Globus username


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("tok-inactive", "not active"),
        ("tok-expired", "expired"),
        ("tok-wrong-aud", "wrong audience"),
        ("tok-no-scope", "lacks the scope"),
    ],
)
def test_bad_globus_tokens_are_401(api: InProcessApi, models: dict[str, str], token: str, why: str) -> None:
    before = len(api.callers)
    with pytest.raises(openai.AuthenticationError) as caught:
        _chat(_client(api, token), models["open"])
    error = caught.value
    assert error.status_code == 401 and error.code == "invalid_api_key" and why in error.message
    assert error.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert api.callers[before:] == []  # nothing was queued


def test_missing_or_malformed_credentials_are_401(api: InProcessApi, models: dict[str, str]) -> None:
    body = {"model": models["open"], "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"}):
        response = httpx.post(api.url + "/v1/chat/completions", json=body, headers=headers, timeout=EVENTUALLY_S)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(api.url + "/v1/models", timeout=EVENTUALLY_S).status_code == 401
    assert httpx.get(api.url + "/v1/files", timeout=EVENTUALLY_S).status_code == 401
    assert httpx.get(api.url + "/v1/batches", timeout=EVENTUALLY_S).status_code == 401
    assert httpx.get(api.url + "/metrics", timeout=EVENTUALLY_S).status_code == 401  # they name every model
    assert httpx.get(api.url + "/ops", timeout=EVENTUALLY_S).status_code == 200  # the page holds no data


def test_group_policy(api: InProcessApi, models: dict[str, str]) -> None:
    assert _chat(_client(api, "tok-alice"), models["group"])  # a member of GROUP
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _chat(_client(api, "tok-bob"), models["group"])
    assert caught.value.status_code == 403 and caught.value.body["param"] == "model"  # type: ignore[index]


def test_domain_policy_uses_the_identity_set(api: InProcessApi, models: dict[str, str]) -> None:
    assert _chat(_client(api, "tok-alice"), models["domain"])  # through her linked alice@anl.gov
    with pytest.raises(openai.PermissionDeniedError):
        _chat(_client(api, "tok-bob"), models["domain"])


def test_user_policy(api: InProcessApi, models: dict[str, str]) -> None:
    assert _chat(_client(api, "tok-alice"), models["users"])
    with pytest.raises(openai.PermissionDeniedError):
        _chat(_client(api, "tok-bob"), models["users"])


def test_models_lists_only_what_the_user_may_use(api: InProcessApi, models: dict[str, str]) -> None:
    def visible(credential: str) -> set[str]:
        return {model.id for model in _client(api, credential).models.list()}

    assert visible("tok-alice") == set(models.values())
    assert visible("tok-bob") == {models["open"]}


def test_introspection_is_cached(api: InProcessApi, models: dict[str, str]) -> None:
    client = _client(api, "tok-dave")
    for _ in range(3):
        assert _chat(client, models["open"])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent requests share one introspection too
        assert all(pool.map(lambda _: _chat(client, models["open"]), range(8)))
    client.models.list()
    assert _calls("/v2/oauth2/token/introspect", token="tok-dave") == 1


def test_rejections_are_cached_briefly(api: InProcessApi, models: dict[str, str]) -> None:
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            _chat(_client(api, "tok-wrong-aud"), models["open"])
    assert _calls("/v2/oauth2/token/introspect", token="tok-wrong-aud") == 1


def test_group_lookups_are_cached(api: InProcessApi, models: dict[str, str]) -> None:
    client = _client(api, "tok-erin")
    for _ in range(3):
        assert _chat(client, models["group"])
    client.models.list()  # /v1/models checks the group policy again
    assert _calls("/v2/oauth2/token", token="tok-erin", grant_type="urn:globus:auth:grant_type:dependent_token") == 1
    assert _group_calls("tok-erin") == 1


def test_globus_down_is_503_not_cached(api: InProcessApi, models: dict[str, str]) -> None:
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            _chat(_client(api, "tok-globus-down"), models["open"])
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"]
    assert _calls("/v2/oauth2/token/introspect", token="tok-globus-down") == 4  # one retry each, nothing cached


# -- API keys --------------------------------------------------------------------


def test_api_key_lifecycle(api: InProcessApi, config_path: Path, models: dict[str, str]) -> None:
    key = create_key(config_path, "carol")
    assert key.startswith("hotq_")
    client = _client(api, key)
    before = len(api.callers)
    assert _chat(client, models["users"])  # carol is in the model's allow_users
    assert api.callers[before:] == ["carol"]
    listed = run_hotq(config_path, "keys", "list")
    assert "carol" in listed.stdout and key not in listed.stdout  # only the hash is stored
    # The database and its WAL, read by another process: closing a file descriptor of jobs.db here
    # would drop the in-process API's sqlite locks (POSIX locks are per process).
    scan = (
        "import sys, pathlib; key = sys.argv[1].encode();"
        " sys.exit(any(key in p.read_bytes() for p in pathlib.Path(sys.argv[2]).glob('jobs.db*')))"
    )
    assert subprocess.run([sys.executable, "-c", scan, key, str(config_path.parent / "data")]).returncode == 0

    key_id = next(line.split()[0] for line in listed.stdout.splitlines() if "carol" in line)
    revoked = run_hotq(config_path, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    # The API reloads keys every key_refresh_s (0.5 s here).
    error = _refused(lambda: _chat(client, models["users"]), "the revoked key refused")
    assert error.status_code == 401 and "revoked" in error.message
    everything = run_hotq(config_path, "keys", "list", "--all").stdout
    assert next(line for line in everything.splitlines() if key_id in line).split()[-1] != "-"  # revoked at


def test_api_key_policy_and_models(api: InProcessApi, config_path: Path, models: dict[str, str]) -> None:
    client = _client(api, create_key(config_path, "frank@anl.gov"))  # a key user's domain is their name's
    assert {model.id for model in client.models.list()} == {models["open"], models["domain"]}
    assert _chat(client, models["domain"])
    with pytest.raises(openai.PermissionDeniedError):
        _chat(client, models["users"])
    with pytest.raises(openai.PermissionDeniedError):
        _chat(client, models["group"])  # groups need a Globus identity


def test_files_and_batches_belong_to_their_user(api: InProcessApi, config_path: Path, models: dict[str, str]) -> None:
    """Another user's files and batches are as unknown as ones that do not exist (404, not listed)."""
    ann, ben = _client(api, create_key(config_path, "ann")), _client(api, create_key(config_path, "ben"))
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions"}
    body = {"model": models["open"], "messages": [{"role": "user", "content": "hi"}]}
    upload = ann.files.create(file=("mine.jsonl", json.dumps(line | {"body": body}).encode()), purpose="batch")
    batch = ann.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert ann.files.retrieve(upload.id).id == upload.id and ann.batches.retrieve(batch.id).id == batch.id

    for steal in (
        lambda: ben.files.retrieve(upload.id),
        lambda: ben.files.content(upload.id),
        lambda: ben.files.delete(upload.id),
        lambda: ben.batches.retrieve(batch.id),
        lambda: ben.batches.cancel(batch.id),
        lambda: ben.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            steal()
    assert upload.id not in [file.id for file in ben.files.list()]
    assert batch.id not in [listed.id for listed in ben.batches.list(limit=100)]
    assert upload.id in [file.id for file in ann.files.list()]
    assert batch.id in [listed.id for listed in ann.batches.list(limit=100)]
    # Files and batches made with authentication off belong to "anonymous": no key may take that name.
    refused = run_hotq(config_path, "keys", "create", "--user", "anonymous")
    assert refused.returncode != 0 and "reserved" in refused.stderr


def test_revoke_by_key_expiry_and_unknown_keys(api: InProcessApi, config_path: Path, models: dict[str, str]) -> None:
    key = create_key(config_path, "gina")
    assert _chat(_client(api, key), models["open"])
    assert run_hotq(config_path, "keys", "revoke", key).returncode == 0  # by the key itself
    _refused(lambda: _chat(_client(api, key), models["open"]), "the revoked key refused")

    _a_key_works_until_it_expires(api, config_path, models["open"])

    with pytest.raises(openai.AuthenticationError):
        _chat(_client(api, "hotq_" + "x" * 43), models["open"])
    assert run_hotq(config_path, "keys", "revoke", "key_nosuchkey").returncode != 0


def _a_key_works_until_it_expires(api: InProcessApi, config_path: Path, model: str) -> None:
    """A key works until it expires, then not. It starts as `hotq keys create` does (a process of its
    own), and that process and one request must fit in the key's life."""

    def attempt(life_s: float) -> str | None:
        created_from = time.time()
        key = create_key(config_path, "hank", "--expires", f"{life_s:g}s")
        try:
            assert _chat(_client(api, key), model)
        except openai.AuthenticationError as early:
            # Refused as expired, and only once its life had surely run out: the machine was too slow.
            assert time.time() >= created_from + life_s, f"a {life_s:g} s key refused before it expired: {early}"
            assert "expired" in early.message, early
            return "`hotq keys create` and one request did not fit in the key's life"
        error = _refused(lambda: _chat(_client(api, key), model), "the expired key refused")
        assert "expired" in error.message
        return None

    in_growing_windows(attempt, first_s=3)


async def test_a_cached_key_never_touches_the_store(tmp_path: Path) -> None:
    db = JobStore(tmp_path)
    store = AsyncJobStore(db)
    try:
        _, key = db.keys.create("ivan")
        keys = ApiKeyAuthenticator(store, refresh_s=60)
        await keys.refresh()
        calls = 0
        real_run = store.run

        async def counting_run(work: Any) -> Any:
            nonlocal calls
            calls += 1
            return await real_run(work)

        store.run = counting_run  # type: ignore[method-assign]
        started = time.perf_counter()
        for _ in range(10_000):
            assert (await keys.authenticate(key)).user == "ivan"
        print(f"\n{(time.perf_counter() - started) / 10_000 * 1e6:.1f} µs per cached key check")
        assert calls == 0  # what keeps a check cheap: it never waits for the store
        for _ in range(3):  # an unknown key is looked up once, then refused from memory
            with pytest.raises(AuthenticationError):
                await keys.authenticate("hotq_unknown")
        assert calls == 1
    finally:
        store.close()


# -- serving safely ----------------------------------------------------------------


def test_serve_refuses_non_loopback_without_auth(tmp_path: Path, amqp_url: str) -> None:
    config = write_config(tmp_path / "hotq.toml", amqp_url, {})
    done = run_hotq(config, "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode != 0 and "refusing to serve 0.0.0.0 without an [auth] table" in done.stderr


def test_auth_none_warns_and_refuses_non_loopback(tmp_path: Path, amqp_url: str) -> None:
    config = write_config(tmp_path / "hotq.toml", amqp_url, {})
    with config.open("a") as out:
        out.write('[auth]\nmodes = ["none"]\n')
    done = run_hotq(config, "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode != 0 and 'modes = ["none"]' in done.stderr
    stack = Stack(config, tmp_path)
    try:
        stack.start_api()  # loopback: serves, loudly
        assert "AUTHENTICATION IS OFF" in stack.log("api.log")
        assert httpx.get(stack.url + "/v1/models", timeout=EVENTUALLY_S).status_code == 200
    finally:
        stack.close()


def test_hotq_serve_with_auth(config_path: Path, workers: Stack, models: dict[str, str]) -> None:
    """The real `hotq serve` process: keys work, no or unknown keys are 401 (no Globus call needed here)."""
    stack = Stack(config_path, config_path.parent)
    saved = dict(os.environ)
    os.environ.update(GLOBUS_ENV)
    try:
        stack.start_api()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        assert httpx.get(stack.url + "/v1/models", timeout=EVENTUALLY_S).status_code == 401
        client = openai.OpenAI(
            base_url=stack.url + "/v1", api_key="hotq_" + "x" * 43, max_retries=0, timeout=EVENTUALLY_S
        )
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        client = openai.OpenAI(
            base_url=stack.url + "/v1", api_key=create_key(config_path, "judy"), max_retries=0, timeout=EVENTUALLY_S
        )
        assert _chat(client, models["open"])
        assert {model.id for model in client.models.list()} == {models["open"]}
    finally:
        stack.close()


def test_config_rejects_access_lists_without_auth(tmp_path: Path, amqp_url: str) -> None:
    from broker.config import parse_config
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="allow_users"):
        parse_config('[models."m"]\nallow_users = ["a"]\n')
    with pytest.raises(ConfigError, match='allow_groups needs \\[auth\\] mode "globus"'):
        parse_config('[auth]\nmodes = ["api_key"]\n[models."m"]\nallow_groups = ["g"]\n')
    with pytest.raises(ConfigError, match="cannot be combined"):
        parse_config('[auth]\nmodes = ["none", "api_key"]\n')
