"""The wire records, queue names and config validation (no broker needed)."""

from __future__ import annotations

import time

import msgpack
import pytest

from broker import messages, topology
from broker.config import parse_config
from broker.errors import ConfigError, WireError
from broker.messages import (
    WIRE_VERSION,
    Abandoned,
    AgentState,
    AgentStatus,
    Cancel,
    ChunkBatch,
    Endpoint,
    ErrorReply,
    Final,
    Lane,
    RequestEnvelope,
    Started,
    UsageReport,
    UsageRow,
)

RECORDS: list[messages.Record] = [
    RequestEnvelope("r1", "org/model.v1", Endpoint.CHAT, b'{"a": 1}', True, 2.0, 1.5, "alice", Lane.BATCH, 1.0),
    Started("r1", "att", "node:1"),
    ChunkBatch("r1", "att", 3, b"data: {}\n\n"),
    Final("r1", "att", 4, 200, b"{}", {"completion_tokens": 5}),
    Final("r1", "att", 0, 200, b"{}", None),
    ErrorReply("r1", "att", 429, "rate_limit_error", "slow down", "fake_429", None),
    Cancel("r1"),
    AgentStatus("a1", "m", AgentState.HOT, True, "n", "c", "http://x", 1, 2, 3.5, 4.0, time.time(), 10, 5, 3, 1),
    UsageReport("rep1", "node:1", [list(UsageRow("2026-11-28", "alice", "m", "batch", 2, 1, 30, 40))]),
    Abandoned("r1", {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}),
    Abandoned("r1", None),
]


@pytest.mark.parametrize(
    "rows", [[["2026-11-28", "alice", "m", "batch", 2, 1, 30]], [["2026-11-28", "alice", "m", "batch", 2, 1, 30, -4]]]
)
def test_usage_rows_are_checked(rows: list[list[object]]) -> None:
    with pytest.raises(WireError, match="UsageReport row"):
        UsageReport("rep1", "node:1", rows).usage_rows()


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips(record: messages.Record) -> None:
    assert messages.decode(messages.encode(record)) == record


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"\xc1", "undecodable"),
        (msgpack.packb({"not": "a record"}), "not a hotq record"),
        (msgpack.packb([WIRE_VERSION + 1, 2, "r", "a", "w"]), "unsupported wire version"),
        (msgpack.packb([WIRE_VERSION, 99, "x"]), "unknown record tag"),
        (msgpack.packb([WIRE_VERSION, Started.TAG, "r", "a"]), "has 3 fields"),
        (msgpack.packb([WIRE_VERSION, Started.TAG, "r", 7, "w"]), "Started.attempt has the wrong type"),
        (messages.encode(RECORDS[0]).replace(b"chat/completions", b"chat/completionz"), "unknown value"),
    ],
)
def test_bad_bytes_raise_one_error_type(raw: bytes, complaint: str) -> None:
    with pytest.raises(WireError, match=complaint):
        messages.decode(raw)


def test_decode_as_insists_on_the_type() -> None:
    with pytest.raises(WireError, match="expected"):
        messages.decode_as(messages.encode(Cancel("r")), RequestEnvelope)


def test_queue_names_are_safe_and_distinct_for_any_model_name() -> None:
    names = ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama_Llama-3.1-8B-Instruct", "ünï cødé/ m", "x" * 400, ""]
    queues = [topology.request_queue_name(name, Lane.INTERACTIVE) for name in names]
    assert len(set(queues)) == len(queues)
    for queue in queues:
        assert len(queue.encode()) < 255 and queue.isascii() and " " not in queue
    assert topology.request_queue_name(names[0], Lane.BATCH) != queues[0]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r'models\."a/b\.c"\.max_inflight'):
        parse_config('[models."a/b.c"]\nbackend_url = "http://x"\nmax_inflight = 0\n')
    with pytest.raises(ConfigError, match="unknown field `colour`"):
        parse_config('[models."m"]\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="max_body_bytes"):
        parse_config('max_body_bytes = "big"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("models = [\n")


def test_config_defaults_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config('[models."m"]\nbackend_url = "http://x"\n')
    assert config.amqp_url == "amqp://guest:guest@localhost:5672/" and config.data_dir == "./.hotq"
    assert config.max_body_bytes == 10 * 1024 * 1024
    monkeypatch.setenv("HOTQ_AMQP_URL", "amqp://u:p@broker:5672/")
    assert parse_config("").amqp_url == "amqp://u:p@broker:5672/"


def test_config_takes_several_broker_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    one = parse_config('amqp_url = "amqp://u:p@a:5672/v"\n')
    assert one.amqp_urls == ["amqp://u:p@a:5672/v"]
    nodes = ["amqp://u:p@a:5672/v", "amqp://u:p@b:5672/v", "amqp://u:p@c:5672/v"]
    several = parse_config(f"amqp_url = {nodes!r}\namqp_heartbeat_s = 5\nquorum_replicas = 2\n".replace("'", '"'))
    assert several.amqp_urls == nodes and several.amqp_heartbeat_s == 5 and several.quorum_replicas == 2
    assert parse_config("").amqp_heartbeat_s == 60 and parse_config("").quorum_replicas == 3
    monkeypatch.setenv("HOTQ_AMQP_URL", " amqp://x@a/v, amqp://x@b/v ,")
    assert parse_config("").amqp_urls == ["amqp://x@a/v", "amqp://x@b/v"]
    monkeypatch.delenv("HOTQ_AMQP_URL")
    with pytest.raises(ConfigError, match="amqp_url must name at least one broker address"):
        parse_config("amqp_url = []\n")
    with pytest.raises(ConfigError, match=r"amqp_url: 'http://b/' is not an amqp:// or amqps:// URL"):
        parse_config('amqp_url = ["amqp://a/", "http://b/"]\n')
    with pytest.raises(ConfigError, match="quorum_replicas"):
        parse_config("quorum_replicas = 0\n")


@pytest.mark.parametrize(
    ("written", "used"),
    [
        ("http://gpu-7:8000", "http://gpu-7:8000"),
        ("http://gpu-7:8000/", "http://gpu-7:8000"),
        ("http://gpu-7:8000/v1", "http://gpu-7:8000"),  # the OpenAI client's base_url habit
        ("https://gw.example.org/llm/v1/", "https://gw.example.org/llm"),
    ],
)
def test_backend_url_takes_the_root_or_the_openai_base_url(written: str, used: str) -> None:
    config = parse_config(f'[models."m"]\nbackend_url = "{written}"\n')
    assert config.models["m"].backend_url == used


@pytest.mark.parametrize(
    ("written", "complaint"),
    [
        ("http://gpu-7:8000/v1/chat/completions", "write the server's base URL, 'http://gpu-7:8000/v1'"),
        ("gpu-7:8000", "not an http"),
        ("http://gpu-7:8000/v1?key=x", "not an http"),
    ],
)
def test_backend_url_in_another_form_is_refused_with_the_form_to_use(written: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=r'models\."m"\.backend_url') as raised:
        parse_config(f'[models."m"]\nbackend_url = "{written}"\n')
    assert complaint in raised.value.message
