"""One real vLLM server for the session, for the tests that need "vLLM serving the embedded model"
but not hotq starting it (those that prove `hotq up` or the scaler start vLLM keep their own).

A pytest plugin (conftest.py loads it). vLLM takes 30 to 100 s to load on a small CPU, most of it
waiting on itself, so when the session holds a test that asks for `shared_vllm`, the server starts
with the session's first test (under pytest-xdist: with the worker's first test that asks) and loads
while the tests before that one run; `shared_vllm` waits
until it answers. It serves the model under one name, `SharedVllm.model`: a test gives that name to
its hotq model (`backend_url` = `SharedVllm.url`), since a worker passes the client's body to vLLM
as it is. The server stops when the session ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from broker.config import ModelConfig
from hpc_agents.backend_process import BackendProcess, backend_environment
from hpc_agents.embedded_model import default_cache_dir, ensure_embedded_model
from hpc_agents.vllm_command import vllm_command
from ops.processes import free_port
from ops.testing.deadlines import VLLM_STARTUP_S
from tests.session_resources import SHARED_VLLM_FIXTURE, start_early


@dataclass(frozen=True)
class SharedVllm:
    url: str  # vLLM's own address (no /v1)
    model: str  # the name it serves the embedded model as


@pytest.fixture(scope="session", autouse=True)
def shared_vllm_process(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, session_tag: str
) -> Iterator[Callable[[], tuple[BackendProcess, str]]]:
    """Gives the server, started (not yet ready); where it can, it starts with the session's first
    test (`start_early`)."""
    running: tuple[BackendProcess, str] | None = None

    def start() -> tuple[BackendProcess, str]:
        nonlocal running
        if running is None:
            model = f"smollm-shared-{session_tag}"
            port = free_port()
            environment = backend_environment(ModelConfig(), default_cache_dir())
            command = vllm_command(str(ensure_embedded_model(log=lambda _: None)), model, port)
            server = BackendProcess(command, environment, port, tmp_path_factory.mktemp("shared-vllm") / "vllm.log")
            server.start()
            running = server, model
        return running

    if start_early(request, {SHARED_VLLM_FIXTURE}):
        start()
    try:
        yield start
    finally:
        if running is not None:
            asyncio.run(running[0].stop())


@pytest.fixture(scope="session")
def shared_vllm(
    shared_vllm_process: Callable[[], tuple[BackendProcess, str]], delete_test_queues: list[str]
) -> SharedVllm:
    server, model = shared_vllm_process()
    delete_test_queues.append(model)
    asyncio.run(server.wait_ready(VLLM_STARTUP_S))
    return SharedVllm(server.url, model)
