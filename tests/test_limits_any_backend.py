"""Issue 15 §5: tokens_per_minute counts a request the client leaves, on any backend, not only vLLM.

The fake backend here ignores continuous_usage_stats, as most servers but vLLM do: it reports
usage only in a stream's last chunk. Each test has a model of its own, and so a limit of its own
(limits count per user and model; without [auth] the one user is "anonymous").

A module of its own: the usage records the tests wait for go to whichever API consumes the
vhost's `hotq.usage` queue, so no other module's API may be running (test_limits keeps one up).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import Hold, fake_stats, running_fake_backend
from ops.testing.stack import Stack, api_and_workers, write_config
from tests.test_limits import cancelled_recorded, leave_after_first_token

PROMPT = " ".join(f"word{index}" for index in range(3500))  # about 7,000 tokens at 4 characters a token
TOKENS_PER_MINUTE = 1000


@dataclass(frozen=True)
class Served:
    stack: Stack
    backend: str
    models: dict[str, str]  # test -> its model


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("limits-any-backend")
    models = {test: f"test-org/limits-{test}-{session_tag}" for test in ("stream", "answer")}
    delete_test_queues.extend(models.values())
    with running_fake_backend(list(models.values()), running_usage=False) as backend:
        limits = {"tokens_per_minute": TOKENS_PER_MINUTE}
        tables = {model: {"backend_url": backend, "limits": limits} for model in models.values()}
        config = write_config(workdir / "hotq.toml", amqp_url, tables)
        with api_and_workers(config, workdir, models.values()) as stack:
            yield Served(stack, backend, models)


def _over_the_limit(served: Served, model: str) -> None:
    """Once the cut request is recorded (its charge came just before), the next one is refused."""
    wait_until(lambda: cancelled_recorded(served.stack, "anonymous", model), EVENTUALLY_S, "the cut request recorded")
    client = openai.OpenAI(base_url=served.stack.url + "/v1", api_key="none", max_retries=0, timeout=EVENTUALLY_S)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_a_stream_left_after_its_first_chunk_is_charged_an_estimate(served: Served) -> None:
    """What was streamed, and the prompt estimated from its text: a 3,500-word prompt puts the user
    over 1,000 tokens per minute (before issue 15 this charged nothing, and the next request ran)."""
    model = served.models["stream"]
    client = openai.OpenAI(base_url=served.stack.url + "/v1", api_key="none", max_retries=0, timeout=EVENTUALLY_S)
    leave_after_first_token(client, model, PROMPT)
    _over_the_limit(served, model)


def test_an_answer_left_while_the_backend_works_is_charged_its_prompt(served: Served, tmp_path: Path) -> None:
    """A non-streaming request cut short: the backend reports nothing, but it had read the prompt."""
    model = served.models["answer"]
    hold = Hold(tmp_path / "never")  # the backend holds the answer: the client leaves while it works
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], **hold.field}).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: hotq\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", served.stack.port), timeout=EVENTUALLY_S) as connection:
        connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: fake_stats(served.backend)["active"] == 1, EVENTUALLY_S, "the backend working on it")
    _over_the_limit(served, model)
