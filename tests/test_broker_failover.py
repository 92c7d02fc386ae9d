"""hotq on the local three-node cluster: several broker addresses, replication, a node killed under load.

One cluster for the whole module (tests/rabbitmq_cluster.py); each test gets it with every node up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import openai
import pytest
import structlog.testing
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from openai.types.chat import ChatCompletionMessageParam

from broker import topology
from broker.connection import BROKER_LOST, connect
from broker.errors import BrokerUnavailable
from broker.messages import Lane
from ops.processes import Child, free_port, wait_until
from ops.rabbitmq.local_cluster import LocalCluster, Node
from ops.testing.deadlines import EVENTUALLY_S, LONG_WORK_S, STARTUP_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, Hold, reply_text, running_fake_backend
from ops.testing.stack import ROOT, Stack, hotq_command, write_config
from producers.request_client import RequestClient
from tests.rabbitmq_cluster import PATIENCE_S, RABBITMQCTL_POLL_S, wait_for_leader

pytestmark = pytest.mark.timeout(1800)  # the cluster's start, then minutes of load on a slow machine

# A request that gets no answer and no error for this long hangs (the API's own deadline is 600 s).
HANG_S = 300.0


def _node_of(cluster: LocalCluster, connection: AbstractRobustConnection) -> Node:
    """The node a hotq connection is connected to now."""
    transport = connection.transport
    assert transport is not None, "not connected"
    port = transport.connection.url.port
    (node,) = [node for node in cluster.nodes if node.amqp_port == port]
    return node


async def test_no_address_reachable_is_one_error_naming_each() -> None:
    closed = [f"amqp://guest:secret@127.0.0.1:{port}/v" for port in (free_port(), free_port())]
    with pytest.raises(BrokerUnavailable) as caught:
        await connect(closed, "test")
    for url in closed:
        assert url.replace("secret", "***") in caught.value.message
    assert "secret" not in caught.value.message


async def test_a_probe_on_a_connection_that_closed_meanwhile_is_a_broker_lost_error(
    amqp_url: str, session_tag: str
) -> None:
    """The scaler died in a rolling restart: its connection closed again just after it said it was
    up, and aiormq's bare RuntimeError on opening the probe's channel was not one of the errors the
    scaler skips a tick on (`BROKER_LOST`). The same moment, made on purpose: the socket closes
    under a connection whose `connected` is set."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        underlay = connection.transport
        assert underlay is not None
        await underlay.connection.close()
        connection.connected.set()
        with pytest.raises(BROKER_LOST):
            await topology.queue_depth(channel, f"test-org/probe-{session_tag}", Lane.INTERACTIVE)
    finally:
        await connection.close()


