"""A private three-node RabbitMQ cluster for the tests that need one (ops/rabbitmq/local_cluster.py).

A pytest plugin (conftest.py loads it): the fixture `rabbitmq_cluster` starts the cluster on the first
test that asks for it, in a temporary directory, on free ports, with node names that carry the
session tag (so two test runs on one machine never meet), and stops it when the session ends. Every
test gets the cluster whole: nodes that an earlier test killed or stopped are started again first.

`HOTQ_TEST_CLUSTER_DIR=DIR` keeps one cluster in DIR across test runs instead (quicker while working
on these tests): it is started there when needed and left running; stop it with
`python3 ops/rabbitmq/local_cluster.py --dir DIR stop`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.rabbitmq.local_cluster import NODE_COUNT, LocalCluster, Node, port_is_free

# AMQP ports are drawn from here, distribution ports are 20000 above: both below Linux's ephemeral
# range (32768-60999), so no outgoing connection holds one by chance.
PORT_RANGE = range(6100, 9900)
# How long a test waits for RabbitMQ to do something (elect a leader, ...): generous, the machine may
# be busy and three times slower than this one.
PATIENCE_S = 300.0


def free_ports() -> tuple[int, int]:
    """Node 1's AMQP and distribution ports such that all nodes' ports are free now."""
    for _ in range(200):
        amqp = random.choice(PORT_RANGE)
        distribution = amqp + 20000
        ports = [port + offset for port in (amqp, distribution) for offset in range(NODE_COUNT)]
        if all(port_is_free(port) for port in ports):
            return amqp, distribution
    raise RuntimeError(f"no {NODE_COUNT} free consecutive ports found in {PORT_RANGE}")


@pytest.fixture(scope="session")
def rabbitmq_cluster_session(tmp_path_factory: pytest.TempPathFactory, session_tag: str) -> Iterator[LocalCluster]:
    kept = os.environ.get("HOTQ_TEST_CLUSTER_DIR")
    if kept:
        cluster = LocalCluster.open(Path(kept)) if (Path(kept) / "cluster.json").exists() else None
        if cluster is None:
            amqp, distribution = free_ports()
            cluster = LocalCluster.create(Path(kept), "hotq-test-", amqp, distribution)
        cluster.start()
        yield cluster
        return
    amqp, distribution = free_ports()
    cluster = LocalCluster.create(
        tmp_path_factory.mktemp("rabbitmq-cluster"), f"hotq-test-{session_tag}-", amqp, distribution
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


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
        time.sleep(0.5)
