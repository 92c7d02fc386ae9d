"""Cache-aware placement (issue 11): affinity on vs off, same agents, same run.

Run from the repository root::

    .venv/bin/python -m bench.affinity [--rounds 2] [--sessions 8] [--turns 4] [--hostile 32]
    .venv/bin/python -m bench.affinity --fake [--agents 8]

Real vLLM (default): two `hotq agent`s of the embedded SmolLM2-135M, each vLLM computing on
a core of its own (`VLLM_CPU_OMP_THREADS_BIND`), behind two APIs over the same agents, one
placing by affinity, one `affinity = "off"` (`ops.testing.vllm_pair`). Two workloads, each
round running both variants in ABBA order (a drifting machine hits both alike), with fresh
prompts every time so no variant finds the other's cache:

- sessions: `--sessions` conversations at once, each with a distinct long system prompt
  (~600-900 tokens) and `--turns` turns that grow the conversation;
- hostile: `--hostile` unrelated prompts (~300 tokens of random words), 8 at a time.

Every request streams (`max_tokens` 16, `include_usage`): TTFT is the time to the first
content chunk; tokens/s is completion tokens over the workload's wall time; the prefix-cache
hit rate is vLLM's own counters (hits/queries, tokens) over the workload.

`--fake`: `--agents` agents on the fake backend (`ops.testing.prefix_cache`, 1 ms of prefill
per uncached token), sessions only: first through an affinity-off API over the same agents,
then placed, then while agents leave and join (two stop, then two start), to show placement
holding: the share of each session's turns on its most-used agent, the fake caches' hit rate,
and that every request was answered.

Results: a table on stdout and JSON in ``bench/results/affinity-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai

from bench.common import DEFAULT_AMQP_URL, RESULTS_DIR, BenchReport, delete_queues, request_queues
from hpc_agents.backend_metrics import parse_prefix_cache
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, fake_stats
from ops.testing.stack import Stack, wait_for_event, write_config
from ops.testing.vllm_pair import vllm_pair

WORDS = "river stone cloud lamp table orange winter signal harbor pencil garden copper violet meadow".split()
MAX_TOKENS = 16


@dataclasses.dataclass
class Measured:
    ttft_s: list[float] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    wall_s: float = 0.0
    failures: int = 0

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.ttft_s) or [float("nan")]
        return {
            "requests": len(self.ttft_s),
            "failures": self.failures,
            "ttft_p50_s": round(statistics.median(ordered), 3),
            "ttft_p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
            "tokens_per_s": round(self.completion_tokens / self.wall_s, 2) if self.wall_s else 0.0,
        }


async def _ask(client: openai.AsyncOpenAI, model: str, messages: list[Any], measured: Measured) -> str:
    started = time.monotonic()
    text, first = "", None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                measured.completion_tokens += chunk.usage.completion_tokens
    except openai.OpenAIError:
        measured.failures += 1
        return ""
    measured.ttft_s.append((first or time.monotonic()) - started)
    return text


def _system_prompt(rng: random.Random, tag: str) -> str:
    return f"You are desk {tag}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(450, 700)))


async def sessions(client: openai.AsyncOpenAI, model: str, count: int, turns: int, tag: str) -> Measured:
    rng, measured = random.Random(tag), Measured()

    async def one(number: int) -> None:
        messages: list[Any] = [{"role": "system", "content": _system_prompt(rng, f"{tag}-{number}")}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Turn {turn}: name {turn + 2} of the words above."})
            messages.append({"role": "assistant", "content": await _ask(client, model, messages, measured)})

    started = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(count)))
    measured.wall_s = time.monotonic() - started
    return measured


async def hostile(client: openai.AsyncOpenAI, model: str, count: int, tag: str) -> Measured:
    rng, measured = random.Random(tag), Measured()
    gate = asyncio.Semaphore(8)

    async def one(number: int) -> None:
        prompt = f"{tag}-{number} " + " ".join(rng.choice(WORDS) for _ in range(220))
        async with gate:
            await _ask(client, model, [{"role": "user", "content": prompt}], measured)

    started = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(count)))
    measured.wall_s = time.monotonic() - started
    return measured


async def _with_cache(counters: Callable[[], tuple[int, int]], work: Awaitable[Measured]) -> dict[str, float]:
    before = counters()
    measured = await work
    after = counters()
    queries, hits = after[0] - before[0], after[1] - before[1]
    return {**measured.summary(), "prefix_hit_rate": round(hits / queries, 3) if queries else 0.0}


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return round(statistics.mean(row[key] for row in rows), 3)


async def run_vllm(args: argparse.Namespace, report: BenchReport, amqp_url: str) -> dict[str, Any]:
    model = f"smollm-affinity-{uuid.uuid4().hex[:6]}"
    results: dict[str, dict[str, list[dict[str, float]]]] = {w: {"on": [], "off": []} for w in ("sessions", "hostile")}
    with tempfile.TemporaryDirectory(prefix="hotq-bench-affinity-") as workdir:
        try:
            with vllm_pair(Path(workdir), amqp_url, model) as pair:
                clients = {
                    "on": openai.AsyncOpenAI(base_url=pair.on.url + "/v1", api_key="x", max_retries=0, timeout=600),
                    "off": openai.AsyncOpenAI(base_url=pair.off.url + "/v1", api_key="x", max_retries=0, timeout=600),
                }
                await sessions(clients["on"], model, 2, 1, "warmup")  # vLLM's first requests are slow
                for round_number in range(args.rounds):
                    order = ("off", "on", "on", "off") if round_number % 2 == 0 else ("on", "off", "off", "on")
                    for index, variant in enumerate(order):
                        tag = f"r{round_number}-{index}-{variant}"
                        work = sessions(clients[variant], model, args.sessions, args.turns, tag)
                        results["sessions"][variant].append(await _with_cache(pair.prefix_cache, work))
                        work = hostile(clients[variant], model, args.hostile, tag)
                        results["hostile"][variant].append(await _with_cache(pair.prefix_cache, work))
                        print(tag, results["sessions"][variant][-1], results["hostile"][variant][-1], flush=True)
        finally:
            await delete_queues(amqp_url, request_queues(model))
    summary: dict[str, Any] = {}
    for workload, variants in results.items():
        summary[workload] = {
            variant: {key: _mean(rows, key) for key in rows[0]} for variant, rows in variants.items() if rows
        }
        on, off = summary[workload]["on"], summary[workload]["off"]
        summary[workload]["on_vs_off"] = {
            "ttft_p50": round(on["ttft_p50_s"] / off["ttft_p50_s"], 3),
            "ttft_p99": round(on["ttft_p99_s"] / off["ttft_p99_s"], 3),
            "tokens_per_s": round(on["tokens_per_s"] / off["tokens_per_s"], 3),
        }
    report.notes.append(
        "2 cores shared by both vLLM servers (one OpenMP core each; their front ends, the APIs, RabbitMQ and"
        " this load generator float), so absolute numbers are small and noisy; compare on vs off within the run"
    )
    return {"rounds": results, "summary": summary}


async def run_fake(args: argparse.Namespace, report: BenchReport, amqp_url: str) -> dict[str, Any]:
    model = f"fake-affinity-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="hotq-bench-affinity-") as workdir:
        table = {
            "command": FAKE_BACKEND_COMMAND,
            "max_agents": args.agents + 2,
            "max_inflight": 8,
            "idle_ttl_s": 36_000,
            "drain_grace_s": 5,
            "env": {"HOTQ_FAKE_PREFILL_MS_PER_TOKEN": "1"},
        }
        stack = Stack(write_config(Path(workdir) / "hotq.toml", amqp_url, {model: table}), Path(workdir))
        (Path(workdir) / "off").mkdir()
        off_table = {**table, "affinity": "off"}
        off_stack = Stack(
            write_config(Path(workdir) / "off" / "hotq.toml", amqp_url, {model: off_table}), Path(workdir) / "off"
        )
        backends: dict[str, str] = {}
        try:
            stack.start_api()
            off_stack.start_api()  # the same agents, through an API that does not place
            agents = []
            for _ in range(args.agents):
                agents.append(stack.start_agent(model))
            for agent in agents:
                backends[agent.name] = str(wait_for_event(agent, "backend_ready")["url"])
                wait_for_event(agent, "agent_state", state="hot")
            await asyncio.sleep(1.0)  # the API hears the last state changes
            clients = {
                api: openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=600)
                for api, s in (("on", stack), ("off", off_stack))
            }
            phases: dict[str, Any] = {}

            async def phase(name: str, api: str = "on") -> None:
                client = clients[api]
                cache_before = _fake_counters(backends.values())
                tags: dict[str, list[str]] = {}
                answered: list[str] = []
                rng = random.Random(name)

                async def one(number: int) -> None:
                    system = _system_prompt(rng, f"{name}-{number}")
                    messages: list[Any] = [{"role": "system", "content": system}]
                    for turn in range(args.turns):
                        tag = f"{name}-{number}-{turn}"
                        tags.setdefault(str(number), []).append(tag)
                        messages.append({"role": "user", "content": f"turn {turn}"})
                        answer = await client.chat.completions.create(
                            model=model, messages=messages, max_tokens=MAX_TOKENS, extra_body={"fake_tag": tag}
                        )
                        answered.append(tag)
                        messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})

                started = time.monotonic()
                await asyncio.gather(*(one(n) for n in range(args.sessions * 4)))
                wall = time.monotonic() - started
                served = {}
                for name_, url in backends.items():
                    try:
                        served[name_] = set(fake_stats(url)["started_order"])
                    except OSError:
                        served[name_] = set()
                together = sum(
                    max(sum(t in s for t in session_tags) for s in served.values()) for session_tags in tags.values()
                )
                total = sum(len(t) for t in tags.values())
                phases[name] = {
                    "requests": total,
                    "answered": len(answered),
                    "prefix_hit_rate": _hit_rate(cache_before, _fake_counters(backends.values())),
                    "same_agent_share": round(together / total, 3),
                    "wall_s": round(wall, 2),
                    "agents_hot_at_end": len(backends) - (2 if name == "two_leave" else 0),
                }
                print(name, phases[name], flush=True)

            await phase("steady_affinity_off", "off")
            await phase("steady")
            for agent in agents[:2]:  # two leave (drain) while sessions run
                agent.terminate()
            leaving = asyncio.create_task(phase("two_leave"))
            await leaving
            for agent in agents[:2]:
                backends.pop(agent.name, None)
            for _ in range(2):  # two join
                joined = stack.start_agent(model)
                backends[joined.name] = str(wait_for_event(joined, "backend_ready")["url"])
                wait_for_event(joined, "agent_state", state="hot")
            await asyncio.sleep(1.0)
            await phase("two_join")
        finally:
            stack.close()
            off_stack.close()
            await delete_queues(amqp_url, request_queues(model))
    report.notes.append(
        "fake backends: 1 ms prefill per uncached token; sessions x4 at once, as many as agents x slots"
    )
    return phases


def _fake_counters(urls: Any) -> dict[str, tuple[int, int]]:
    """Each live fake backend's prefix-cache (queries, hits)."""
    counters = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
                counters[url] = parse_prefix_cache(response.read().decode()) or (0, 0)
        except OSError:
            continue
    return counters


def _hit_rate(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> float:
    """Hits over queries between two readings, over the backends read both times."""
    queries = sum(after[url][0] - before[url][0] for url in after if url in before)
    hits = sum(after[url][1] - before[url][1] for url in after if url in before)
    return round(hits / queries, 3) if queries else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--fake", action="store_true", help="fake backends, agents coming and going")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--hostile", type=int, default=32)
    args = parser.parse_args()
    report = BenchReport(settings=vars(args))
    runner = run_fake if args.fake else run_vllm
    results = asyncio.run(runner(args, report, args.amqp_url))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = "affinity-fake" if args.fake else "affinity"
    path = RESULTS_DIR / f"{name}-{report.started_at}.json"
    path.write_text(json.dumps({**dataclasses.asdict(report), "results": results}, indent=2))
    print(json.dumps(results.get("summary", results), indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