async def test_a_reply_queue_reopened_on_a_connection_that_closed_meanwhile_is_left_to_the_next_reconnect(
    amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    """The request client's side of that moment: after a reconnect it opens a new reply queue, and
    the connection may have closed again by then. That is logged and left to the next reconnect; it
    was aiormq's bare RuntimeError, an unhandled error in a background task."""
    model = f"test-org/reopen-{session_tag}"
    delete_test_queues.append(model)
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        client = await RequestClient.open(connection, [model])
        try:
            underlay = connection.transport
            assert underlay is not None
            await underlay.connection.close()
            connection.connected.set()
            with structlog.testing.capture_logs() as logged:
                await client._reopen_reply_queue()  # what a reconnect callback runs
            assert [event["event"] for event in logged] == ["reply_queue_not_opened"], logged
        finally:
            await client.close()
    finally:
        await connection.close()


async def test_connection_moves_to_another_node_and_redeclares_what_it_owns(
    rabbitmq_cluster: LocalCluster, session_tag: str
) -> None:
    cluster = rabbitmq_cluster
    model = f"test-org/moves-{session_tag}"
    connection = await connect(cluster.urls, "test", heartbeat_s=5)
    try:
        first = _node_of(cluster, connection)
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        channel = await connection.channel()
        await topology.declare_model_queues(channel, [model], (Lane.INTERACTIVE,))
        name = topology.request_queue_name(model, Lane.INTERACTIVE)
        # An exclusive queue lives and dies with its node and connection: re-declared on the new one.
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            received.put_nowait(message.body)

        private = await channel.declare_queue(exclusive=True)
        await private.consume(on_message, no_ack=True)
        request_queue = await channel.get_queue(name)
        await request_queue.consume(on_message, no_ack=True)

        await asyncio.to_thread(cluster.kill, first)
        async with asyncio.timeout(PATIENCE_S):
            await reconnected.wait()
        assert _node_of(cluster, connection) != first
        survivors = [node for node in cluster.nodes if node != first]
        await asyncio.to_thread(wait_for_leader, cluster, name, survivors)

        # Messages published through a survivor reach both consumers on the new connection.
        other = await aio_pika.connect(survivors[-1].url)
        async with other:
            publishing = await other.channel()
            for routing_key, body in ((name, b"to the request queue"), (private.name, b"to the private queue")):
                message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await publishing.default_exchange.publish(message, routing_key=routing_key, mandatory=True)
        async with asyncio.timeout(PATIENCE_S):
            got = {await received.get(), await received.get()}
        assert got == {b"to the request queue", b"to the private queue"}
        await channel.queue_delete(name)
    finally:
        await connection.close()


async def test_replication_factor_for_new_queues_and_existing_queues_kept_as_they_are(
    rabbitmq_cluster: LocalCluster, session_tag: str
) -> None:
    cluster = rabbitmq_cluster
    new_model, old_model = f"test-org/two-way-{session_tag}", f"test-org/older-{session_tag}"
    old_name = topology.request_queue_name(old_model, Lane.BATCH)
    # A queue as hotq declared it before it set a replication factor (or definitions.json made it).
    plain = await aio_pika.connect(cluster.nodes[0].url)
    async with plain:
        channel = await plain.channel()
        await channel.declare_queue(old_name, durable=True, arguments=topology.request_queue_arguments())

    connection = await connect(cluster.urls, "test", quorum_replicas=2)
    try:
        channel = await connection.channel()
        await topology.declare_model_queues(channel, [new_model, old_model], (Lane.BATCH,))
        results = await topology.declare_results_queue(channel, f"batch_{session_tag}")
        assert await topology.queue_depth(channel, old_model, Lane.BATCH) == (0, 0)
        # The channel the declarations went through is still open: no refused declare closed it.
        await channel.declare_exchange(topology.REQUEST_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)

        queues = {queue.name: queue for queue in await asyncio.to_thread(cluster.quorum_queues)}
        assert len(queues[topology.request_queue_name(new_model, Lane.BATCH)].members) == 2
        assert len(queues[results.name].members) == 2
        assert len(queues[old_name].members) == 3, "an existing queue is left as it is"
        for name in (topology.request_queue_name(new_model, Lane.BATCH), old_name, results.name):
            await channel.queue_delete(name)
    finally:
        await connection.close()


@dataclass
class Outcome:
    started: float
    ended: float
    kind: str  # "answered", "refused" (an OpenAI error the client can retry) or what went wrong
    detail: str = ""


@dataclass
class InteractiveLoad:
    """Threads that send chat requests (streams and not) one after another until stopped."""

    client: openai.OpenAI
    model: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, worker: int) -> None:
        number = 0
        while not self.stop.is_set():
            number += 1
            text = f"load {worker} {number}"
            started = time.monotonic()
            kind, detail = self._one(text, stream=number % 2 == 0)
            self.outcomes.append(Outcome(started, time.monotonic(), kind, detail))

    def _one(self, text: str, stream: bool) -> tuple[str, str]:
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": text}]
        expected = reply_text([{"role": "user", "content": text}], None)
        extra = {"fake_delay_ms": 20}
        try:
            if stream:
                chunks = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    stream=True,
                    extra_body=extra,
                )
                parts, finished = [], None
                for chunk in chunks:
                    if chunk.choices:
                        parts.append(chunk.choices[0].delta.content or "")
                        finished = chunk.choices[0].finish_reason or finished
                if finished is None:
                    return "cut", "the stream ended without a finish_reason or an error"
                answer = "".join(parts)
            else:
                completion = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    extra_body=extra,
                )
                answer = completion.choices[0].message.content or ""
        except openai.APITimeoutError as exc:
            return "hung", repr(exc)
        except openai.APIStatusError as exc:
            error = exc.body if isinstance(exc.body, dict) else {}
            explicit = exc.status_code in (502, 503) and bool(error.get("message")) and bool(error.get("type"))
            return ("refused" if explicit else "unexpected status"), f"{exc.status_code} {exc.body}"
        except openai.APIConnectionError as exc:
            return "cut", repr(exc)
        except openai.APIError as exc:  # an error event inside a stream that had started
            return ("refused" if exc.message else "unexpected error"), exc.message
        return ("answered", "") if answer == expected else ("wrong answer", answer)


