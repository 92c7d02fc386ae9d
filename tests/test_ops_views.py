"""The three operator views over one running stack: `hotq watch`, /metrics and the /ops page.

The stack: an API sampling every 0.3 s, an agent (fake backend) serving one model,
a second model nobody serves with requests parked in both its lanes, and one
scaler decision in data_dir/scaler.db.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from broker import topology
from broker.messages import Lane
from hpc_agents.decisions import Decision, DecisionLog, decision_log_path
from ops.metrics import ApiMetrics, ScalerMetrics
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, expected_chat_tokens
from ops.testing.stack import ROOT, Stack, hotq_command, wait_for_event, write_config

PARKED = {Lane.INTERACTIVE: 3, Lane.BATCH: 2}  # requests waiting in the unserved model's lanes
REASON = "ops test: backlog 5 needs 1 agent"
# The /ops page's series colours (api/ops_page.py).
INTERACTIVE_BLUE, BATCH_ORANGE, HOT_GREEN = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)


@dataclasses.dataclass(frozen=True)
class OpsStack:
    stack: Stack
    served: str  # served by one agent on cluster "local"
    waiting: str  # no consumer: its parked requests stay ready
    agent_id: str


async def _park_requests(amqp_url: str, model: str) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()  # publisher confirms: each publish is enqueued on return
        await topology.declare_model_queues(channel, [model])
        for lane, count in PARKED.items():
            for _ in range(count):
                message = aio_pika.Message(b"parked")  # never consumed, so never decoded
                await channel.default_exchange.publish(message, routing_key=topology.request_queue_name(model, lane))


@pytest.fixture(scope="module")
def ops_stack(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> Iterator[OpsStack]:
    served, waiting = f"ops/served-{session_tag}", f"ops/waiting-{session_tag}"
    delete_test_queues.extend([served, waiting])
    workdir = tmp_path_factory.mktemp("ops")
    config = write_config(
        workdir / "hotq.toml",
        amqp_url,
        {
            served: {"command": FAKE_BACKEND_COMMAND, "max_inflight": 8, "reserved_interactive": 1},
            waiting: {"max_agents": 2},
        },
        heartbeat_s=0.5,
        ops_sample_s=0.3,
        max_queue_wait_s=30,
    )
    DecisionLog(decision_log_path(workdir / "data")).record(
        Decision(waiting, 5, 0, 0, 0, 0.0, desired=1, launched=1, clusters="local", reason=REASON)
    )
    asyncio.run(_park_requests(amqp_url, waiting))
    stack = Stack(config, workdir)
    try:
        stack.start_api()
        agent = stack.start_agent(served)  # stopped (drained) with the stack
        hot = wait_for_event(agent, "agent_state", timeout_s=STARTUP_S, state="hot")
        yield OpsStack(stack, served, waiting, str(hot["agent_id"]))
    finally:
        stack.close()


def _table_rows(output: str) -> list[list[str]]:
    """The cells of every table row rich printed (box-drawing or ASCII borders)."""
    rows = []
    for line in output.splitlines():
        if line.count("│") >= 2 or line.count("|") >= 2:
            rows.append([cell.strip() for cell in re.split(r"[│|]", line)[1:-1]])
    return rows


def test_watch_once_shows_depth_agents_and_decisions(ops_stack: OpsStack) -> None:
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}  # as a script would run it
    result = subprocess.run(
        hotq_command("watch", "--config", str(ops_stack.stack.config), "--once"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=EVENTUALLY_S,
    )
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    # Queues: model, lane, depth, consumers, in flight, agents, tokens/s.
    waiting = next(i for i, row in enumerate(rows) if row[:2] == [ops_stack.waiting, "interactive"])
    assert rows[waiting][2:4] == [str(PARKED[Lane.INTERACTIVE]), "0"], result.stdout
    assert rows[waiting][5] == "none"
    assert rows[waiting + 1][:4] == ["", "batch", str(PARKED[Lane.BATCH]), "0"], result.stdout
    served = next(row for row in rows if row[:2] == [ops_stack.served, "interactive"])
    assert served[2:5] == ["0", "1", "0"], result.stdout  # empty queue, the agent consuming, nothing in flight
    assert served[5] == "1 hot@local", result.stdout
    # Agents: one row per live agent.
    agent = next(row for row in rows if row[0] == ops_stack.agent_id)
    assert agent[1:4] == [ops_stack.served, "hot", "local"], result.stdout
    # Decisions, with their reasons.
    decision = next(row for row in rows if REASON in row)
    assert decision[1:6] == [ops_stack.waiting, "5", "1", "1", "local"], result.stdout


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=EVENTUALLY_S).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_requests_tokens_and_queues(ops_stack: OpsStack) -> None:
    url, model = ops_stack.stack.url, ops_stack.served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)
    text = "hello metrics world"
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": text}]
    for _ in range(3):
        client.chat.completions.create(model=model, messages=messages)
    with pytest.raises(openai.BadRequestError):  # the backend answers 400: no output, no TTFT
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "FAIL 400"}])
    usage_asked: ChatCompletionStreamOptionsParam = {"include_usage": True}
    for stream_options in (usage_asked, openai.omit):
        stream = client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options=stream_options
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "".join(
            expected_chat_tokens(text, None)[0]
        )

    chat = {"model": model, "endpoint": "chat/completions"}
    # A stream is counted once it has ended on the server, which may be just after its last bytes arrived.
    wait_until(
        lambda: _value(_samples(url), "hotq_request_duration_seconds_count", **chat, stream="true") == 2,
        EVENTUALLY_S,
        "both streams counted",
    )
    samples = _samples(url)
    assert _value(samples, "hotq_request_duration_seconds_count", **chat, stream="false") == 4
    assert _value(samples, "hotq_request_duration_seconds_count", **chat, stream="true") == 2
    assert _value(samples, "hotq_request_duration_seconds_bucket", **chat, stream="true", le="+Inf") == 2
    assert _value(samples, "hotq_time_to_first_token_seconds_count", **chat, stream="false") == 3
    assert _value(samples, "hotq_time_to_first_token_seconds_count", **chat, stream="true") == 2
    ttft = _value(samples, "hotq_time_to_first_token_seconds_sum", **chat, stream="true")
    duration = _value(samples, "hotq_request_duration_seconds_sum", **chat, stream="true")
    assert ttft is not None and duration is not None and 0 < ttft <= duration
    assert _value(samples, "hotq_requests_total", **chat, stream="false", status="2xx") == 3
    assert _value(samples, "hotq_requests_total", **chat, stream="false", status="4xx") == 1
    assert _value(samples, "hotq_requests_total", **chat, stream="true", status="2xx") == 2
    # Usage: three answers and both streams, also the one that did not ask for usage (the consumer
    # asks the backend for it anyway); the fake backend counts words.
    completion = len(expected_chat_tokens(text, None)[0])
    assert _value(samples, "hotq_prompt_tokens_total", model=model) == 5 * len(text.split())
    assert _value(samples, "hotq_completion_tokens_total", model=model) == 5 * completion

    # The fleet gauges follow the sampler (every 0.3 s here).
    waiting = ops_stack.waiting
    expected = {"interactive": 3, "batch": 2, "served": 0, "consumers": 1, "waiting_consumers": 0, "hot": 1}
    fleet: dict[str, float | None] = {}

    def sampled() -> bool:
        samples = _samples(url)
        fleet.update(
            interactive=_value(samples, "hotq_queue_depth", model=waiting, lane="interactive"),
            batch=_value(samples, "hotq_queue_depth", model=waiting, lane="batch"),
            served=_value(samples, "hotq_queue_depth", model=model, lane="interactive"),
            consumers=_value(samples, "hotq_queue_consumers", model=model, lane="interactive"),
            waiting_consumers=_value(samples, "hotq_queue_consumers", model=waiting, lane="interactive"),
            hot=_value(samples, "hotq_agents", model=model, state="hot", cluster="local"),
        )
        return fleet == expected

    wait_until(sampled, EVENTUALLY_S, f"the fleet gauges at {expected} (last seen {fleet})", poll_s=0.2)


def _png_rgb(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB(A) rows of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, compressed = 8, b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
        elif kind == b"IDAT":
            compressed += chunk
    channels = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(compressed), width * channels
    rows, previous = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 2:  # up: the common case, done without a Python loop per byte
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous))
        elif kind:
            for x in range(stride):
                left = line[x - channels] if x >= channels else 0
                up, corner = previous[x], previous[x - channels] if x >= channels else 0
                if kind == 1:
                    line[x] = (line[x] + left) & 0xFF
                elif kind == 3:
                    line[x] = (line[x] + (left + up) // 2) & 0xFF
                else:
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                    line[x] = (line[x] + predictor) & 0xFF
        rows.append(bytes(line))
        previous = rows[-1]
    return width, channels, rows


def _colour_counts(png: bytes) -> dict[tuple[int, int, int], int]:
    width, channels, rows = _png_rgb(png)
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows:
        for x in range(0, width * channels, channels):
            pixel = (row[x], row[x + 1], row[x + 2])
            counts[pixel] = counts.get(pixel, 0) + 1
    return counts


def _near(counts: dict[tuple[int, int, int], int], colour: tuple[int, int, int]) -> int:
    return sum(n for pixel, n in counts.items() if all(abs(a - b) <= 6 for a, b in zip(pixel, colour)))


def _chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,800",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=STARTUP_S)


def test_ops_page_charts_the_sampled_history(ops_stack: OpsStack, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (`make test` installs it with ops/ensure_chromium.sh, via apt-get)")
    url, waiting, served = ops_stack.stack.url, ops_stack.waiting, ops_stack.served
    data: dict[str, Any] = {}

    def some_history() -> bool:  # the page should draw lines, not points
        data.update(httpx.get(url + "/ops/data", timeout=EVENTUALLY_S).json())
        return len(data["series"][waiting]["t"]) >= 10 and data["series"][served]["agents_hot"][-1] == 1

    wait_until(some_history, EVENTUALLY_S, "ten samples of history", poll_s=0.3)
    assert data["sample_s"] == 0.3
    depth = data["series"][waiting]
    assert len(depth["t"]) == len(depth["depth_interactive"]) == len(depth["depth_batch"]) >= 10
    assert depth["depth_interactive"][-1] == 3 and depth["depth_batch"][-1] == 2
    assert [a["agent_id"] for a in data["agents"][served]] == [ops_stack.agent_id]
    assert [d["reason"] for d in data["decisions"]] == [REASON]

    screenshot = tmp_path / "ops.png"
    result = _chromium(chromium, tmp_path / "profile", f"--screenshot={screenshot}", url + "/ops")
    assert screenshot.exists(), result.stderr
    counts = _colour_counts(screenshot.read_bytes())
    assert len(counts) > 50, f"the page looks blank: {len(counts)} colours"
    for name, colour in [("interactive", INTERACTIVE_BLUE), ("batch", BATCH_ORANGE), ("hot", HOT_GREEN)]:
        assert _near(counts, colour) > 300, f"no {name} line drawn ({screenshot})"

    dom = _chromium(chromium, tmp_path / "profile", "--dump-dom", url + "/ops").stdout
    assert waiting in dom and served in dom and REASON in dom
    assert len(re.findall(r'<path d="[^"]+" [^>]*data-series="interactive"', dom)) == 2  # one chart per model


def test_scaler_metrics_count_decisions_and_launches() -> None:
    metrics = ScalerMetrics(CollectorRegistry())
    metrics.record(Decision("m", 9, 0, 0, 0, 0.0, desired=3, launched=3, clusters="a,b,a", reason="backlog"))
    metrics.record(Decision("m", 0, 3, 0, 0, 1.0, desired=1, launched=0, clusters="", reason="drained"))
    registry = metrics.registry
    assert registry.get_sample_value("hotq_scaler_decisions_total", {"model": "m"}) == 2
    assert registry.get_sample_value("hotq_scaler_launches_total", {"model": "m", "cluster": "a"}) == 2
    assert registry.get_sample_value("hotq_scaler_launches_total", {"model": "m", "cluster": "b"}) == 1
    assert registry.get_sample_value("hotq_scaler_desired_agents", {"model": "m"}) == 1


def test_grafana_dashboard_queries_only_exposed_metrics() -> None:
    registry = CollectorRegistry()
    ApiMetrics(registry)
    ScalerMetrics(registry)
    # Before any observation a family has no samples: its name and suffixes are what a query can use.
    exposed = {family.name + suffix for family in registry.collect() for suffix in ("", "_total", "_bucket")}
    dashboard = json.loads((ROOT / "ops" / "grafana" / "hotq.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bhotq_[a-z_]+", target["expr"])
    }
    assert queried and queried <= exposed, queried - exposed
    assert {"hotq_queue_depth", "hotq_agents", "hotq_requests_total"} <= queried
