"""Prometheus metrics of hotq's processes, each on a `CollectorRegistry` its process creates.

- `ApiMetrics`, served by the API at /metrics: what clients got (latency, time
  to first token, requests by status class, tokens in and out) and the fleet as
  the API's sampler last saw it (queue depth and consumers, agents by state,
  their in-flight requests and tokens/s).
- `ScalerMetrics`, exposed by the scaler process: its decisions and launches.

Labels stay few and bounded (model, endpoint, stream, status class, lane,
state, cluster): a busy API never grows new series with its traffic. The
request path looks its labelled series up in a dict, not through `labels()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hpc_agents.decisions import Decision
from ops.snapshot import Snapshot

CONTENT_TYPE = CONTENT_TYPE_LATEST
# From a cached embedding to a long generation under a full queue (request_timeout_s is 600 s).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (served with `CONTENT_TYPE`)."""
    return generate_latest(registry)


@dataclasses.dataclass(slots=True)
class _RequestSeries:
    """One (model, endpoint, stream)'s labelled children, resolved once."""

    latency: Histogram
    ttft: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    by_status: dict[str, Counter]


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        request_labels = ["model", "endpoint", "stream"]
        self.request_seconds = Histogram(
            "hotq_request_duration_seconds",
            "Time from enqueueing a request to the end of its answer, by model, endpoint and stream",
            request_labels,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "hotq_time_to_first_token_seconds",
            "Time from enqueueing a request to its first output bytes sent (the whole answer when not streaming)",
            request_labels,
            buckets=TTFT_BUCKETS_S,
            registry=registry,
        )
        self.requests = Counter(
            "hotq_requests",
            "Answered requests by status class (2xx, 4xx, 5xx; 499 is a client that left)",
            [*request_labels, "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "hotq_prompt_tokens",
            "Prompt tokens of answered requests, as the backend reported them",
            ["model"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "hotq_completion_tokens",
            "Generated tokens of answered requests, as the backend reported them",
            ["model"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "hotq_queue_depth", "Ready requests waiting in a model's queue", ["model", "lane"], registry=registry
        )
        self.queue_consumers = Gauge(
            "hotq_queue_consumers", "Consumers attached to a model's queue", ["model", "lane"], registry=registry
        )
        self.agents = Gauge(
            "hotq_agents", "Live agents by model, state and cluster", ["model", "state", "cluster"], registry=registry
        )
        self.agent_inflight = Gauge(
            "hotq_agent_inflight", "Requests in the model's agents' backends", ["model"], registry=registry
        )
        self.agent_tokens_per_second = Gauge(
            "hotq_agent_tokens_per_second",
            "Generated tokens/s summed over the model's hot agents",
            ["model"],
            registry=registry,
        )
        self.stream_migrations = Counter(
            "hotq_stream_migrations",
            "Streams that lost their consumer after output was sent: resumed on another, ended by the API"
            " (the answer was complete), or refused (not continuable, or past max_migrations)",
            ["model", "outcome"],
            registry=registry,
        )
        self.resume_gap_seconds = Histogram(
            "hotq_stream_resume_gap_seconds",
            "A migrated stream's pause: its last output before the move to its first output after",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=registry,
        )
        self._series: dict[tuple[str, str, bool], _RequestSeries] = {}

    def observe_request(
        self,
        model: str,
        endpoint: str,
        stream: bool,
        status: int,
        seconds: float,
        ttft_s: float | None,
        usage: Mapping[str, int] | None,
    ) -> None:
        """Count one finished request; `ttft_s` is None when no output reached the client."""
        series = self._series.get((model, endpoint, stream)) or self._new_series(model, endpoint, stream)
        series.latency.observe(seconds)
        if ttft_s is not None:
            series.ttft.observe(ttft_s)
        status_class = f"{status // 100}xx"
        counter = series.by_status.get(status_class)
        if counter is None:
            counter = series.by_status[status_class] = self.requests.labels(
                model, endpoint, str(stream).lower(), status_class
            )
        counter.inc()
        if usage:
            series.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            series.completion_tokens.inc(usage.get("completion_tokens", 0))

    def _new_series(self, model: str, endpoint: str, stream: bool) -> _RequestSeries:
        labels = (model, endpoint, str(stream).lower())
        series = _RequestSeries(
            latency=self.request_seconds.labels(*labels),
            ttft=self.ttft_seconds.labels(*labels),
            prompt_tokens=self.prompt_tokens.labels(model),
            completion_tokens=self.completion_tokens.labels(model),
            by_status={},
        )
        self._series[(model, endpoint, stream)] = series
        return series

    def update_fleet(self, snapshot: Snapshot) -> None:
        """Set the fleet gauges to a snapshot's numbers."""
        # Cleared first, so an agent that left or a queue RabbitMQ could not report on
        # leaves a gap instead of lingering at its last value.
        for gauge in (self.queue_depth, self.queue_consumers, self.agents):
            gauge.clear()
        for model in snapshot.models:
            for lane in model.lanes:
                if lane.depth is not None and lane.consumers is not None:
                    self.queue_depth.labels(model.model, lane.lane.value).set(lane.depth)
                    self.queue_consumers.labels(model.model, lane.lane.value).set(lane.consumers)
            for group in model.groups:
                self.agents.labels(model.model, group.state.value, group.cluster).set(group.count)
            self.agent_inflight.labels(model.model).set(model.inflight)
            self.agent_tokens_per_second.labels(model.model).set(model.tokens_per_s)


class ScalerMetrics:
    """The scaler's counters; it records each `Decision` here as it logs it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "hotq_scaler_decisions",
            "Scaler decisions (a launch or a new desired agent count)",
            ["model"],
            registry=registry,
        )
        self.launches = Counter(
            "hotq_scaler_launches",
            "Agents the scaler launched, by model and cluster",
            ["model", "cluster"],
            registry=registry,
        )
        self.desired = Gauge(
            "hotq_scaler_desired_agents",
            "The agent count the scaler last wanted for a model",
            ["model"],
            registry=registry,
        )

    def record(self, decision: Decision) -> None:
        self.decisions.labels(decision.model).inc()
        self.desired.labels(decision.model).set(decision.desired)
        for cluster in filter(None, decision.clusters.split(",")):  # one entry per launch
            self.launches.labels(decision.model, cluster).inc()
