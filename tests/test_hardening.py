"""What a hostile or careless client tried (issue 15) and what every client must be able to read (issue 10).

One API with API keys, small limits (a 64 KiB body, a 1 MiB file, 3 MiB of files per user), a fake
backend, and a second model only bob may use: the operator endpoints must not show it to strangers.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import openai
import pytest

from ops.processes import Child, free_port
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S, STOP_S
from ops.testing.fake_backend import running_fake_backend
from ops.testing.stack import ROOT, Stack, create_key, hotq_command, log_events, run_hotq, write_config

MAX_BODY = 64 * 1024
MAX_FILE = 1024 * 1024
QUOTA = 3 * MAX_FILE
OVERSIZED = 8 * 1024 * 1024  # well past the limits and the socket buffers: a client is still sending at the 413
DEEP = 1000
ADMIN = "ops-admin"


class Api:
    def __init__(self, stack: Stack, model: str, hidden: str, alice: str, admin: str, metrics_token: str) -> None:
        self.stack = stack
        self.url = stack.url
        self.model = model
        self.hidden = hidden  # a model only bob may use
        self.alice = alice
        self.admin = admin
        self.metrics_token = metrics_token

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.alice, max_retries=0, timeout=EVENTUALLY_S)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.alice}"}


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> Iterator[Api]:
    model = f"test-org/hardening-{session_tag}"
    hidden = f"test-org/hardening-hidden-{session_tag}"
    delete_test_queues.extend([model, hidden])
    token_env = f"HOTQ_TEST_METRICS_TOKEN_{session_tag}"
    metrics_token = uuid.uuid4().hex
    os.environ[token_env] = metrics_token  # the API process inherits it
    workdir = tmp_path_factory.mktemp("hardening")
    with running_fake_backend([model, hidden]) as backend_url:
        config = write_config(
            workdir / "hotq.toml",
            amqp_url,
            {model: {"backend_url": backend_url}, hidden: {"backend_url": backend_url, "allow_users": ["bob"]}},
            max_body_bytes=MAX_BODY,
            max_file_bytes=MAX_FILE,
            user_storage_bytes=QUOTA,
            max_queue_wait_s=30,
            auth={"modes": ["api_key"], "admins": [ADMIN], "metrics_token_env": token_env},
        )
        stack = Stack(config, workdir)
        try:
            stack.start_api()
            stack.start_worker(model)
            yield Api(stack, model, hidden, create_key(config, "alice"), create_key(config, ADMIN), metrics_token)
        finally:
            stack.close()
            del os.environ[token_env]


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _upload(api: Api, lines: Sequence[object], key: str | None = None) -> str:
    content = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()
    return api.client(key).files.create(file=("input.jsonl", content), purpose="batch").id


def _line(custom_id: str, body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


# -- 15.4: deeply nested JSON ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": DEEP}]}'),
        ("/v1/completions", '{"model": "MODEL", "prompt": DEEP}'),
        ("/v1/embeddings", '{"model": "MODEL", "input": DEEP}'),
        ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "x": DEEP}'),
        ("/v1/batches", '{"input_file_id": "file-x", "endpoint": "/v1/completions", "metadata": DEEP}'),
    ],
)
def test_deeply_nested_json_is_400_in_one_log_line(api: Api, path: str, body: str) -> None:
    raw = body.replace("MODEL", api.model).replace("DEEP", _nested(DEEP)).encode()
    before = len(log_events(api.stack.workdir / "api.log"))
    response = httpx.post(api.url + path, content=raw, headers=api.headers(), timeout=EVENTUALLY_S)
    assert _error(response, 400)["code"] == "json_too_deep"
    log = (api.stack.workdir / "api.log").read_text(errors="replace")
    assert "Traceback" not in log and "unhandled_error" not in log
    refused = [e for e in log_events(api.stack.workdir / "api.log")[before:] if e.get("event") == "request_refused"]
    assert [(e["path"], e["status"]) for e in refused] == [(path, 400)]


def test_a_moderately_nested_request_still_runs(api: Api) -> None:
    """Tool schemas and content parts nest a few levels: far below the limit, they pass."""
    answer = api.client().completions.create(model=api.model, prompt="hi", extra_body={"x": json.loads(_nested(40))})
    assert answer.choices


def test_deeply_nested_batch_line_fails_the_batch_naming_it(api: Api) -> None:
    ok = {"model": api.model, "messages": [{"role": "user", "content": "hi"}]}
    deep = f'{{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": {_nested(DEEP)}}}'
    deep_body = _line("deep-body", {**ok, "x": json.loads(_nested(200))})
    file_id = _upload(api, [_line("ok", ok), deep, deep_body])
    batch = api.client().batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "json_too_deep"), (3, "json_too_deep")]
    assert "Traceback" not in (api.stack.workdir / "api.log").read_text(errors="replace")


# -- 15.6: numbers no backend can honour; batch lines validated like requests -----------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"n": 1000000000', "n"),
        ('"max_tokens": ' + "9" * 400, "max_tokens"),
        ('"max_completion_tokens": 1e999', "max_completion_tokens"),
        ('"temperature": 1e999', "temperature"),
        ('"top_p": -1e999', "top_p"),
        ('"seed": 1e999', "seed"),  # fields hotq does not declare are forwarded, but not these numbers
        ('"seed": ' + "7" * 400, "seed"),
        ('"logit_bias": {"50256": -1e999}', "logit_bias.50256"),
        ('"metadata": {"x": [1, 2e400]}', "metadata.x[1]"),
    ],
)
def test_numbers_no_backend_can_honour_are_400_naming_the_field(api: Api, extra: str, param: str) -> None:
    raw = f'{{"model": "{api.model}", "messages": [{{"role": "user", "content": "hi"}}], {extra}}}'.encode()
    response = httpx.post(api.url + "/v1/chat/completions", content=raw, headers=api.headers(), timeout=EVENTUALLY_S)
    assert _error(response, 400)["param"] == param


def test_batch_lines_are_validated_like_interactive_requests(api: Api) -> None:
    def chat(**extra: object) -> dict[str, object]:
        return {"model": api.model, "messages": [{"role": "user", "content": "hi"}], **extra}

    lines = [
        _line("fine", chat()),
        _line("root", {"model": api.model, "messages": [{"role": "root", "content": "hi"}]}),
        _line("negative", chat(max_tokens=-5)),
        _line("no-choices", chat(n=0)),
        _line("huge", chat(pad="x" * MAX_BODY)),  # over max_body_bytes, like an interactive request would be
        _line("fine-too", chat(max_tokens=5)),
    ]
    batch = api.client().batches.create(
        input_file_id=_upload(api, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data is not None
    found = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert found == [
        (2, "invalid_request", "body.messages[0].role"),
        (3, "invalid_request", "body.max_tokens"),
        (4, "invalid_request", "body.n"),
        (5, "line_too_large", None),
    ]
    assert all(f"line {e.line}" in e.message for e in batch.errors.data)  # type: ignore[operator]


def test_hotq_submit_holds_lines_to_the_same_limit(api: Api) -> None:
    """`hotq submit` validates its file as the Batch API does: nothing is published."""
    lines = [{"model": api.model, "prompt": "fine"}, {"model": api.model, "prompt": "x" * MAX_BODY}]
    path = api.stack.workdir / "oversized.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    done = run_hotq(api.stack.config, "submit", str(path), "--model", api.model, "--detach")
    assert done.returncode == 1 and "line 2: line_too_large" in done.stderr + done.stdout


# -- 10.3: a body over the limit gets a 413 that every client reads ---------------------------------


def _multipart(content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _oversized(api: Api, path: str) -> tuple[bytes, str]:
    """A body past the limit of `path`: the JSON routes' max_body_bytes, the upload's max_file_bytes."""
    if path == "/v1/files":
        return _multipart(b"x" * OVERSIZED)
    field = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}[path]
    value: object = [{"role": "user", "content": "x" * OVERSIZED}] if field == "messages" else "x" * OVERSIZED
    return json.dumps({"model": api.model, field: value}).encode(), "application/json"


def _with_urllib(api: Api, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, object]]:
    headers = {**api.headers(), "Content-Type": content_type}
    request = urllib.request.Request(api.url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=EVENTUALLY_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _with_httpx(api: Api, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, object]]:
    headers = {**api.headers(), "Content-Type": content_type}
    response = httpx.post(api.url + path, content=body, headers=headers, timeout=EVENTUALLY_S)
    return response.status_code, response.json()


def _with_openai(api: Api, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, object]]:
    client = api.client()
    try:
        if path == "/v1/files":
            client.files.create(file=("big.jsonl", io.BytesIO(b"x" * OVERSIZED)), purpose="batch")
        else:
            client.post(path.removeprefix("/v1"), body=json.loads(body), cast_to=object)
    except openai.APIStatusError as error:
        return error.status_code, error.response.json()
    raise AssertionError("the oversized request was accepted")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/files"])
@pytest.mark.parametrize("send", [_with_urllib, _with_httpx, _with_openai], ids=["urllib", "httpx", "openai"])
def test_a_body_over_the_limit_gets_a_413_every_client_reads(
    api: Api, path: str, send: Callable[[Api, str, bytes, str], tuple[int, dict[str, object]]]
) -> None:
    body, content_type = _oversized(api, path)
    status, answer = send(api, path, body, content_type)
    assert status == 413, answer
    assert answer["error"]["code"] == "payload_too_large"  # type: ignore[index]


def test_a_refused_credential_is_read_by_a_client_still_sending(api: Api) -> None:
    """The same for a 401: urllib sends its whole body before it reads the answer."""
    body, content_type = _oversized(api, "/v1/chat/completions")
    headers = {"Authorization": "Bearer hotq_not-a-key", "Content-Type": content_type}
    request = urllib.request.Request(api.url + "/v1/chat/completions", data=body, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=EVENTUALLY_S)
    assert refused.value.code == 401 and json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"


def test_a_client_waiting_for_100_continue_is_answered_without_sending(api: Api) -> None:
    """Expect: 100-continue (curl's way with large bodies): the 413 comes before the body is asked for."""
    connection = http.client.HTTPConnection("127.0.0.1", api.stack.port, timeout=EVENTUALLY_S)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        expect = {"Content-Type": "application/json", "Content-Length": str(OVERSIZED), "Expect": "100-continue"}
        for name, value in {**api.headers(), **expect}.items():
            connection.putheader(name, value)
        connection.endheaders()  # and send no body: a 100 Continue would leave this waiting
        response = connection.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "payload_too_large"
    finally:
        connection.close()


def _chunked_upload(api: Api, content: bytes, key: str | None = None) -> httpx.Response:
    """An upload without Content-Length: nothing to judge it by before it arrives."""
    body, content_type = _multipart(content)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    headers = {**api.headers(key), "Content-Type": content_type}
    return httpx.post(api.url + "/v1/files", content=chunks, headers=headers, timeout=EVENTUALLY_S)


@pytest.mark.parametrize("size", [OVERSIZED, MAX_FILE + 1000], ids=["far-over", "just-over"])
def test_a_chunked_upload_over_the_limit_is_refused(api: Api, size: int) -> None:
    assert _error(_chunked_upload(api, b"x" * size), 413)["code"] == "payload_too_large"


# -- 15.3: per-user storage quota -----------------------------------------------------------------


def test_each_user_has_a_storage_quota(api: Api) -> None:
    bob = create_key(api.stack.config, "quota-bob")
    carol = create_key(api.stack.config, "quota-carol")
    part = b"y" * (MAX_FILE - 4096)
    kept = [api.client(bob).files.create(file=("part.jsonl", part), purpose="batch").id for _ in range(3)]
    with pytest.raises(openai.APIStatusError) as refused:
        api.client(bob).files.create(file=("one-more.jsonl", part), purpose="batch")
    assert refused.value.status_code == 413 and refused.value.code == "storage_quota_exceeded"
    assert _error(_chunked_upload(api, part, bob), 413)["code"] == "storage_quota_exceeded"  # found once received
    assert api.client(carol).files.create(file=("part.jsonl", part), purpose="batch").id  # a quota per user
    api.client(bob).files.delete(kept[0])
    assert api.client(bob).files.create(file=("part.jsonl", part), purpose="batch").bytes == len(part)


# -- 15.6: operator endpoints, redirects, echoed headers, key users -------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/ops/data"])
def test_operator_endpoints_need_an_admin_or_the_metrics_token(api: Api, path: str) -> None:
    def get(headers: dict[str, str]) -> httpx.Response:
        return httpx.get(api.url + path, headers=headers, timeout=EVENTUALLY_S)

    anonymous = get({})
    assert _error(anonymous, 401)["code"] == "invalid_api_key" and api.hidden not in anonymous.text
    user = get(api.headers())
    assert _error(user, 403)["code"] == "permission_denied" and api.hidden not in user.text
    assert _error(get({"Authorization": "Bearer not-the-token"}), 401)
    for allowed in (api.headers(api.admin), {"Authorization": f"Bearer {api.metrics_token}"}):
        response = get(allowed)
        assert response.status_code == 200
        assert api.model in response.text and api.hidden in response.text
    assert httpx.get(api.url + "/ops", timeout=EVENTUALLY_S).status_code == 200  # the page itself holds no data


@pytest.mark.parametrize("path", ["/metrics/", "/v1/models/", "/ops/"])
def test_no_redirect_is_built_from_the_host_header(api: Api, path: str) -> None:
    response = httpx.get(
        api.url + path, headers={**api.headers(), "Host": "evil.example"}, timeout=EVENTUALLY_S, follow_redirects=False
    )
    assert not response.is_redirect and "evil.example" not in response.headers.get("location", "")
    assert _error(response, 404)["code"] == "not_found"


def test_the_cluster_header_is_not_echoed_whole(api: Api) -> None:
    body = {"model": api.model, "messages": [{"role": "user", "content": "hi"}]}
    headers = {**api.headers(), "X-Hotq-Cluster": "c" * 20_000}
    response = httpx.post(api.url + "/v1/chat/completions", json=body, headers=headers, timeout=EVENTUALLY_S)
    error = _error(response, 400)
    assert error["param"] == "X-Hotq-Cluster" and len(response.content) < 1000


@pytest.mark.parametrize("user", ["", "   ", " alice", "tab\there"])
def test_keys_create_refuses_a_user_without_a_name(api: Api, user: str) -> None:
    done = run_hotq(api.stack.config, "keys", "create", "--user", user)
    assert done.returncode != 0 and "hotq_" not in done.stdout
    assert "--user" in done.stderr


# -- 15.3: a large upload streams to disk ---------------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_large_upload_streams_to_disk_with_bounded_memory(tmp_path: Path, amqp_url: str, session_tag: str) -> None:
    size = 96 * 1024 * 1024
    config = write_config(
        tmp_path / "hotq.toml", amqp_url, {f"test-org/uploads-{session_tag}": {"backend_url": "http://127.0.0.1:9"}},
        max_file_bytes=2 * size,
    )  # fmt: skip
    stack = Stack(config, tmp_path)
    try:
        api = stack.start_api()
        httpx.get(stack.url + "/v1/models", timeout=EVENTUALLY_S)  # warm: the first request loads what serving needs
        before = _peak_rss_kib(api.pid)
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode(),
        ]
        block = b"z" * (1024 * 1024)

        def body() -> Iterator[bytes]:
            yield from parts
            for _ in range(size // len(block)):
                yield block
            yield f"\r\n--{boundary}--\r\n".encode()

        slowest: list[float] = []
        done = False

        def models_answer_meanwhile() -> None:
            while not done:
                response = httpx.get(stack.url + "/v1/models", timeout=EVENTUALLY_S)
                slowest.append(response.elapsed.total_seconds())

        watcher = threading.Thread(target=models_answer_meanwhile)
        watcher.start()
        try:
            response = httpx.post(
                stack.url + "/v1/files",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                timeout=EVENTUALLY_S,
            )
        finally:
            done = True
            watcher.join()
        assert response.status_code == 200, response.text
        assert response.json()["bytes"] == size
        growth_mb = (_peak_rss_kib(api.pid) - before) / 1024
        print(
            f"\nupload {size >> 20} MB: API peak RSS grew {growth_mb:.1f} MB;"
            f" GET /v1/models meanwhile: {len(slowest)} answers, slowest {max(slowest, default=0) * 1000:.0f} ms"
        )
        assert growth_mb < size / 2 / 2**20
        downloaded = 0
        url = f"{stack.url}/v1/files/{response.json()['id']}/content"
        with httpx.stream("GET", url, timeout=EVENTUALLY_S) as download:
            for chunk in download.iter_bytes():
                downloaded += len(chunk)
        growth_mb = (_peak_rss_kib(api.pid) - before) / 1024
        print(f"and downloaded again: API peak RSS grew {growth_mb:.1f} MB in all")
        assert downloaded == size and growth_mb < size / 2 / 2**20
    finally:
        stack.close()


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses something listens on at `port` (from /proc/net/tcp, state 0A)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_the_scaler_metrics_listen_on_loopback(api: Api, tmp_path: Path) -> None:
    """The scaler's /metrics names every model too: by default only this machine reaches it."""
    port = free_port()
    command = hotq_command("scale", "--config", str(api.stack.config), "--metrics-port", str(port))
    scaler = Child("scale", command, tmp_path / "scale.log", cwd=ROOT)
    try:
        scaler.wait_for_http(f"http://127.0.0.1:{port}/metrics", STARTUP_S)
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        scaler.stop(STOP_S)
