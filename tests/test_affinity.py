"""Issue 11 acceptance 1-5: cache-aware placement over the fake backend (test 6, real vLLM: test_affinity_vllm.py).

Each agent runs its own fake backend, whose `/_stats` says which requests (by `fake_tag`)
it started: that is where a request was served.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from broker import affinity, topology
from broker.messages import Endpoint, Lane
from broker.schemas import affinity_key, validate
from hpc_agents.backend_metrics import parse_prefix_cache
from ops.processes import Child, wait_until
from ops.testing.deadlines import EVENTUALLY_S, STOP_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, Hold, fake_stats
from ops.testing.http import openai_client
from ops.testing.prefix_cache import BLOCK_TOKENS, PrefixCache
from ops.testing.stack import Stack, ready_messages, wait_for_event, write_config

SPILL_MS = 500
MAX_INFLIGHT = 4


# --- keys, hashing and the cache model, without a broker -----------------------------------------


def _key(body: str, endpoint: Endpoint = Endpoint.CHAT) -> bytes | None:
    return affinity_key(validate(endpoint, body.encode()))


def test_a_session_keeps_its_key_as_it_grows_and_sessions_differ() -> None:
    turn1 = '{"model": "m", "messages": [{"role": "system", "content": "S1"}, {"role": "user", "content": "hi"}]}'
    turn3 = (
        '{"model": "m", "messages": [{"role": "system", "content": "S1"}, {"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and then?"}]}'
    )
    other = '{"model": "m", "messages": [{"role": "system", "content": "S2"}, {"role": "user", "content": "hi"}]}'
    assert _key(turn1) == _key(turn3) != _key(other)
    cached = '{"model": "m", "prompt_cache_key": "tools-v1", "messages": [{"role": "user", "content": "x"}]}'
    assert _key(cached) == b"k:tools-v1"
    assert _key('{"model": "m", "prompt": "a long shared head"}', Endpoint.COMPLETIONS) is not None
    assert _key('{"model": "m", "prompt": [1, 2, 3]}', Endpoint.COMPLETIONS) is None  # token ids: no text to share
    assert _key('{"model": "m", "input": "x"}', Endpoint.EMBEDDINGS) is None
    line = '{"model": "m", "messages": [{"role": "system", "content": "S1"}, {"role": "user", "content": "other"}]}'
    as_line = affinity_key(validate(Endpoint.CHAT, line.encode()), batch_line=True)
    assert as_line == affinity_key(validate(Endpoint.CHAT, turn1.encode()), batch_line=True) != _key(line)


def test_a_third_agent_moves_about_a_third_of_the_keys() -> None:
    """Acceptance 5: rendezvous hashing moves only the keys the new agent wins."""
    keys = [random.randbytes(16) for _ in range(6000)]
    before = {key: affinity.rank(key, ["agent-a", "agent-b"])[0] for key in keys}
    after = {key: affinity.rank(key, ["agent-a", "agent-b", "agent-c"])[0] for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert all(after[key] == "agent-c" for key in moved)  # nothing moves between the old two
    assert len(moved) / len(keys) <= 1 / 3 + 0.05
    assert Counter(before.values())["agent-a"] / len(keys) == pytest.approx(0.5, abs=0.05)


def test_the_fake_prefix_cache_hits_a_repeated_prefix_and_its_counters_parse() -> None:
    cache = PrefixCache()
    prompt = [f"w{i}" for i in range(5 * BLOCK_TOKENS + 3)]
    assert cache.lookup(prompt) == 0
    assert cache.lookup([*prompt, "more", "words"]) == 5 * BLOCK_TOKENS
    assert cache.lookup(["other", *prompt]) == 0  # a block is a hit only with the whole prefix before it
    vllm_page = (
        "# TYPE vllm:prefix_cache_queries_total counter\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 120.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 80.0\n'
    )
    assert parse_prefix_cache(vllm_page) == (120, 80)
    assert parse_prefix_cache("other_metric 1\n") is None


# --- two agents on a real broker ---------------------------------------------------------------------


@dataclass
class Running:
    child: Child
    agent_id: str
    backend: str

    def served(self) -> set[str]:
        return set(fake_stats(self.backend)["started_order"])


@pytest.fixture
def model(session_tag: str, delete_test_queues: list[str], request: pytest.FixtureRequest) -> str:
    name = f"aff-{request.node.name[:24]}-{session_tag}"
    delete_test_queues.append(name)
    return name


def _config(tmp_path: Path, amqp_url: str, model: str, **model_table: object) -> Path:
    table: dict[str, object] = {
        "command": FAKE_BACKEND_COMMAND,
        "max_agents": 3,
        "max_inflight": MAX_INFLIGHT,
        "reserved_interactive": 1,
        "idle_ttl_s": 600,
        "drain_grace_s": 1,
        "spill_after_ms": {"interactive": SPILL_MS, "batch": 2000},
    }
    table.update(model_table)
    # Heartbeats rare by default: the API's view of the agents' load stays "free", so requests go
    # where their key says and the agent's own queue has to hand them on.
    heartbeat_s = float(str(table.pop("heartbeat_s", 60)))
    return write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, ops_sample_s=0.2, heartbeat_s=heartbeat_s)


@pytest.fixture
def stack(tmp_path: Path, amqp_url: str, model: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    stack = Stack(_config(tmp_path, amqp_url, model, **getattr(request, "param", {})), tmp_path)
    stack.start_api()
    yield stack
    stack.close()


def _start_agent(stack: Stack, model: str) -> Running:
    child = stack.start_agent(model)
    hot = wait_for_event(child, "agent_state", state="hot")
    return Running(child, str(hot["agent_id"]), str(wait_for_event(child, "backend_ready")["url"]))


def _api_sees_hot(stack: Stack, model: str, count: int) -> None:
    def heard() -> bool:
        text = _get(stack.url + "/metrics")
        lines = [line for line in text.splitlines() if line.startswith("hotq_agents{") and f'model="{model}"' in line]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'state="hot"' in line) == count

    wait_until(heard, EVENTUALLY_S, f"the API hears {count} hot agents", stack.api)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _placed(stack: Stack, model: str) -> float:
    """Requests the API placed in affinity queues, by its /metrics."""
    prefix = "hotq_affinity_placements_total{"
    lines = _get(stack.url + "/metrics").splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(prefix) and 'placed="true"' in line and f'model="{model}"' in line
    )


def _client(stack: Stack) -> openai.OpenAI:
    return openai_client(stack.url + "/v1")


def _ask(stack: Stack, model: str, tag: str, key: str, extra: dict[str, object] | None = None) -> str:
    answer = _client(stack).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"question {tag}"}],
        extra_body={"fake_tag": tag, "prompt_cache_key": key, **(extra or {})},
    )
    return answer.choices[0].message.content or ""


def _keys_homed_on(stack: Stack, model: str, agent: Running, agents: list[Running], count: int) -> list[str]:
    """Keys whose first choice is `agent`, each sent once alone (nothing else in flight, so it goes
    to its first choice): the API remembers them there."""
    ids = [a.agent_id for a in agents]
    keys = (f"key-{i}" for i in range(10_000))
    homed = [k for k in keys if affinity.rank(b"k:" + k.encode(), ids)[0] == agent.agent_id][:count]
    for key in homed:
        _ask(stack, model, f"warm-{key}", key)
    assert {f"warm-{key}" for key in homed} <= agent.served()
    return homed


@pytest.mark.parametrize("stack", [{"heartbeat_s": 1}], indirect=True)  # heartbeats carry what /ops shows
def test_each_session_s_turns_land_on_one_agent(stack: Stack, model: str) -> None:
    """Acceptance 1: eight chat sessions of several turns, both agents with free slots."""
    agents = [_start_agent(stack, model) for _ in range(2)]
    _api_sees_hot(stack, model, 2)
    client = _client(stack)

    def session(number: int) -> list[str]:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": f"You are assistant number {number}. " + "rules " * 40}
        ]
        tags = []
        for turn in range(5):
            tag = f"s{number}t{turn}"
            messages.append({"role": "user", "content": f"turn {turn} of session {number}"})
            answer = client.chat.completions.create(model=model, messages=messages, extra_body={"fake_tag": tag})
            messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
            tags.append(tag)
        return tags

    with concurrent.futures.ThreadPoolExecutor(MAX_INFLIGHT) as pool:  # never more than one agent's slots
        sessions = list(pool.map(session, range(8)))
    served = [agent.served() for agent in agents]
    together = 0
    for tags in sessions:
        together += max(sum(tag in agent_served for tag in tags) for agent_served in served)
    assert together / sum(len(tags) for tags in sessions) >= 0.9, served
    assert all(served), "both agents served sessions"

    def ops_shows_affinity() -> bool:  # from the agents' heartbeats: hits from their affinity queues, prefix cache
        shown = json.loads(_get(stack.url + "/ops/data"))["agents"][model]
        return len(shown) == 2 and all(a["affinity_taken"] > 0 and a["prefix_hit_rate"] for a in shown)

    wait_until(ops_shows_affinity, EVENTUALLY_S, "/ops shows each agent's affinity hits and prefix-cache hit rate")
    assert 'hotq_affinity_served{how="hit"' in _get(stack.url + "/metrics")


def test_a_saturated_agent_s_keys_spill_to_the_other(stack: Stack, model: str, tmp_path: Path) -> None:
    """Acceptance 2. How long the spill took beyond what the same request takes unspilled is printed,
    not asserted (no test depends on speed): on an idle machine it stayed under spill_after_ms + 200 ms.
    The spill by expiry alone is shown by tests/test_wire_contract.py (a request put in an affinity queue)."""
    agents = [_start_agent(stack, model) for _ in range(2)]
    busy, free = agents
    _api_sees_hot(stack, model, 2)
    hold = Hold(tmp_path / "release")
    busy_keys = _keys_homed_on(stack, model, busy, agents, MAX_INFLIGHT + 1)
    free_key = _keys_homed_on(stack, model, free, agents, 1)[0]
    with concurrent.futures.ThreadPoolExecutor(MAX_INFLIGHT + 1) as pool:
        held = [pool.submit(_ask, stack, model, f"held{i}", key, hold.field) for i, key in enumerate(busy_keys[:-1])]
        wait_until(lambda: fake_stats(busy.backend)["active"] == MAX_INFLIGHT, EVENTUALLY_S, "busy is full")
        started = time.monotonic()
        _ask(stack, model, "control", free_key)  # served at home, no spill: what a request takes anyway
        unspilled_s = time.monotonic() - started
        started = time.monotonic()
        _ask(stack, model, "spilled", busy_keys[-1])
        spilled_s = time.monotonic() - started
        hold.release()
        for future in held:
            future.result(timeout=EVENTUALLY_S)
    assert "spilled" in free.served() and "spilled" not in busy.served()
    # Either path is right: placed on its full agent and spilled after spill_after_ms, or, once the
    # full agent's heartbeat said so, placed on the free one at once (a slow machine sees the latter).
    how = "spilled" if spilled_s > SPILL_MS / 1000 else "placed on the free agent at once"
    print(f"{how}: {spilled_s - unspilled_s:.3f} s more than unspilled (spill_after_ms = {SPILL_MS})")


def test_a_killed_agent_s_waiting_requests_are_answered_once_by_the_other(
    stack: Stack, model: str, tmp_path: Path
) -> None:
    """Acceptance 3: kill -9 while requests wait in its affinity queue (and in its backend)."""
    agents = [_start_agent(stack, model) for _ in range(2)]
    doomed, survivor = agents
    _api_sees_hot(stack, model, 2)
    hold = Hold(tmp_path / "release")  # the doomed backend holds its requests until it dies
    keys = _keys_homed_on(stack, model, doomed, agents, 2 * MAX_INFLIGHT)
    started_before = fake_stats(survivor.backend)["started"]
    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        answers = {
            f"k{i}": pool.submit(_ask, stack, model, f"k{i}", key, hold.field)
            for i, key in enumerate(keys[:MAX_INFLIGHT])
        }
        wait_until(lambda: fake_stats(doomed.backend)["active"] == MAX_INFLIGHT, EVENTUALLY_S, "doomed is full")
        # (the first four hold their slots: the doomed backend never answers them)
        answers |= {f"w{i}": pool.submit(_ask, stack, model, f"w{i}", key) for i, key in enumerate(keys[MAX_INFLIGHT:])}
        doomed.child.kill()
        doomed.child.wait(timeout=STOP_S)
        hold.release()  # for the survivor
        results = {tag: future.result(timeout=EVENTUALLY_S) for tag, future in answers.items()}
    assert all(results.values())
    survivor_stats = fake_stats(survivor.backend)
    for tag in answers:
        assert tag in survivor_stats["started_order"]
    assert survivor_stats["started"] - started_before == len(answers), "each request started once on the survivor"


def test_a_drain_leaves_nothing_in_its_affinity_queue(tmp_path: Path, amqp_url: str, model: str) -> None:
    """Acceptance 4: a draining agent (SIGTERM; an idle exit takes the same path) hands on at once
    what waits for it, though its requests would spill by themselves only after 30 s."""
    stack = Stack(_config(tmp_path, amqp_url, model, spill_after_ms={"interactive": 30_000, "batch": 30_000}), tmp_path)
    try:
        stack.start_api()
        agents = [_start_agent(stack, model) for _ in range(2)]
        leaving, staying = agents
        _api_sees_hot(stack, model, 2)
        hold = Hold(tmp_path / "release")
        keys = _keys_homed_on(stack, model, leaving, agents, 2 * MAX_INFLIGHT)
        queue = topology.affinity_queue_name(model, Lane.INTERACTIVE, leaving.agent_id)
        with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
            answers = [pool.submit(_ask, stack, model, f"d{i}", key, hold.field) for i, key in enumerate(keys)]
            wait_until(lambda: fake_stats(leaving.backend)["active"] == MAX_INFLIGHT, EVENTUALLY_S, "leaving is full")
            # The other four wait in its affinity queue (30 s before they would spill by themselves).
            placed = 2 * len(keys)  # (each key was sent once before)
            wait_until(lambda: _placed(stack, model) == placed, EVENTUALLY_S, "all placed on their agent", stack.api)
            leaving.child.terminate()
            assert leaving.child.wait(timeout=STOP_S) == 0
            assert ready_messages(amqp_url, queue) == 0
            hold.release()
            assert all(future.result(timeout=EVENTUALLY_S) for future in answers)
        drained = {f"d{i}" for i in range(len(keys))}
        assert drained <= staying.served(), "the drained ones were served by the agent that stayed"
    finally:
        stack.close()


def test_batch_lines_sharing_a_prefix_go_to_one_agent(stack: Stack, model: str) -> None:
    """Batch lanes group lines that share a prefix (a system prompt) onto the same agent too."""
    agents = [_start_agent(stack, model) for _ in range(2)]
    _api_sees_hot(stack, model, 2)
    client = _client(stack)
    groups = {f"g{g}": f"You label texts of kind {g}. " + "careful " * 30 for g in range(4)}
    lines = []
    for group, system in groups.items():
        for n in range(6):
            body = {
                "model": model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"text {n}"}],
                "fake_tag": f"{group}-{n}",
            }
            lines.append(json.dumps({"custom_id": f"{group}-{n}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}))  # fmt: skip
    file_id = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(
        lambda: client.batches.retrieve(batch.id).status == "completed", EVENTUALLY_S, "the batch completed", stack.api
    )
    served = [agent.served() for agent in agents]
    for group in groups:
        tags = {f"{group}-{n}" for n in range(6)}
        assert any(tags <= agent_served for agent_served in served), (group, served)
