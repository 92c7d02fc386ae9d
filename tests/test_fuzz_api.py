"""Fuzzing the running API over real sockets: whatever the body and headers, never a 500, never a crash.

A 500 from hotq is `on_unexpected`'s "internal error" (a bug); the fake backend answers a 500 only
when told to (a prompt starting with "FAIL 500"), which these strategies never write.
"""

from __future__ import annotations

import collections
import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.stack import Stack

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_small_counts = st.integers(min_value=-3, max_value=4) | st.sampled_from([2**63, 2**64, -(2**64), 1.5, "2", None])


@st.composite
def request_bodies(draw: st.DrawFn, model: str) -> dict[str, object]:
    """OpenAI-shaped bodies with any field missing, mistyped or odd; small n (the fake backend makes n choices)."""
    body: dict[str, object] = {}
    if draw(st.booleans()):
        body["model"] = draw(st.sampled_from([model, "no/such-model", ""]) | json_values)
    message = st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | json_values,
            "content": st.text(max_size=40) | json_values,
            "name": json_values,
        },
    )
    fields = {
        "messages": st.lists(message | json_values, max_size=3) | json_values,
        "prompt": st.text(max_size=40) | st.lists(st.text(max_size=10) | st.integers(), max_size=3) | json_values,
        "input": st.text(max_size=40) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values})
        | json_values,
        "n": _small_counts,
        "max_tokens": _small_counts,
        "max_completion_tokens": _small_counts,
        "temperature": json_values,
        "extra": json_values,
    }
    for name, values in fields.items():
        if draw(st.booleans()):
            body[name] = draw(values)
    return body


@st.composite
def mutated_valid_bodies(draw: st.DrawFn, model: str, path: str) -> dict[str, object]:
    """A valid body for `path` with a field or two replaced by odd values: these get past validation."""
    text = st.text(max_size=40).filter(lambda t: not t.startswith("FAIL"))  # the fake backend's error trigger
    body: dict[str, object] = {"model": model}
    if path == "/v1/chat/completions":
        contents = text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)
        body["messages"] = draw(
            st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": contents}),
                     min_size=1, max_size=3)
        )  # fmt: skip
    elif path == "/v1/completions":
        body["prompt"] = draw(text | st.lists(text, min_size=1, max_size=3))
    else:
        body["input"] = draw(text.filter(bool) | st.lists(text.filter(bool), min_size=1, max_size=3))
    if path != "/v1/embeddings":
        body["stream"] = draw(st.booleans())
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
        for name in ("n", "max_tokens"):
            if draw(st.booleans()):
                body[name] = draw(st.integers(min_value=1, max_value=3))
    for name in draw(st.lists(st.sampled_from([*body, "temperature", "tools", "user", "seed"]), max_size=2)):
        body[name] = draw(json_values)
    return body


def _encode(body: object, how: str) -> bytes:
    if how == "json":
        return json.dumps(body).encode()
    if how == "nan":  # JSON's non-standard NaN and Infinity literals, which Python writes
        return json.dumps(body).replace("null", "NaN", 1).replace("true", "Infinity", 1).encode()
    return json.dumps(body).encode()[: len(json.dumps(body)) // 2]  # truncated


_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
headers = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "Authorization",
            "X-Hotq-Cluster",
            "x-stainless-read-timeout",
            "Accept",
            "Accept-Encoding",
            "X-Request-Id",
            "OpenAI-Organization",
            "Expect",
            "Connection",
        ]
    ),
    _header_value
    | st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e308", "1e-300", "application/json", "Bearer x", "polaris"]),
    max_size=5,
)


def _check(stack: Stack, response: httpx.Response, seen: collections.Counter[int]) -> None:
    seen[response.status_code] += 1
    assert response.status_code != 500, f"{response.status_code}: {response.text[:500]}"
    assert stack.api is not None and stack.api.poll() is None, "the API process died"
    if response.status_code >= 400:
        assert "error" in response.json(), response.text[:500]


@pytest.fixture(scope="module")
def client(fake_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_stack.url, timeout=EVENTUALLY_S) as http:
        yield http


