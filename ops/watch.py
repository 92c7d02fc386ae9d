"""`hotq watch`: queues, agents and the scaler's decisions, live in the terminal.

Every `interval` seconds it takes a `Snapshot` and redraws three tables with
rich: per model and lane the queue's depth and consumers with the model's
agents by state and cluster, in-flight requests and tokens/s; one row per live
agent; the scaler's last decisions with their reasons. `once` prints a single
frame for scripts and tests, after one heartbeat interval so that running agents
have announced themselves.
"""

from __future__ import annotations

import asyncio
import os
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker.config import Config
from broker.connection import BROKER_LOST, connect_with
from broker.messages import AgentState
from hpc_agents.decisions import DecisionLog
from hpc_agents.directory import AgentDirectory
from ops.snapshot import ModelSnapshot, Snapshot, capacity_text, open_decisions, prefix_hit_rate, take_snapshot

DECISIONS_SHOWN = 10
UNPIPED_WIDTH = 200  # columns for output that is not a terminal, so lines are not folded
_STATE_STYLE = {
    AgentState.STARTING: "yellow",
    AgentState.LOADING: "yellow",
    AgentState.HOT: "green",
    AgentState.DRAINING: "magenta",
}


def render(snapshot: Snapshot) -> Group:
    taken = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    return Group(
        Text(f"hotq at {taken}", style="bold"),
        _queues(snapshot.models),
        _agents(snapshot.models),
        _decisions(snapshot),
    )


def _queues(models: tuple[ModelSnapshot, ...]) -> Table:
    table = Table(title="Queues", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("lane")
    for header in ("depth", "consumers", "in flight"):
        table.add_column(header, justify="right")
    table.add_column("agents (state@cluster)")
    table.add_column("tokens/s", justify="right")
    table.add_column("capacity")
    for model in models:
        groups = Text(", ").join(
            Text(f"{g.count} {g.state.value}@{g.cluster}", style=_STATE_STYLE.get(g.state, "")) for g in model.groups
        )
        for index, lane in enumerate(model.lanes):
            first = index == 0  # the model's agents serve all its lanes: show them once
            table.add_row(
                model.model if first else "",
                lane.lane.value,
                _number(lane.depth),
                _number(lane.consumers),
                str(model.inflight) if first else "",
                (groups if model.groups else Text("none", style="dim")) if first else "",
                f"{model.tokens_per_s:g}" if first else "",
                capacity_text(model) if first else "",
            )
    return table


def _agents(models: tuple[ModelSnapshot, ...]) -> Table:
    table = Table(title="Agents", title_justify="left")
    for header in ("agent", "model", "state", "cluster", "node"):
        table.add_column(header, no_wrap=header in ("agent", "model"))
    for header in ("in flight", "served", "tokens/s", "prefix hits", "affinity/spilled", "uptime"):
        table.add_column(header, justify="right")
    for model in models:
        for agent in model.agents:
            table.add_row(
                agent.agent_id,
                model.model,
                Text(agent.state.value, style=_STATE_STYLE.get(agent.state, "")),
                agent.cluster,
                agent.node,
                str(agent.inflight),
                str(agent.served),
                f"{agent.tokens_per_s:g}",
                "-" if (rate := prefix_hit_rate(agent)) is None else f"{rate:.0%}",
                f"{agent.affinity_taken}/{agent.affinity_spilled_in}",
                f"{agent.uptime_s:.0f} s",
            )
    if not table.row_count:
        table.caption = "no live agents (a plain `hotq worker` does not announce itself)"
    return table


def _decisions(snapshot: Snapshot) -> Table:
    table = Table(title="Scaler decisions", title_justify="left")
    table.add_column("time")
    table.add_column("model", no_wrap=True)
    for header in ("backlog", "desired", "launched"):
        table.add_column(header, justify="right")
    table.add_column("where")
    table.add_column("reason")
    for decision in snapshot.decisions[-DECISIONS_SHOWN:][::-1]:  # newest first
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(decision.at)),
            decision.model,
            str(decision.backlog),
            str(decision.desired),
            str(decision.launched),
            decision.clusters or "-",
            decision.reason,
        )
    if not table.row_count:
        table.caption = "none in the last hour"
    return table


def _number(value: int | None) -> str:
    return "?" if value is None else str(value)  # None: RabbitMQ could not be asked


def _console() -> Console:
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        return Console(width=UNPIPED_WIDTH)
    return console


async def run_watch(config: Config, interval_s: float, once: bool) -> None:
    connection = await connect_with(config, "watch")
    try:
        directory = AgentDirectory(config.heartbeat_s)
        await directory.subscribe(connection)
        channel = await connection.channel()
        decisions: DecisionLog | None = None

        async def frame() -> Group:
            nonlocal decisions
            decisions = decisions or open_decisions(config)  # a scaler may start after us
            return render(await take_snapshot(channel, directory, config, decisions))

        console = _console()
        if once:
            await asyncio.sleep(config.heartbeat_s + 0.5)  # agents announce themselves every heartbeat
            console.print(await frame())
            return
        with Live(await frame(), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    live.update(await frame(), refresh=True)
                except BROKER_LOST:  # its node went away: the connection moves to another one
                    continue
    finally:
        await connection.close()