# Acceptance test 1's batch; the rolling restart's is smaller (the same proof, a shorter run).
BATCH_LINES = 5000
ROLLING_BATCH_LINES = 1000
SUBMIT_LINES = 500
LOAD_THREADS = 4


@dataclass
class UnderLoad:
    """A stack on the cluster with interactive load running and a batch in flight."""

    cluster: LocalCluster
    client: openai.OpenAI
    load: InteractiveLoad
    batch_id: str
    batch_lines: int
    workers: list[Child]
    started: float

    def answered_since(self, since: float) -> int:
        return sum(1 for o in list(self.load.outcomes) if o.kind == "answered" and o.started >= since)

    def wait_for_answers_since(self, since: float, count: int = 20) -> None:
        wait_until(lambda: self.answered_since(since) >= count, LONG_WORK_S, f"{count} interactive answers")

    def gap_after(self, moment: float) -> float:
        """The longest time after `moment` in which no answer arrived (the failover's cost)."""
        ends = sorted(o.ended for o in list(self.load.outcomes) if o.kind == "answered" and o.ended >= moment)
        return max(later - earlier for earlier, later in zip([moment, *ends], ends, strict=False))

    def batch_done(self) -> int:
        counts = self.client.batches.retrieve(self.batch_id).request_counts
        return 0 if counts is None else counts.completed


def _agent_model(model: str) -> str:
    return model + "-agent"


def _answers(client: openai.OpenAI, model: str) -> bool:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}])
    except openai.APIStatusError as error:
        assert error.status_code == 503, error  # refused while it reconnects: ask again
        return False
    return True


def _unanswered(data_dir: Path, batch_id: str) -> list[str]:
    """The custom ids of a batch's lines that have no result in the job store (for a failure's message)."""
    with sqlite3.connect(f"file:{data_dir / 'jobs.db'}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute(
            "SELECT custom_id FROM lines WHERE batch_id = ? AND custom_id NOT IN"
            " (SELECT custom_id FROM results WHERE batch_id = ?) ORDER BY line",
            (batch_id, batch_id),
        ).fetchall()
    return [custom_id for (custom_id,) in rows]


@dataclass
class FailoverStack:
    stack: Stack
    model: str
    client: openai.OpenAI


