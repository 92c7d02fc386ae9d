"""One RabbitMQ node vs the local three-node cluster on hotq's path, and the failover gap (issue 13).

Three stacks run at once over the same deterministic fake backend, each an API and a worker: on
one node (`--amqp-url`, the broker on 5672 by default, which other work on the machine may share),
and twice on a three-node cluster of this machine (ops/rabbitmq/local_cluster.py, on free ports in a
temporary directory): for a model whose quorum queues are replicated three ways (the default
`quorum_replicas`), and for one whose queues have one replica (`quorum_replicas = 1`: what
replication costs, on the same nodes). The rounds alternate between them (and the backend called
directly, the floor) so that what else the machine does falls on all alike; each sends
non-streaming chat requests at concurrency 1 and 50 and reports requests/s and latency, and the
latency hotq adds over the direct call.

Then the failover gap, on the cluster stack: 8 clients send requests one after another while the
node leading the model's request queue is killed (SIGKILL); the gap is the longest time after the
kill in which no answer arrived. The node is started again and every quorum queue's replicas are
back online before the next run. Each run says whether the killed leader was the node the API was
connected to (its processes move) or another one (only the leaders move).
Run: `.venv/bin/python -m bench.cluster_path [--rounds 3] [--failovers 4] [--amqp-url URL]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    HOTQ_CLI,
    STARTUP_TIMEOUT_S,
    BenchReport,
    Processes,
    add_shared_options,
    child_env,
    delete_queues,
    foreign_heavy_processes,
    http_session,
    nearest_rank,
    request_queues,
    run_bench,
    wait_for_line,
    wait_http_ok,
)
from bench.core_path import chat_body, chat_load_round, expected_content, http_chat_call
from broker import topology
from broker.messages import Lane
from ops.processes import free_port, wait_until_async
from ops.rabbitmq.local_cluster import NODE_COUNT, LocalCluster, Node, port_is_free
from ops.testing.stack import write_config

LOADS = ((1, 200), (50, 2000))  # (concurrency, requests) per round
TEXT, MAX_TOKENS = "How far is the next node?", 16
FAILOVER_CLIENTS = 8
PATIENCE_S = 300.0  # for RabbitMQ to elect, boot, catch up on a busy machine
TARGETS = ("direct", "one node", "cluster 1x", "cluster")


@dataclass
class Report(BenchReport):
    rounds: list[dict[str, Any]] = field(default_factory=list)
    failovers: list[dict[str, Any]] = field(default_factory=list)


def _cluster_ports() -> tuple[int, int]:
    """Node 1's AMQP and distribution ports such that every node's ports are free now."""
    for _ in range(200):
        amqp = random.randrange(6100, 9900 - NODE_COUNT)
        ports = [port + offset for port in (amqp, amqp + 20000) for offset in range(NODE_COUNT)]
        if all(port_is_free(port) for port in ports):
            return amqp, amqp + 20000
    raise RuntimeError("no free ports for the cluster")


async def _start_stack(processes: Processes, name: str, config: Path, model: str) -> str:
    """An API and a worker for `config` named after `name`; the API's /v1 URL."""
    env = child_env()
    env.pop("HOTQ_AMQP_URL", None)  # it would override the config's broker: each stack has its own
    port = free_port()
    api = processes.start(f"api-{name}", [*HOTQ_CLI, "serve", "--config", str(config), "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}/v1"
    await wait_http_ok(url + "/models", api, STARTUP_TIMEOUT_S)
    worker_name = f"worker-{name}"
    worker = processes.start(worker_name, [*HOTQ_CLI, "worker", "--config", str(config), "--model", model], env=env)
    await wait_for_line(processes.log_path(worker_name), "worker_started", worker, STARTUP_TIMEOUT_S)
    return url


def _api_node(cluster: LocalCluster, via: Node, api_pid: int) -> Node | None:
    """The node the API process `api_pid` is connected to now (its connection is named
    hotq-api@host:pid): by the AMQP port it connected to, each node's own."""
    listing = json.loads(
        cluster.rabbitmqctl(via, "list_connections", "port", "client_properties", "--formatter", "json")
    )
    for connection in listing:
        if f"hotq-api@{socket.gethostname()}:{api_pid}" in json.dumps(connection["client_properties"]):
            return next((node for node in cluster.nodes if node.amqp_port == connection["port"]), None)
    return None


async def _measure_rounds(
    settings: argparse.Namespace, urls: dict[str, str], models: dict[str, str], report: Report
) -> None:
    for number in range(settings.rounds):
        order = TARGETS[number % len(TARGETS) :] + TARGETS[: number % len(TARGETS)]
        for target in order:
            body, expected = chat_body(models[target], TEXT, MAX_TOKENS), expected_content(TEXT, MAX_TOKENS)
            for concurrency, total in LOADS:
                measured = await chat_load_round(urls[target], body, expected, concurrency, total)
                report.rounds.append({"round": number + 1, "target": target, "concurrency": concurrency, **measured})
                print(report.rounds[-1], flush=True)


async def _failover(cluster: LocalCluster, url: str, api_pid: int, model: str, run: int, report: Report) -> None:
    """Kill the request queue's leader under load; the longest time after the kill without an answer."""
    body, expected = chat_body(model, TEXT, MAX_TOKENS), expected_content(TEXT, MAX_TOKENS)
    headers = {"Content-Type": "application/json"}
    answered_at: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()
    queue = topology.request_queue_name(model, Lane.INTERACTIVE)
    async with http_session(FAILOVER_CLIENTS, PATIENCE_S) as session:
        call = http_chat_call(session, url + "/chat/completions", body, expected, headers)

        async def client() -> None:
            while not stop.is_set():
                try:
                    await call()
                    answered_at.append(time.monotonic())
                except Exception as exc:  # noqa: BLE001 - a refusal while it moves is a data point
                    failures.append(repr(exc)[:200])

        clients = [asyncio.create_task(client()) for _ in range(FAILOVER_CLIENTS)]
        try:
            await wait_until_async(lambda: len(answered_at) >= 50, PATIENCE_S, "answers before the kill")
            leader = await asyncio.to_thread(cluster.leader, queue)
            assert leader is not None, f"{queue} has no leader"
            api_node = await asyncio.to_thread(_api_node, cluster, leader, api_pid)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill, leader)
            await wait_until_async(
                lambda: sum(1 for t in answered_at if t > killed_at) >= 50, PATIENCE_S, "answers after the kill"
            )
        finally:
            stop.set()
            await asyncio.gather(*clients)
    after = sorted(t for t in answered_at if t >= killed_at)
    gap = max(later - earlier for earlier, later in zip([killed_at, *after], after, strict=False))
    report.failovers.append(
        {
            "run": run,
            "killed": leader.name,
            "api_was_on_it": api_node == leader,
            "gap_s": gap,
            "failed_requests": len(failures),
            "first_failure": failures[0] if failures else None,
        }
    )
    print(report.failovers[-1], flush=True)
    await asyncio.to_thread(cluster.start_node, leader)

    def all_online() -> bool:
        return all(set(q.online) == set(q.members) for q in cluster.quorum_queues())

    await wait_until_async(lambda: asyncio.to_thread(all_online), PATIENCE_S, "every replica online again")


async def run(settings: argparse.Namespace, processes: Processes, workdir: Path, report: Report) -> None:
    tag = uuid.uuid4().hex[:8]
    model, unreplicated = f"bench/cluster-path-{tag}", f"bench/cluster-path-1x-{tag}"
    models = {"direct": model, "one node": model, "cluster": model, "cluster 1x": unreplicated}
    report.settings = {"rounds": settings.rounds, "loads": LOADS, "failovers": settings.failovers}
    amqp, distribution = _cluster_ports()
    cluster = LocalCluster.create(workdir / "rabbitmq", f"hotq-bench-{tag[:6]}-", amqp, distribution)
    await asyncio.to_thread(cluster.start)
    try:
        port = free_port()
        argv = [sys.executable, "-m", "ops.testing.fake_backend", "--port", str(port), "--model", model, unreplicated]
        backend = processes.start("fake-backend", argv, env=child_env())
        backend_url = f"http://127.0.0.1:{port}"
        await wait_http_ok(backend_url + "/health", backend, STARTUP_TIMEOUT_S)
        table = {"backend_url": backend_url, "max_inflight": 64, "reserved_interactive": 2}
        stacks: dict[str, tuple[str | list[str], dict[str, object]]] = {
            "one node": (settings.amqp_url, {}),
            "cluster": (cluster.urls, {}),
            "cluster 1x": (cluster.urls, {"quorum_replicas": 1}),
        }
        urls = {"direct": backend_url + "/v1"}
        for name, (amqp_url, top) in stacks.items():
            own = workdir / name.replace(" ", "-")
            own.mkdir()
            config = write_config(own / "hotq.toml", amqp_url, {models[name]: table}, None, **top)
            urls[name] = await _start_stack(processes, name.replace(" ", "-"), config, models[name])
        await _measure_rounds(settings, urls, models, report)
        if foreign := foreign_heavy_processes({os.getpgrp()}):
            report.notes.append(f"other heavy processes ran beside the rounds: {foreign[:5]}")
        for number in range(settings.failovers):
            api_pid = processes["api-cluster"].pid
            await _failover(cluster, urls["cluster"], api_pid, model, number + 1, report)
    finally:
        processes.stop_all()
        await delete_queues(settings.amqp_url, request_queues(model))
        await asyncio.to_thread(cluster.stop)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows if r[key] is not None)


