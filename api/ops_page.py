"""The API's operator endpoints: /ops (a live page), /ops/data (its JSON) and /metrics.

An `OpsMonitor` samples a `Snapshot` every `ops_sample_s` on channels of its own
(an agent directory on the events exchange, a channel for the queue declares),
so a probe never touches the request path's channel. Each snapshot
sets the fleet gauges of /metrics and lands in a ring buffer of the last hour,
which /ops/data serves and the page draws: one self-contained HTML file with
inline SVG charts, nothing loaded from elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from broker.config import Config
from broker.messages import AgentState, Lane
from hpc_agents.decisions import DecisionLog
from hpc_agents.directory import AgentDirectory
from ops.metrics import CONTENT_TYPE, ApiMetrics, exposition
from ops.snapshot import ModelSnapshot, Snapshot, capacity_text, open_decisions, prefix_hit_rate, take_snapshot

log = structlog.get_logger("hotq.ops")

HISTORY_S = 3600.0
# The columns of a model's history, in the order `_row` fills them.
SERIES = (
    *(f"depth_{lane.value}" for lane in Lane),
    *(f"agents_{state.value}" for state in AgentState if state is not AgentState.STOPPED),
    "inflight",
    "tokens_per_s",
)


def _row(model: ModelSnapshot) -> tuple[float | None, ...]:
    return (
        *(lane.depth for lane in model.lanes),
        *(model.agents_in(state) for state in AgentState if state is not AgentState.STOPPED),
        model.inflight,
        model.tokens_per_s,
    )


class OpsMonitor:
    def __init__(self, config: Config, metrics: ApiMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.directory = AgentDirectory(config.heartbeat_s)
        self._history: collections.deque[tuple[float, dict[str, tuple[float | None, ...]]]] = collections.deque(
            maxlen=max(2, int(HISTORY_S / config.ops_sample_s))
        )
        self._latest: Snapshot | None = None
        self._decisions: DecisionLog | None = None

    async def run(self, connection: AbstractRobustConnection) -> None:
        """Sample until cancelled (the API's lifespan owns this task)."""
        await self.directory.subscribe(connection)
        channel = await connection.channel()
        try:
            while True:
                try:
                    await self.sample(channel)
                except Exception:  # a bad sample must not end the sampling
                    log.exception("ops_sample_failed")
                await asyncio.sleep(self.config.ops_sample_s)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def sample(self, channel: AbstractChannel) -> Snapshot:
        snapshot = await take_snapshot(channel, self.directory, self.config, self._decision_log())
        self.metrics.update_fleet(snapshot)
        self._history.append((snapshot.taken_at, {model.model: _row(model) for model in snapshot.models}))
        self._latest = snapshot
        return snapshot

    def _decision_log(self) -> DecisionLog | None:
        if self._decisions is None:  # a scaler may start (and write its log) after the API
            self._decisions = open_decisions(self.config)
        return self._decisions

    async def page(self, _request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def data(self, _request: Request) -> Response:
        return JSONResponse(self.history())

    async def prometheus(self, _request: Request) -> Response:
        return Response(exposition(self.metrics.registry), media_type=CONTENT_TYPE)

    def history(self) -> dict[str, Any]:
        """The ring buffer as one column per series and model, plus the latest agents and decisions."""
        models: dict[str, dict[str, list[float | None]]] = {
            name: {"t": [], **{series: [] for series in SERIES}} for name in self.config.models
        }
        for taken_at, rows in self._history:
            for name, row in rows.items():
                columns = models[name]
                columns["t"].append(round(taken_at, 3))
                for series, value in zip(SERIES, row):
                    columns[series].append(value)
        latest = self._latest
        agents: dict[str, list[dict[str, Any]]] = {name: [] for name in self.config.models}
        capacities = {model.model: capacity_text(model) for model in latest.models} if latest else {}
        for model in latest.models if latest else ():
            agents[model.model] = [
                {
                    "agent_id": a.agent_id,
                    "state": a.state.value,
                    "cluster": a.cluster,
                    "node": a.node,
                    "inflight": a.inflight,
                    "tokens_per_s": a.tokens_per_s,
                    "prefix_hit_rate": prefix_hit_rate(a),
                    "affinity_taken": a.affinity_taken,
                    "affinity_spilled_in": a.affinity_spilled_in,
                }
                for a in model.agents
            ]
        return {
            "sample_s": self.config.ops_sample_s,
            "window_s": HISTORY_S,
            "taken_at": latest.taken_at if latest else None,
            "series": models,
            "agents": agents,
            "capacity": capacities,
            "migrations": {name: self.metrics.migrations(name) for name in self.config.models},
            "decisions": [dataclasses.asdict(d) for d in latest.decisions] if latest else [],
        }


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>hotq ops</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fafafa; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 0 0 6px; word-break: break-all; }
  .muted { color: #777; }
  .model { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 12px; margin: 12px 0; }
  .charts { display: flex; gap: 16px; flex-wrap: wrap; }
  svg { background: #fff; }
  table { border-collapse: collapse; margin-top: 6px; }
  th, td { text-align: left; padding: 2px 10px 2px 0; vertical-align: top; }
  th { color: #555; font-weight: 600; }
</style>
</head>
<body>
<h1>hotq ops</h1>
<div class="muted" id="status">loading…</div>
<div id="models"></div>
<h2>Scaler decisions</h2>
<div id="decisions" class="muted">none recorded</div>
<script>
"use strict";
const QUEUE = [["depth_interactive", "interactive", "#1f77b4"], ["depth_batch", "batch", "#ff7f0e"]];
const AGENTS = [["agents_hot", "hot", "#2ca02c"], ["warming", "starting/loading", "#9467bd"],
                ["agents_draining", "draining", "#7f7f7f"]];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = tag === "svg" || ["path", "line", "text", "g"].includes(tag)
    ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(v) {
  if (v <= 1) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

// A step-line chart of several series over time t (unix seconds), as SVG.
function chart(title, t, lines, marks) {
  const W = 540, H = 190, L = 40, R = 12, T = 24, B = 22;
  const t1 = t.length ? t[t.length - 1] : Date.now() / 1000;
  const t0 = Math.min(t.length ? t[0] : t1 - 1, t1 - 1);
  let top = 0;
  for (const line of lines) for (const v of line.values) if (v !== null && v > top) top = v;
  top = niceMax(top);
  const x = s => L + (s - t0) / (t1 - t0) * (W - L - R);
  const y = v => T + (1 - v / top) * (H - T - B);
  const svg = el("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart"});
  svg.append(el("text", {x: L, y: 14, "font-size": 13, "font-weight": 600}, title));
  let lx = L + 120;
  for (const line of lines) {
    svg.append(el("line", {x1: lx, y1: 10, x2: lx + 14, y2: 10, stroke: line.color, "stroke-width": 3}));
    svg.append(el("text", {x: lx + 18, y: 14, "font-size": 11, fill: "#555"}, line.name));
    lx += 24 + 7 * line.name.length;
  }
  for (const v of [0, top / 2, top]) {
    svg.append(el("line", {x1: L, y1: y(v), x2: W - R, y2: y(v), stroke: "#e5e5e5"}));
    svg.append(el("text", {x: L - 6, y: y(v) + 4, "font-size": 10, fill: "#777", "text-anchor": "end"},
                  String(Math.round(v * 10) / 10)));
  }
  const ago = Math.round((t1 - t0) / 60);
  svg.append(el("text", {x: L, y: H - 6, "font-size": 10, fill: "#777"}, ago ? `-${ago} min` : "-<1 min"));
  svg.append(el("text", {x: W - R, y: H - 6, "font-size": 10, fill: "#777", "text-anchor": "end"}, "now"));
  for (const at of marks || []) {
    if (at < t0 || at > t1) continue;
    svg.append(el("line", {x1: x(at), y1: T, x2: x(at), y2: H - B, stroke: "#d62728",
                           "stroke-dasharray": "3,3"}));
  }
  for (const line of lines) {
    let d = "", open = false;
    line.values.forEach((v, i) => {
      if (v === null) { open = false; return; }
      d += open ? ` H${x(t[i]).toFixed(1)} V${y(v).toFixed(1)}` : ` M${x(t[i]).toFixed(1)} ${y(v).toFixed(1)}`;
      open = true;
    });
    if (d) svg.append(el("path", {d: d, fill: "none", stroke: line.color, "stroke-width": 3,
                                  "data-series": line.name}));
  }
  return svg;
}

function last(values) { return values.length ? values[values.length - 1] : null; }

function render(data) {
  const when = data.taken_at ? new Date(data.taken_at * 1000).toLocaleTimeString() : "not yet";
  document.getElementById("status").textContent =
    `sampled every ${data.sample_s} s; last sample ${when}; window ${data.window_s / 60} min`;
  const root = document.getElementById("models");
  root.replaceChildren();
  for (const [model, s] of Object.entries(data.series)) {
    const card = el("div", {class: "model"});
    card.append(el("h2", {}, model));
    const warming = s.agents_starting.map((v, i) => v + s.agents_loading[i]);
    card.append(el("div", {class: "muted"},
      `depth ${last(s.depth_interactive) ?? "?"} interactive, ${last(s.depth_batch) ?? "?"} batch · ` +
      `agents ${last(s.agents_hot) ?? 0} hot, ${last(warming) ?? 0} starting · ` +
      `in flight ${last(s.inflight) ?? 0} · ${last(s.tokens_per_s) ?? 0} tokens/s · ` +
      `capacity: ${data.capacity[model] ?? "?"}`));
    const moved = data.migrations[model];
    if (moved && moved.resumed + moved.finished + moved.refused > 0) {
      const gap = moved.mean_gap_s === null ? "" : ` (mean gap ${moved.mean_gap_s} s)`;
      card.append(el("div", {class: "muted"}, `streams moved: ${moved.resumed} resumed${gap}, ` +
        `${moved.finished} ended by the API, ${moved.refused} refused (this API process)`));
    }
    const launches = data.decisions.filter(d => d.model === model && d.launched > 0).map(d => d.at);
    const charts = el("div", {class: "charts"});
    charts.append(chart("Queue depth", s.t, QUEUE.map(([k, name, color]) => ({name, color, values: s[k]}))));
    charts.append(chart("Agents", s.t, AGENTS.map(([k, name, color]) =>
      ({name, color, values: k === "warming" ? warming : s[k]})), launches));
    card.append(charts);
    const agents = data.agents[model] || [];
    if (agents.length) {
      const table = el("table");
      table.append(row("th", ["agent", "state", "cluster", "node", "in flight", "tokens/s", "prefix hits",
                              "affinity/spilled"]));
      for (const a of agents) table.append(row("td", [a.agent_id, a.state, a.cluster, a.node, a.inflight,
        a.tokens_per_s, a.prefix_hit_rate === null ? "-" : `${Math.round(a.prefix_hit_rate * 100)}%`,
        `${a.affinity_taken}/${a.affinity_spilled_in}`]));
      card.append(table);
    }
    root.append(card);
  }
  const box = document.getElementById("decisions");
  if (data.decisions.length) {
    const table = el("table");
    table.append(row("th", ["time", "model", "backlog", "desired", "launched", "where", "reason"]));
    for (const d of data.decisions.slice().reverse()) {
      table.append(row("td", [new Date(d.at * 1000).toLocaleTimeString(), d.model, d.backlog, d.desired,
                              d.launched, d.clusters || "-", d.reason]));
    }
    box.className = "";
    box.replaceChildren(table);
  }
}

function row(cell, values) {
  const tr = el("tr");
  for (const v of values) tr.append(el(cell, {}, String(v)));
  return tr;
}

async function refresh() {
  let wait = 5000;
  try {
    // With [auth] on, /ops/data needs an admin's key or the metrics token: /ops#key=... hands it over
    // (a fragment never leaves the browser except as this header).
    const key = new URLSearchParams(location.hash.slice(1)).get("key");
    const headers = key ? {Authorization: `Bearer ${key}`} : {};
    const response = await fetch("ops/data", {cache: "no-store", headers});
    const data = await response.json();
    wait = Math.max(1000, data.sample_s * 1000);
    render(data);
  } catch (err) {
    document.getElementById("status").textContent = `cannot load ops/data: ${err}`;
  }
  setTimeout(refresh, wait);
}
refresh();
</script>
</body>
</html>
"""