@pytest.fixture(scope="module")
def failover_stack(
    rabbitmq_cluster_session: LocalCluster, tmp_path_factory: pytest.TempPathFactory, session_tag: str
) -> Iterator[FailoverStack]:
    """For the acceptance tests, one stack on the cluster, connected through node 1 (the first address):
    the API and a worker for a model on a fake backend, and `hotq scale` keeping one agent hot for a
    second model (in `stack.workers`, the worker first)."""
    cluster = rabbitmq_cluster_session
    cluster.start()
    workdir = tmp_path_factory.mktemp("failover")
    model = f"test-org/failover-{session_tag}"
    with running_fake_backend([model]) as backend_url:
        models: dict[str, dict[str, object]] = {
            model: {"backend_url": backend_url, "max_inflight": 8, "reserved_interactive": 4},
            _agent_model(model): {"command": FAKE_BACKEND_COMMAND, "min_hot": 1, "max_inflight": 2},
        }
        stack = Stack(write_config(workdir / "hotq.toml", cluster.urls, models, None), workdir)
        try:
            stack.start_api()
            stack.start_worker(model)
            scaler = Child(
                "scale", hotq_command("scale", "--config", str(stack.config)), workdir / "scale.log", cwd=ROOT
            )
            stack.workers.append(scaler)
            client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=HANG_S)
            wait_until(lambda: _answers(client, _agent_model(model)), STARTUP_S, "the scaler's agent answers", scaler)
            yield FailoverStack(stack, model, client)
        finally:
            stack.close()


@contextlib.contextmanager
def under_load(cluster: LocalCluster, running: FailoverStack, workdir: Path, batch_lines: int) -> Iterator[UnderLoad]:
    """Four threads of streams and non-streams, a batch and a `hotq submit` job on the stack; on
    leaving, checks that nothing was lost or doubled, and that the worker, the scaler and its agent
    carry on."""
    stack, model, client = running.stack, running.model, running.client
    threads: list[threading.Thread] = []
    # The second half of the batch's and the job's lines wait in the backend until the disruption is
    # over: both are surely under way when it happens.
    hold = Hold(workdir / "release")

    def held(line: int, lines: int) -> dict[str, object]:
        return hold.field if line >= lines // 2 else {}

    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"n {i}"}]} | held(i, batch_lines),
        }
        for i in range(batch_lines)
    ]
    upload = "".join(json.dumps(line) + "\n" for line in lines).encode()
    input_id = client.files.create(file=("input.jsonl", upload), purpose="batch").id
    batch = client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h")
    # And a `hotq submit` job beside it: its own connection through the first address.
    prompts = workdir / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"p {i}"}]} | held(i, SUBMIT_LINES)) + "\n"
            for i in range(SUBMIT_LINES)
        )
    )
    results = workdir / "submitted.jsonl"
    submit_command = hotq_command(
        "submit", str(prompts), "--model", model, "--out", str(results), "--config", str(stack.config)
    )
    submit = Child("submit", submit_command, workdir / "submit.log", cwd=ROOT)
    try:
        load = InteractiveLoad(client, model)
        for worker in range(LOAD_THREADS):
            threads.append(threading.Thread(target=load.run, args=(worker,), daemon=True))
            threads[-1].start()
        try:
            under = UnderLoad(cluster, client, load, batch.id, batch_lines, stack.workers, time.monotonic())
            under.wait_for_answers_since(under.started)
            yield under
        finally:
            hold.release()
            load.stop.set()
            for thread in threads:
                thread.join(HANG_S + 60)
        assert not any(thread.is_alive() for thread in threads), "a load thread still waits for an answer"
        outcomes = list(load.outcomes)
        kinds = {kind: sum(1 for o in outcomes if o.kind == kind) for kind in {o.kind for o in outcomes}}
        bad = [o for o in outcomes if o.kind not in ("answered", "refused")]
        assert not bad, f"requests neither answered nor refused explicitly: {bad[:5]} (all: {kinds})"
        print(f"\ninteractive outcomes: {kinds}")

        # The batch completes with exactly one result per line.
        def batch_finished() -> bool:
            return client.batches.retrieve(batch.id).status in ("completed", "failed", "expired", "cancelled")

        data_dir = stack.workdir / "data"
        try:
            wait_until(batch_finished, LONG_WORK_S, f"batch {batch.id} finished")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; lines without a result: {_unanswered(data_dir, batch.id)[:50]}") from None
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.request_counts is not None, done
        counts = (done.request_counts.completed, done.request_counts.failed)
        assert counts == (batch_lines, 0), f"{counts}; unanswered: {_unanswered(data_dir, batch.id)[:50]}"
        assert done.output_file_id is not None
        records = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        assert sorted(record["custom_id"] for record in records) == sorted(f"line-{i}" for i in range(batch_lines))
        # The worker and the scaler carry on, and so does the agent it launched: it answers again.
        wait_until(lambda: _answers(client, _agent_model(model)), EVENTUALLY_S, "the agent's model answers")
        assert all(child.poll() is None for child in stack.workers)
        assert submit.wait(timeout=LONG_WORK_S) == 0, submit.log_text()
        submitted = [json.loads(line) for line in results.read_text().splitlines()]
        missing = sorted({str(n) for n in range(1, SUBMIT_LINES + 1)} - {r["custom_id"] for r in submitted})
        assert [record["custom_id"] for record in submitted] == [str(n) for n in range(1, SUBMIT_LINES + 1)], missing
        assert all(record["error"] is None for record in submitted)
    finally:
        if submit.poll() is None:  # the test failed before it finished
            submit.kill()
            submit.wait()


