"""A private three-node RabbitMQ cluster for the tests that need one (ops/rabbitmq/local_cluster.py).

A pytest plugin (conftest.py loads it): when a test of the session asks for the fixture
`rabbitmq_cluster`, the cluster starts in the background with the session's first test (under
pytest-xdist: with the worker's first test that asks; the test waits for it), in a temporary
directory, on free ports, with node names that carry the session tag (so two test runs on one
machine never meet), and stops when the session ends. Every test gets the cluster whole: nodes
that an earlier test killed or stopped are started again first.

`HOTQ_TEST_CLUSTER_DIR=DIR` keeps one cluster in DIR across test runs instead (quicker while working
on these tests): it is started there when needed and left running; stop it with
`python3 ops/rabbitmq/local_cluster.py --dir DIR stop`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from ops.rabbitmq.local_cluster import NODE_COUNT, LocalCluster, Node, port_is_free
from tests.session_resources import CLUSTER_FIXTURES, start_early

# AMQP ports are drawn from here, distribution ports are 20000 above: both below Linux's ephemeral
# range (32768-60999), so no outgoing connection holds one by chance.
PORT_RANGE = range(6100, 9900)
# How long a test waits for RabbitMQ to do something (elect a leader, ...): generous, the machine may
# be busy and three times slower than this one.
PATIENCE_S = 300.0
# How often a wait looks at the cluster again: each look is a rabbitmqctl call, which starts an
# Erlang VM (about 0.9 s and a CPU-second).
RABBITMQCTL_POLL_S = 2.0


def free_ports() -> tuple[int, int]:
    """Node 1's AMQP and distribution ports such that all nodes' ports are free now."""
    for _ in range(200):
        amqp = random.choice(PORT_RANGE)
        distribution = amqp + 20000
        ports = [port + offset for port in (amqp, distribution) for offset in range(NODE_COUNT)]
        if all(port_is_free(port) for port in ports):
            return amqp, distribution
    raise RuntimeError(f"no {NODE_COUNT} free consecutive ports found in {PORT_RANGE}")


def _session_cluster(tmp_path_factory: pytest.TempPathFactory, session_tag: str) -> tuple[LocalCluster, bool]:
    """The session's cluster, and whether the session owns it (stops it when it ends)."""
    kept = os.environ.get("HOTQ_TEST_CLUSTER_DIR")
    if kept:
        if (Path(kept) / "cluster.json").exists():
            return LocalCluster.open(Path(kept)), False
        amqp, distribution = free_ports()
        return LocalCluster.create(Path(kept), "hotq-test-", amqp, distribution), False
    amqp, distribution = free_ports()
    directory = tmp_path_factory.mktemp("rabbitmq-cluster")
    return LocalCluster.create(directory, f"hotq-test-{session_tag}-", amqp, distribution), True


@pytest.fixture(scope="session", autouse=True)
def rabbitmq_cluster_starting(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, session_tag: str
) -> Iterator[Callable[[], LocalCluster]]:
    """Gives the session's cluster, started. Three nodes boot and join for tens of seconds, mostly
    waiting on each other, so the start runs in a thread and, where it can, begins with the session's
    first test (`start_early`)."""
    with ThreadPoolExecutor(1, thread_name_prefix="rabbitmq-cluster") as pool:
        made: tuple[LocalCluster, bool] | None = None
        starting: Future[None] | None = None

        def start() -> Future[None]:
            nonlocal made, starting
            if starting is None:
                made = _session_cluster(tmp_path_factory, session_tag)
                starting = pool.submit(made[0].start)
            return starting

        def started() -> LocalCluster:
            start().result()
            assert made is not None
            return made[0]

        if start_early(request, CLUSTER_FIXTURES):
            start()
        try:
            yield started
        finally:
            if starting is not None and made is not None:
                wait([starting])  # a cluster is stopped only once its start is over, failed or not
                cluster, owned = made
                if owned:
                    cluster.stop()


@pytest.fixture(scope="session")
def rabbitmq_cluster_session(rabbitmq_cluster_starting: Callable[[], LocalCluster]) -> LocalCluster:
    return rabbitmq_cluster_starting()


@pytest.fixture
def rabbitmq_cluster(rabbitmq_cluster_session: LocalCluster) -> LocalCluster:
    """The session's cluster with every node running (a node an earlier test killed comes back)."""
    rabbitmq_cluster_session.start()
    return rabbitmq_cluster_session


def wait_for_leader(cluster: LocalCluster, queue: str, among: list[Node], vhost: str = "/") -> Node:
    """The node that leads quorum queue `queue` once it is one of `among` (after a failover, say)."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        leader = cluster.leader(queue, vhost, via=among[0])
        if leader in among:
            return leader
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue}: no leader among {[node.name for node in among]} after {PATIENCE_S} s")
        time.sleep(RABBITMQCTL_POLL_S)
