"""Acceptance 3: every error case answers in OpenAI's format with the right status, and loses nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ops.processes import free_port
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import expected_chat_tokens
from ops.testing.stack import Stack, api_and_worker, write_config


@pytest.fixture(scope="module")
def client(fake_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    error: dict[str, object] = body["error"]
    return error


def _chat(model: str, content: object = "hi", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def test_malformed_json_is_400(fake_stack: Stack) -> None:
    response = httpx.post(
        fake_stack.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [', timeout=EVENTUALLY_S
    )
    assert _error(response, 400)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "M"}, "messages"),
        ({"model": "M", "messages": "hi"}, "messages"),
        ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ],
)
def test_schema_violations_are_400_naming_the_field(
    fake_stack: Stack, fake_model: str, body: dict[str, object], param: str
) -> None:
    if body.get("model") == "M":
        body["model"] = fake_model
    error = _error(httpx.post(fake_stack.url + "/v1/chat/completions", json=body, timeout=EVENTUALLY_S), 400)
    assert error["param"] == param


def test_schema_violation_through_openai_client(client: openai.OpenAI, fake_model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "hi"}], n=0)
    assert caught.value.status_code == 400 and caught.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=fake_model, messages=[{"role": "oracle", "content": "hi"}])  # type: ignore[misc,list-item]


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no/such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"


def test_body_over_limit_is_413(fake_stack: Stack, fake_model: str) -> None:
    huge = "x" * (10 * 1024 * 1024 + 1)
    response = httpx.post(fake_stack.url + "/v1/chat/completions", json=_chat(fake_model, huge), timeout=EVENTUALLY_S)
    assert _error(response, 413)["code"] == "payload_too_large"


def test_unknown_route_404_and_wrong_method_405(fake_stack: Stack) -> None:
    assert (
        _error(httpx.post(fake_stack.url + "/v1/nothing/here", json={}, timeout=EVENTUALLY_S), 404)["code"]
        == "not_found"
    )
    response = httpx.get(fake_stack.url + "/v1/chat/completions", timeout=EVENTUALLY_S)
    assert _error(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_backend_failures_keep_their_status(client: openai.OpenAI, fake_model: str) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "FAIL 429"}])
    assert limited.value.status_code == 429 and limited.value.code == "fake_429"
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(
            model=fake_model, messages=[{"role": "user", "content": "FAIL 503"}], stream=True
        )
    assert failed.value.status_code == 503


def test_errors_lose_nothing(fake_stack: Stack, client: openai.OpenAI, fake_model: str) -> None:
    """After a burst of bad requests the good one still works and no request is left queued."""
    for bad in (b"{", b"[]", json.dumps({"model": fake_model}).encode()):
        assert httpx.post(fake_stack.url + "/v1/chat/completions", content=bad, timeout=EVENTUALLY_S).status_code == 400
    answer = client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "still here"}])
    assert answer.choices[0].message.content == "echo: llits ereh"
    models = client.models.list().data
    assert models[0].model_extra["hotq"]["queue_depth"] == 0  # type: ignore[index]


@pytest.fixture(scope="module")
def lonely_stack(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> Iterator[tuple[Stack, str]]:
    """A model with no consumer at all, and a short maximum queue wait."""
    workdir = tmp_path_factory.mktemp("lonely")
    model = f"lonely-{session_tag}"
    delete_test_queues.append(model)
    config = write_config(
        workdir / "hotq.toml",
        amqp_url,
        {model: {"backend_url": "http://127.0.0.1:9"}},
        max_queue_wait_s=1.5,
        keepalive_s=0.4,
    )
    stack = Stack(config, workdir)
    stack.start_api()
    yield stack, model
    stack.close()


def test_no_consumer_gives_503_with_retry_after(lonely_stack: tuple[Stack, str]) -> None:
    stack, model = lonely_stack
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "anyone?"}])
    assert caught.value.status_code == 503 and caught.value.code == "no_capacity"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_waiting_stream_sends_keepalives_then_error_event(lonely_stack: tuple[Stack, str]) -> None:
    stack, model = lonely_stack
    with httpx.stream(
        "POST", stack.url + "/v1/chat/completions", json=_chat(model, stream=True), timeout=EVENTUALLY_S
    ) as response:
        assert response.status_code == 200
        text = response.read().decode()
    keepalive = json.loads(text.split("\n\n")[0].removeprefix("data: "))  # a chunk with no choices
    assert keepalive["choices"] == [] and keepalive["object"] == "chat.completion.chunk"
    last = text.strip().split("\n\n")[-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "no_capacity"
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "anyone?"}], stream=True
        ):
            pass


def test_rabbitmq_unreachable_is_503(tmp_path: Path, session_tag: str) -> None:
    dead_port = free_port()
    config = write_config(
        tmp_path / "hotq.toml",
        f"amqp://guest:guest@127.0.0.1:{dead_port}/",
        {f"m-{session_tag}": {"backend_url": "http://127.0.0.1:9"}},
    )
    stack = Stack(config, tmp_path)
    try:
        stack.start_api()
        response = httpx.post(stack.url + "/v1/chat/completions", json=_chat(f"m-{session_tag}"), timeout=EVENTUALLY_S)
        assert _error(response, 503)["type"] == "service_unavailable"
        assert "retry-after" in response.headers
    finally:
        stack.close()


def test_a_backend_url_ending_in_v1_serves(
    tmp_path: Path, amqp_url: str, fake_model: str, fake_backend_url: str
) -> None:
    """`backend_url = ".../v1"`, as an OpenAI client's base_url is written, reaches the backend's /v1 routes once."""
    with api_and_worker(tmp_path, amqp_url, fake_model, {"backend_url": fake_backend_url + "/v1"}) as stack:
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)
        response = client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "a b c"}])
    assert response.choices[0].message.content == "".join(expected_chat_tokens("a b c", None)[0])
