"""The local three-node cluster (ops/rabbitmq/local_cluster.py) replicates quorum queues and survives a crash."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aio_pika
import pytest
from pamqp.common import FieldTable

from ops.rabbitmq.local_cluster import LocalCluster, Node
from tests.rabbitmq_cluster import PATIENCE_S, wait_for_leader

SCRIPT = Path(__file__).resolve().parent.parent / "ops" / "rabbitmq" / "local_cluster.py"

# Starting the cluster (on the first test that needs it) takes ~30 s here, maybe minutes on a slow machine.
pytestmark = pytest.mark.timeout(900)


async def get_one(node: Node, queue_name: str) -> bytes:
    """One message from the queue through `node`, acknowledged; waits for it (after a failover too)."""
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        async with asyncio.timeout(PATIENCE_S):
            while (message := await queue.get(fail=False)) is None:
                await asyncio.sleep(0.2)
        await message.ack()
        return message.body


async def publish(node: Node, queue_name: str, *bodies: bytes) -> None:
    """Publish persistent messages through `node`; returns once the cluster confirmed each."""
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()  # publisher confirms: publish waits for the broker's ack
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue_name, mandatory=True)


async def test_quorum_queue_keeps_its_messages_when_its_leader_is_killed(
    rabbitmq_cluster: LocalCluster, session_tag: str
) -> None:
    cluster = rabbitmq_cluster
    first, second, third = cluster.nodes
    queue_name = f"hotq.test.failover-{session_tag}"

    connection = await aio_pika.connect(first.url)
    async with connection:
        channel = await connection.channel()
        arguments: FieldTable = {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
        await channel.declare_queue(queue_name, durable=True, arguments=arguments)
    (status,) = [queue for queue in await asyncio.to_thread(cluster.quorum_queues) if queue.name == queue_name]
    assert set(status.members) == {node.name for node in cluster.nodes}, "three replicas, one per node"

    # Published through one node, consumed through another: the queue is the cluster's, not a node's.
    await publish(second, queue_name, b"first", b"kept")
    assert await get_one(third, queue_name) == b"first"

    leader = await asyncio.to_thread(wait_for_leader, cluster, queue_name, list(cluster.nodes))
    await asyncio.to_thread(cluster.kill, leader)
    survivors = [node for node in cluster.nodes if node != leader]
    new_leader = await asyncio.to_thread(wait_for_leader, cluster, queue_name, survivors)
    assert new_leader != leader

    # The confirmed message is still there, through a node that was not the leader, and the queue
    # takes new work with two of three nodes up.
    survivor = survivors[-1]
    assert await get_one(survivor, queue_name) == b"kept"
    await publish(survivors[0], queue_name, b"after the crash")
    assert await get_one(survivor, queue_name) == b"after the crash"

    connection = await aio_pika.connect(survivor.url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue_name)


async def test_command_line_shows_nodes_leaders_and_urls(
    rabbitmq_cluster: LocalCluster, session_tag: str, tmp_path: Path
) -> None:
    """What an operator runs: the script with the system's python3, outside the repository and the venv."""
    cluster = rabbitmq_cluster
    queue_name = f"hotq.test.status-{session_tag}"
    connection = await aio_pika.connect(cluster.nodes[1].url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})

        def run(*command: str) -> str:
            python = shutil.which("python3") or "python3"
            arguments = [python, str(SCRIPT), "--dir", str(cluster.directory), *command]
            done = subprocess.run(arguments, cwd=tmp_path, capture_output=True, text=True, timeout=PATIENCE_S)
            assert done.returncode == 0, done.stderr
            return done.stdout

        status = await asyncio.to_thread(run, "status")
        for node in cluster.nodes:
            assert f"{node.name}" in status and f"{node.amqp_port}" in status
        assert status.count("running (pid") == 3
        leader = await asyncio.to_thread(cluster.leader, queue_name)
        assert leader is not None
        assert f"/ {queue_name}: leader {leader.name}, 3/3 members online" in status
        assert (await asyncio.to_thread(run, "urls")).strip() == ",".join(cluster.urls)
        await channel.queue_delete(queue_name)
