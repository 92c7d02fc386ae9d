"""Transport security: RabbitMQ roles from ops/rabbitmq/definitions.json, TLS settings, secret-free logs.

The definitions are loaded into a throwaway vhost with throwaway users (tests/rabbitmq_roles.py),
then each role is tried against what it must and must not be able to do, and a whole stack runs
with the API and the worker each connected as its own role.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import aiormq
import httpx
import pytest

from broker import topology
from broker.config import parse_config
from broker.connection import ssl_context
from broker.errors import ConfigError
from broker.jobstore import JobStore
from broker.messages import Lane
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.stack import Stack, write_config
from tests import rabbitmq_roles

pytestmark = pytest.mark.skipif(not rabbitmq_roles.have_rabbitmqctl(), reason="needs rabbitmqctl on this machine")

Refused = aiormq.exceptions.ChannelAccessRefused


@pytest.fixture(scope="module")
def roles(amqp_url: str) -> Iterator[rabbitmq_roles.RoleBroker]:
    broker, _ = rabbitmq_roles.load_definitions(uuid.uuid4().hex[:8])
    try:
        yield broker
    finally:
        rabbitmq_roles.unload(broker)


@pytest.fixture(scope="module")
def model(session_tag: str) -> str:
    return f"test-org/roles-{session_tag}"


@pytest.fixture
async def as_role(roles: rabbitmq_roles.RoleBroker) -> AsyncIterator[dict[str, aio_pika.abc.AbstractConnection]]:
    """One plain (not robust) connection per role; a refused operation closes only its channel."""
    connections: dict[str, aio_pika.abc.AbstractConnection] = {
        role: await aio_pika.connect(roles.url(role)) for role in rabbitmq_roles.ROLES
    }
    yield connections
    for connection in connections.values():
        await connection.close()


async def _declare_as_scaler(connection: aio_pika.abc.AbstractConnection, model: str) -> None:
    """The scaler's role creates the request queues (the API's role may not: see ops/rabbitmq/README.md)."""
    channel = await connection.channel()
    await topology.declare_model_queues(channel, [model])
    await channel.close()


async def _depth(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return declared.declaration_result.message_count or 0


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


def test_definitions_name_hotqs_queues_and_exchanges() -> None:
    """The permission regexes cover exactly the names broker/topology.py makes."""
    definitions = json.loads(rabbitmq_roles.DEFINITIONS.read_text())
    perms = {p["user"].removeprefix("hotq-"): p for p in definitions["permissions"]}
    request = topology.request_queue_name("org/Model.v1", Lane.INTERACTIVE, "polaris")
    reply = f"{topology.REPLY_QUEUE_PREFIX}host.123.abcd1234"
    results = topology.results_queue_name("batch_abc")
    cancel = f"{topology.CANCEL_QUEUE_PREFIX}worker-1"

    def may(role: str, kind: str, name: str) -> bool:
        return re.search(perms[role][kind], name) is not None

    assert may("agent", "read", request) and not may("api", "read", request)
    assert may("api", "write", topology.REQUEST_EXCHANGE) and not may("agent", "write", topology.REQUEST_EXCHANGE)
    assert may("agent", "write", topology.REPLY_EXCHANGE) and not may("api", "write", topology.REPLY_EXCHANGE)
    assert not any(may(role, "write", "amq.default") for role in perms)  # the default exchange reaches any queue
    assert may("api", "read", reply) and not may("agent", "read", reply) and not may("scaler", "read", reply)
    assert may("api", "read", results) and not may("agent", "read", results)
    assert may("agent", "read", cancel) and not may("api", "read", cancel)
    directory = "amq_" + uuid.uuid4().hex  # aio-pika's name for a robust channel's unnamed queue
    assert all(may(role, kind, directory) for role in ("api", "scaler") for kind in ("configure", "write", "read"))
    assert may("agent", "write", topology.EVENTS_EXCHANGE) and may("scaler", "read", topology.EVENTS_EXCHANGE)
    assert may("api", "read", topology.USAGE_QUEUE) and not may("agent", "read", topology.USAGE_QUEUE)
    (usage,) = [queue for queue in definitions["queues"] if queue["name"] == topology.USAGE_QUEUE]
    assert usage["arguments"] == topology.usage_queue_arguments()  # or the API's own declaration is refused
    # The scaler publishes only its capacity outlook, on the events exchange.
    exchanges = (topology.REQUEST_EXCHANGE, topology.REPLY_EXCHANGE, topology.CONTROL_EXCHANGE)
    assert not any(may("scaler", "write", exchange) for exchange in exchanges)
    assert may("scaler", "write", topology.EVENTS_EXCHANGE)


async def test_agent_cannot_publish_to_a_request_queue(as_role: dict, model: str) -> None:
    await _declare_as_scaler(as_role["scaler"], model)
    queue = topology.request_queue_name(model, Lane.INTERACTIVE)
    agent = as_role["agent"]
    message = aio_pika.Message(b"forged request")

    channel = await agent.channel()
    exchange = await channel.get_exchange(topology.REQUEST_EXCHANGE)  # passive: allowed, it exists
    with pytest.raises(Refused, match="access to exchange 'hotq.requests'"):
        await exchange.publish(message, routing_key=queue)

    channel = await agent.channel()
    with pytest.raises(Refused, match="access to exchange 'amq.default'"):
        await channel.default_exchange.publish(message, routing_key=queue)

    # The one exchange it may publish to routes only to reply and results queues.
    channel = await agent.channel(on_return_raises=True)
    replies = await channel.get_exchange(topology.REPLY_EXCHANGE)
    with pytest.raises(aio_pika.exceptions.DeliveryError):
        await replies.publish(message, routing_key=queue, mandatory=True)
    # ... and it cannot bind a request queue there (nor anywhere it publishes to).
    channel = await agent.channel()
    request_queue = await channel.get_queue(queue)
    with pytest.raises(Refused, match="access to exchange 'hotq.replies'"):
        await request_queue.bind(topology.REPLY_EXCHANGE, routing_key=queue)
    channel = await agent.channel()
    request_queue = await channel.get_queue(queue)
    with pytest.raises(Refused, match="access to exchange 'hotq.events'"):
        await request_queue.bind(topology.EVENTS_EXCHANGE, routing_key="agent.#")

    assert await _depth(as_role["scaler"], queue) == 0


async def test_agent_cannot_consume_another_process_s_replies(as_role: dict, model: str) -> None:
    api, agent = as_role["api"], as_role["agent"]
    name = f"{topology.REPLY_QUEUE_PREFIX}someone-else.{uuid.uuid4().hex[:8]}"
    api_channel = await api.channel()
    await topology.declare_exchanges(api_channel)
    reply_queue = await api_channel.declare_queue(name, arguments={"x-expires": topology.REPLY_QUEUE_EXPIRES_MS})
    await topology.bind_reply_queue(api_channel, reply_queue)

    channel = await agent.channel()
    with pytest.raises(Refused, match=f"access to queue '{re.escape(name)}'"):
        await (await channel.get_queue(name)).consume(_ignore)
    channel = await agent.channel()
    with pytest.raises(Refused, match="access to queue"):
        await (await channel.get_queue(name)).get(fail=False)
    # Nor reroute them into a queue of its own: binding from hotq.replies needs read on it.
    channel = await agent.channel()
    own = await channel.declare_queue(f"{topology.CANCEL_QUEUE_PREFIX}{uuid.uuid4().hex[:8]}", exclusive=True)
    with pytest.raises(Refused, match="access to exchange 'hotq.replies'"):
        await own.bind(topology.REPLY_EXCHANGE, routing_key=name)

    # What it may do: answer into the reply queue, which the API's role reads.
    channel = await agent.channel(publisher_confirms=True, on_return_raises=True)
    replies = await channel.get_exchange(topology.REPLY_EXCHANGE)
    await replies.publish(aio_pika.Message(b"a reply frame"), routing_key=name, mandatory=True)
    received = await reply_queue.get(timeout=EVENTUALLY_S)
    assert received.body == b"a reply frame"
    await api_channel.queue_delete(name)


async def test_api_cannot_consume_request_queues(as_role: dict, model: str) -> None:
    await _declare_as_scaler(as_role["scaler"], model)
    api = as_role["api"]
    queue = topology.request_queue_name(model, Lane.BATCH)

    channel = await api.channel()
    with pytest.raises(Refused, match="access to queue"):
        await (await channel.get_queue(queue)).consume(_ignore)
    channel = await api.channel()
    with pytest.raises(Refused, match="access to queue"):
        await (await channel.get_queue(queue)).get(fail=False)

    # It publishes requests (and re-declares the existing queues at start-up, as RequestClient does).
    channel = await api.channel(publisher_confirms=True, on_return_raises=True)
    await topology.declare_model_queues(channel, [model])
    exchange = await channel.get_exchange(topology.REQUEST_EXCHANGE)
    await exchange.publish(aio_pika.Message(b"a request"), routing_key=queue, mandatory=True)
    assert await _depth(as_role["scaler"], queue) == 1

    # The agent's role takes it; the scaler's role cannot publish requests.
    channel = await as_role["agent"].channel()
    taken = await (await channel.get_queue(queue)).get(timeout=EVENTUALLY_S)
    await taken.ack()
    channel = await as_role["scaler"].channel()
    exchange = await channel.get_exchange(topology.REQUEST_EXCHANGE)
    with pytest.raises(Refused, match="access to exchange 'hotq.requests'"):
        await exchange.publish(aio_pika.Message(b"a request"), routing_key=queue)


def test_roles_serve_requests_and_logs_keep_no_secrets(
    tmp_path: Path, roles: rabbitmq_roles.RoleBroker, model: str, fake_backend_url: str, fake_model: str
) -> None:
    """A stack with the API and worker as their roles serves requests; their logs hold no token or prompt."""
    token = "hq-sk-" + uuid.uuid4().hex
    secret = "zanzibar" + uuid.uuid4().hex[:12]  # a word of the prompt that appears nowhere else
    models = {fake_model: {"backend_url": fake_backend_url}}
    top = {"max_queue_wait_s": 15, "stream_flush_ms": 20}
    api_config = write_config(tmp_path / "api.toml", roles.url("api"), models, None, **top)
    worker_config = write_config(tmp_path / "worker.toml", roles.url("agent"), models, None, **top)

    async def scaler_declares() -> None:
        connection = await aio_pika.connect(roles.url("scaler"))
        async with connection:
            await _declare_as_scaler(connection, fake_model)

    asyncio.run(scaler_declares())
    stack = Stack(api_config, tmp_path, log_level="debug")
    try:
        stack.start_api()
        stack.start_worker(fake_model, config=worker_config)  # the agent's role
        headers = {"Authorization": f"Bearer {token}", "X-Private": secret}
        chat = {"model": fake_model, "messages": [{"role": "user", "content": f"please tell {secret} nothing"}]}
        with httpx.Client(base_url=stack.url, headers=headers, timeout=EVENTUALLY_S) as client:
            answer = client.post("/v1/chat/completions", json=chat)
            assert answer.status_code == 200, answer.text
            with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as streamed:
                assert streamed.status_code == 200
                assert "[DONE]" in streamed.read().decode()
            completion = client.post("/v1/completions", json={"model": fake_model, "prompt": f"say {secret}"})
            assert completion.status_code == 200, completion.text
            failing = {"model": fake_model, "messages": [{"role": "user", "content": f"FAIL 500 {secret}"}]}
            assert client.post("/v1/chat/completions", json=failing).status_code == 500  # the backend's status
            invalid = {"model": fake_model, "messages": [{"role": secret, "content": secret}]}
            assert client.post("/v1/chat/completions", json=invalid).status_code == 400
            assert client.post("/v1/chat/completions", content=f'{{"model": "{secret}').status_code == 400
        replied = answer.json()["choices"][0]["message"]["content"]
        # The agent's role may send usage reports and the API's may record them: the four requests
        # that reached the backend are counted.
        store = JobStore(tmp_path / "data")
        wait_until(
            lambda: sum(row["requests"] for row in store.usage.totals(model=fake_model)) >= 4,
            EVENTUALLY_S,
            "the four requests' usage recorded",
            poll_s=0.2,
        )
        assert sum(row["requests"] for row in store.usage.totals(model=fake_model)) == 4
    finally:
        stack.close()
    logs = {name: stack.log(name) for name in ("api.log", "worker1.log")}
    assert "request_done" in logs["api.log"] and "worker_started" in logs["worker1.log"]
    assert re.search(r'"served": ?4\b', logs["worker1.log"]), logs["worker1.log"]
    for name, text in logs.items():  # nothing the roles forbid was needed (the /ops sampler included)
        assert "Traceback" not in text and "ACCESS_REFUSED" not in text, f"{name}:\n{text}"
    for name, text in logs.items():
        assert token not in text, f"{name} holds the bearer token"
        assert secret not in text, f"{name} holds prompt text"
        assert secret[::-1] not in text and replied not in text, f"{name} holds the answer's text"


def test_amqps_settings(tmp_path: Path) -> None:
    """TLS files need an amqps:// URL and must exist; the client context verifies the broker."""
    with pytest.raises(ConfigError, match="amqp_ca_file is set, so amqp_url must be an amqps:// URL"):
        parse_config('amqp_url = "amqp://localhost/"\namqp_ca_file = "/etc/ssl/certs/ca-certificates.crt"')
    with pytest.raises(ConfigError, match=r"amqp_cert_file: .*missing\.pem is not a readable file"):
        parse_config(f'amqp_url = "amqps://h/"\namqp_cert_file = "{tmp_path}/missing.pem"')
    with pytest.raises(ConfigError, match="amqp_key_file needs amqp_cert_file"):
        parse_config(f'amqp_url = "amqps://h/"\namqp_key_file = "{tmp_path}/k.pem"')
    ca = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    if not Path(ca).is_file():
        pytest.skip("no system CA bundle to point amqp_ca_file at")
    config = parse_config(
        f'amqp_url = "amqps://api:pw@rabbit.example:5671/hotq"\namqp_ca_file = "{ca}"\n'
        'agent_amqp_url = "amqps://agent:pw@rabbit.example:5671/hotq"'
    )
    assert config.amqp_tls is not None and config.amqp_tls.ca_file == ca
    context = ssl_context(config.amqp_tls)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    agents = config.for_agents()
    assert agents.amqp_urls[0].startswith("amqps://agent:") and agents.amqp_ca_file == ca