def print_report(report: Report, json_path: Path) -> None:
    print(f"\n{'target':>10} {'conc.':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'added p50 ms':>13}  (medians)")
    for concurrency, _ in LOADS:
        floor = _median(
            [r for r in report.rounds if r["target"] == "direct" and r["concurrency"] == concurrency], "p50_ms"
        )
        for target in TARGETS:
            rows = [r for r in report.rounds if r["target"] == target and r["concurrency"] == concurrency]
            p50 = _median(rows, "p50_ms")
            print(
                f"{target:>10} {concurrency:>6} {_median(rows, 'requests_per_s'):>8.1f} {p50:>8.1f}"
                f" {_median(rows, 'p99_ms'):>8.1f} {p50 - floor:>13.1f}"
            )
    gaps = sorted(f["gap_s"] for f in report.failovers)
    if gaps:
        print(f"\nfailover gap over {len(gaps)} runs: p50 {nearest_rank(gaps, 50):.2f} s, max {gaps[-1]:.2f} s")
        for own in (True, False):
            some = sorted(f["gap_s"] for f in report.failovers if f["api_was_on_it"] == own)
            if some:
                where = "the API's own node" if own else "another node"
                print(
                    f"  leader on {where}: {len(some)} runs, p50 {nearest_rank(some, 50):.2f} s, max {some[-1]:.2f} s"
                )
    print(f"\n{json_path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--failovers", type=int, default=4)
    add_shared_options(parser)
    settings = parser.parse_args()
    return run_bench(run, settings, Report(), "cluster_path", print_report)


if __name__ == "__main__":
    sys.exit(main())
