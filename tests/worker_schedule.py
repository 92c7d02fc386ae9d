"""How `make test` shares the suite out between its pytest-xdist workers.

Whole modules go to a worker (a module's stack starts once), and the modules that share a session
resource go to the same one: those on the private RabbitMQ cluster (one cluster), and those on the
session's vLLM server (one server). The modules that take minutes are handed out first, so that the
workers finish near together. (pytest-xdist's own `--dist loadgroup` marks do not reach its
scheduler under pytest 9.2, so the grouping is done here, from the module's name.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

# Modules that must share a worker, by the resource they share.
MODULE_GROUPS = {
    "test_rabbitmq_cluster": "rabbitmq-cluster",
    "test_broker_failover": "rabbitmq-cluster",
    "test_affinity_vllm": "shared-vllm",
    "test_api_workers": "shared-vllm",
    "test_vllm_migration": "shared-vllm",
}
# The longest first (`--durations` on a 2-core machine, modules sharing a worker counted together), so
# that the short modules fill in at the end and the workers finish near together.
SLOW_FIRST = [
    "test_affinity_vllm",
    "test_api_workers",
    "test_vllm_migration",
    "test_broker_failover",
    "test_rabbitmq_cluster",
    "test_large_jobs",
    "test_vllm",
    "test_cold_start",
    "test_submit",
    "test_vllm_cold_start",
    "test_delivery",
    "test_auth",
    "test_batches",
    "test_stream_migration",
    "test_scaler",
    "test_settlement",
]


class ModuleGroupScheduling(LoadScopeScheduling):
    """pytest-xdist's scope scheduling, with a module's group (or the module itself) as the scope."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return MODULE_GROUPS.get(Path(module).stem, module)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> ModuleGroupScheduling:
    return ModuleGroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow modules first; the order of the rest is kept (workers hand units out in this order)."""
    rank = {module: place for place, module in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(SLOW_FIRST)))