def test_killing_the_request_queues_leader_under_load(
    rabbitmq_cluster: LocalCluster, failover_stack: FailoverStack, tmp_path: Path
) -> None:
    """Acceptance test 1: streams and non-streams keep coming, a 5,000-line batch and a `hotq submit`
    job run while the node leading the model's interactive queue is killed with SIGKILL."""
    cluster = rabbitmq_cluster
    queue = topology.request_queue_name(failover_stack.model, Lane.INTERACTIVE)
    with under_load(cluster, failover_stack, tmp_path, BATCH_LINES) as running:
        leading = wait_for_leader(cluster, queue, list(cluster.nodes))
        done_before = running.batch_done()
        killed_at = time.monotonic()
        cluster.kill(leading)
        running.wait_for_answers_since(killed_at)
        assert done_before < BATCH_LINES, "the batch finished before the kill"
        # RabbitMQ 3.10 keeps what consumers connected through the crashed node had taken (1 to 5 lines
        # seen) checked out to those dead consumers, even after the node is back, until the queue gets
        # a new leader; it is delivered again then, not lost. The operator's remedy, done here: bring the
        # node back, then restart the node leading the batch lane's queue cleanly (leadership moves).
        cluster.start_node(leading)
        batch_queue = topology.request_queue_name(failover_stack.model, Lane.BATCH)
        batch_leader = wait_for_leader(cluster, batch_queue, list(cluster.nodes))
        cluster.stop_node(batch_leader)
        cluster.start_node(batch_leader)
        print(
            f"\nkilled {leading.name}, the leader (the stack is on {cluster.nodes[0].name}), with "
            f"{done_before}/{BATCH_LINES} batch lines done; longest time without an answer: "
            f"{running.gap_after(killed_at):.2f} s"
        )


def _all_members_online(cluster: LocalCluster) -> bool:
    return all(set(queue.online) == set(queue.members) for queue in cluster.quorum_queues())


def test_clean_stop_and_rolling_restart_under_load(
    rabbitmq_cluster: LocalCluster, failover_stack: FailoverStack, tmp_path: Path
) -> None:
    """Acceptance test 2: every node stopped cleanly and started again in turn (a rolling upgrade; the
    first step is the clean stop and restart of one node), under load: nothing lost."""
    cluster = rabbitmq_cluster
    with under_load(cluster, failover_stack, tmp_path, ROLLING_BATCH_LINES) as running:
        for node in cluster.nodes:
            stopped_at = time.monotonic()
            cluster.stop_node(node)
            running.wait_for_answers_since(stopped_at, 5)
            cluster.start_node(node)
            online = "every quorum queue's replicas online"
            wait_until(lambda: _all_members_online(cluster), LONG_WORK_S, online, poll_s=RABBITMQCTL_POLL_S)
            gap = running.gap_after(stopped_at)
            print(f"\n{node.name} stopped and back; longest time without an answer: {gap:.2f} s")
        running.wait_for_answers_since(time.monotonic())
