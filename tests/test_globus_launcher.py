"""The Globus Compute launcher without the Globus cloud.

Launches go through the launcher's `concurrent.futures.Executor` seam, here a spawn
process pool running the real `run_agent` against a real hotq API and RabbitMQ; the
endpoint status goes through globus_sdk's testing fixtures (the `responses` library).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import globus_compute_sdk
import globus_sdk
import openai
import pytest
import requests
import responses
from globus_sdk.testing import RegisteredResponse, get_last_request, load_response

from broker.config import Config, config_from_mapping
from hpc_agents.agent import run_agent
from hpc_agents.launchers import globus_compute
from hpc_agents.launchers.globus_compute import GlobusComputeLauncher
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND
from ops.testing.stack import Stack, write_config

CLUSTER = "test-gc"
ENDPOINT_ID = "8a0c4f5e-0000-4000-8000-000000000001"


def _config(endpoint_id: str = ENDPOINT_ID, **top: Any) -> Config:
    return config_from_mapping(
        {**top, "clusters": {CLUSTER: {"launcher": "globus-compute", "endpoint_id": endpoint_id, "max_nodes": 2}}}
    )


# (a) A launch runs the real agent through the executor and returns its summary.


@pytest.fixture
def model(session_tag: str, delete_test_queues: list[str]) -> str:
    name = f"globus-launcher-{session_tag}"
    delete_test_queues.append(name)
    return name


@pytest.fixture
def api(tmp_path: Path, amqp_url: str, model: str) -> Iterator[Stack]:
    stack = Stack(write_config(tmp_path / "hotq.toml", amqp_url, {model: {"command": FAKE_BACKEND_COMMAND}}), tmp_path)
    stack.start_api()
    yield stack
    stack.close()


def test_launch_runs_an_agent_that_serves_and_returns_its_summary(
    api: Stack, tmp_path: Path, amqp_url: str, model: str
) -> None:
    config = _config(
        amqp_url=amqp_url,
        data_dir=str(tmp_path / "data"),
        models={model: {"command": FAKE_BACKEND_COMMAND, "idle_ttl_s": 1.5, "max_inflight": 2}},
    )
    # What Globus Compute does on a node: run the function in another Python process.
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    launcher = GlobusComputeLauncher(CLUSTER, config, executor=pool)
    try:
        launch = launcher.launch(model)
        client = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=STARTUP_S)
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "via globus"}])
        assert answer.choices[0].message.content == "echo: aiv subolg"
        summary = launch.future.result(timeout=EVENTUALLY_S)
    finally:
        launcher.shutdown()
    assert summary["exit_reason"] == "idle" and summary["served"] == 1
    assert summary["agent_id"] == launch.agent_id and summary["cluster"] == CLUSTER
    # Done callbacks run after result() wakes.
    wait_until(lambda: list(launcher.summaries) == [summary], EVENTUALLY_S, "the summary recorded")


# (b) Endpoint status through the Compute API, mocked at the HTTP layer.


@pytest.fixture
def compute_api() -> Iterator[Any]:
    assert responses is not None
    with responses.RequestsMock() as mock:
        yield mock


def _status_client() -> globus_sdk.ComputeClientV2:
    client = globus_sdk.ComputeClientV2()
    client.retry_config.max_retries = 0  # a failure is a failure; retries only slow the test
    return client


def _status_response(endpoint_id: str, **kwargs: Any) -> Any:
    return RegisteredResponse(service="compute", path=f"/v2/endpoints/{endpoint_id}/status", **kwargs)


def test_online_when_the_endpoint_reports_online_and_cached(compute_api: Any) -> None:
    endpoint_id = load_response(globus_sdk.ComputeClientV2.get_endpoint_status, requests_mock=compute_api).metadata[
        "endpoint_id"
    ]
    launcher = GlobusComputeLauncher(CLUSTER, _config(endpoint_id), status_client=_status_client())
    assert launcher.online() is True
    last = get_last_request(requests_mock=compute_api)
    assert last is not None and (last.url or "").endswith(f"/v2/endpoints/{endpoint_id}/status")
    assert launcher.online() is True
    assert len(compute_api.calls) == 1  # the second answer came from the cache


def test_offline_endpoint_and_a_changed_status_after_the_cache_time(
    compute_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(globus_compute, "STATUS_CACHE_S", 0.0)
    launcher = GlobusComputeLauncher(CLUSTER, _config(), status_client=_status_client())
    _status_response(ENDPOINT_ID, json={"status": "offline", "details": {}}).add(requests_mock=compute_api)
    assert launcher.online() is False
    _status_response(ENDPOINT_ID, json={"status": "online", "details": {}}).replace(requests_mock=compute_api)
    assert launcher.online() is True
    assert len(compute_api.calls) == 2


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 503, "json": {"code": "SERVICE_UNAVAILABLE", "message": "down"}},
        {"status": 404, "json": {"code": "ENDPOINT_NOT_FOUND", "message": "no such endpoint"}},
        {"body": requests.ConnectionError("unreachable")},
    ],
    ids=["503", "404", "connection-error"],
)
def test_not_online_when_the_status_call_fails(compute_api: Any, failure: dict[str, Any]) -> None:
    launcher = GlobusComputeLauncher(CLUSTER, _config(), status_client=_status_client())
    _status_response(ENDPOINT_ID, **failure).add(requests_mock=compute_api)
    assert launcher.online() is False
    assert len(compute_api.calls) == 1


# (c) The Globus Compute defaults are created on first use, never by the constructor.


class FakeClient:
    created: list[FakeClient] = []

    def __init__(self) -> None:
        FakeClient.created.append(self)

    def get_endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        return {"status": "online", "details": {}}


class FakeExecutor(concurrent.futures.Executor):
    created: list[FakeExecutor] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.submitted: list[tuple[Any, dict[str, Any], concurrent.futures.Future[Any]]] = []
        self.shutdown_args: tuple[bool, bool] | None = None
        FakeExecutor.created.append(self)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.submitted.append((fn, args[0], future))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.shutdown_args = (wait, cancel_futures)


@pytest.fixture
def fake_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.created.clear()
    FakeExecutor.created.clear()
    monkeypatch.setattr(globus_compute_sdk, "Client", FakeClient)
    monkeypatch.setattr(globus_compute_sdk, "Executor", FakeExecutor)


def test_default_executor_and_client_are_created_on_first_use(fake_sdk: None) -> None:
    config = config_from_mapping(
        {
            "models": {"m": {"backend_url": "http://127.0.0.1:1"}},
            "clusters": {
                CLUSTER: {
                    "launcher": "globus-compute",
                    "endpoint_id": ENDPOINT_ID,
                    "user_endpoint_config": {"account": "proj"},
                }
            },
        }
    )
    launcher = GlobusComputeLauncher(CLUSTER, config)
    assert FakeClient.created == [] and FakeExecutor.created == []  # constructing touched nothing

    first, second = launcher.launch("m"), launcher.launch("m")
    [executor] = FakeExecutor.created
    [client] = FakeClient.created
    assert executor.kwargs["endpoint_id"] == ENDPOINT_ID
    assert executor.kwargs["user_endpoint_config"] == {"account": "proj"}
    assert executor.kwargs["client"] is client
    assert [(fn, params["agent_id"]) for fn, params, _ in executor.submitted] == [
        (run_agent, first.agent_id),
        (run_agent, second.agent_id),
    ]
    assert launcher.online() is True  # the same client answers the status
    assert FakeClient.created == [client]

    summary = {"agent_id": first.agent_id, "exit_reason": "idle", "served": 3}
    executor.submitted[0][2].set_result(summary)
    assert list(launcher.summaries) == [summary]
    launcher.shutdown()
    assert executor.shutdown_args == (False, True)  # no waiting for agents; unsent tasks cancelled
