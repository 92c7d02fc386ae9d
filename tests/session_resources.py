"""When to start a resource the session shares (the private RabbitMQ cluster, the shared vLLM)."""

from __future__ import annotations

import os

import pytest

# The fixtures that need each resource (a test asking for either needs it).
CLUSTER_FIXTURES = {"rabbitmq_cluster", "rabbitmq_cluster_session"}
SHARED_VLLM_FIXTURE = "shared_vllm"


def start_early(request: pytest.FixtureRequest, fixtures: set[str]) -> bool:
    """Whether to start it with the session's first test, so that it loads while other tests run: when
    a selected test asks for one of `fixtures`. A pytest-xdist worker cannot tell which tests it will
    be given, so there it starts when its first test asks (the other workers go on meanwhile)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    return any(
        isinstance(item, pytest.Function) and fixtures & set(item.fixturenames) for item in request.session.items
    )