def test_fuzz_bodies(fake_stack: Stack, client: httpx.Client, fake_model: str) -> None:
    @SETTINGS
    @given(data=st.data(), path=st.sampled_from(PATHS))
    def run(data: st.DataObject, path: str) -> None:
        kind = data.draw(st.sampled_from(["valid-ish", "valid-ish", "valid-ish", "shaped", "any-json", "bytes"]))
        if kind == "bytes":
            content = data.draw(st.binary(max_size=200))
        else:
            bodies = {
                "valid-ish": mutated_valid_bodies(fake_model, path),
                "shaped": request_bodies(fake_model),
                "any-json": json_values,
            }
            how = "json" if kind == "valid-ish" else data.draw(st.sampled_from(["json", "json", "nan", "truncated"]))
            content = _encode(data.draw(bodies[kind]), how)
        response = client.post(path, content=content, headers={"Content-Type": "application/json"})
        response.read()
        _check(fake_stack, response, seen)

    seen: collections.Counter[int] = collections.Counter()
    run()
    print("statuses:", dict(seen))
    assert seen.total() >= 100 and seen[200] and seen[400], seen  # both answered and rejected bodies


def test_fuzz_headers(fake_stack: Stack, client: httpx.Client, fake_model: str) -> None:
    @SETTINGS
    @given(
        path=st.sampled_from(PATHS),
        stream=st.booleans(),
        extra=headers,
    )
    def run(path: str, stream: bool, extra: dict[str, str]) -> None:
        field = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}[path]
        value: object = [{"role": "user", "content": "fuzz me"}] if field == "messages" else "fuzz me"
        body = {"model": fake_model, field: value} | ({"stream": stream} if field != "input" else {})
        try:
            raw_headers = {name.encode(): value.encode("latin-1") for name, value in extra.items()}  # as a client may
            response = client.post(path, content=json.dumps(body).encode(), headers=raw_headers)
        except httpx.LocalProtocolError:  # a header value httpx itself refuses to send
            return
        response.read()
        _check(fake_stack, response, seen)

    seen: collections.Counter[int] = collections.Counter()
    run()
    print("statuses:", dict(seen))
    assert seen.total() >= 100 and seen[200] and seen[400], seen


def test_fuzz_raw_http(fake_stack: Stack, client: httpx.Client) -> None:
    """Malformed HTTP straight onto the socket: the server answers (or hangs up), and keeps serving."""

    @settings(max_examples=100, deadline=None)
    @given(
        method=st.sampled_from([b"POST", b"GET", b"PUT", b"P\x00ST", b""]),
        path=st.sampled_from([b"/v1/chat/completions", b"/v1/models", b"/%ff%00", b"*", b"/" + b"a" * 9000]),
        header_lines=st.lists(st.binary(max_size=60).filter(lambda b: b"\r\n" not in b), max_size=6),
        length=st.sampled_from([None, b"0", b"-1", b"abc", b"99999999999999999999", b"5, 6"]),
        chunked=st.booleans(),
        body=st.binary(max_size=64),
    )
    def run(
        method: bytes, path: bytes, header_lines: list[bytes], length: bytes | None, chunked: bool, body: bytes
    ) -> None:
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close", *header_lines]
        if length is not None:
            lines.append(b"Content-Length: " + length)
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
        request = b"\r\n".join(lines) + b"\r\n\r\n" + body
        # Bounded, not generous: the server may rightly wait for a body that never comes.
        with socket.create_connection(("127.0.0.1", fake_stack.port), timeout=10) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except (TimeoutError, ConnectionResetError):
                pass
        status = answer.split(b"\r\n", 1)[0]
        seen[status[9:12]] += 1
        assert b" 500 " not in status, answer[:500]
        assert fake_stack.api is not None and fake_stack.api.poll() is None, "the API process died"

    seen: collections.Counter[bytes] = collections.Counter()
    run()
    print("statuses:", dict(seen))
    assert seen.total() >= 50, seen
    assert client.get("/v1/models").status_code == 200
