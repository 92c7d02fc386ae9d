"""hotq as real processes for tests and benchmarks: an API and workers or agents for one config.

Each process is an `ops.processes.Child` logging to a file in the stack's work
directory (``api.log``, ``worker1.log``, ``agent1.log``, ...). Starting one waits for
it to be ready (the API answering HTTP, a worker logging ``worker_started``) with a
generous deadline (`ops.testing.deadlines`); `Stack.close` stops the workers and agents,
then the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import aio_pika

from ops.processes import Child, Children, free_port, wait_until
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S, STOP_S
from ops.testing.fake_backend import running_fake_backend

ROOT: Final = Path(__file__).resolve().parents[2]  # the checkout: hotq's processes run from it


def hotq_command(*args: str) -> list[str]:
    """`hotq ARGS`, run by this Python."""
    return [sys.executable, "-m", "ops.cli", *args]


def run_hotq(config: Path, *args: str, timeout_s: float = EVENTUALLY_S) -> subprocess.CompletedProcess[str]:
    """`hotq ARGS --config CONFIG` run to its end, its output captured."""
    command = hotq_command(*args, "--config", str(config))
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)


def create_key(config: Path, user: str, *extra: str) -> str:
    """A new API key of `user` (`hotq keys create EXTRA`)."""
    done = run_hotq(config, "keys", "create", "--user", user, *extra)
    if done.returncode != 0:
        raise RuntimeError(f"hotq keys create failed: {done.stderr}")
    return done.stdout.strip().splitlines()[-1]  # the key is the last line


def write_config(
    path: Path,
    amqp_url: str | list[str],
    models: Mapping[str, Mapping[str, object]],
    clusters: Mapping[str, Mapping[str, object]] | None = None,
    **top: object,
) -> Path:
    """A hotq.toml at `path` (its data directory beside it) with these [models], [clusters] and top-level keys."""
    lines = [f"amqp_url = {_toml(amqp_url)}", f'data_dir = "{path.parent / "data"}"']
    lines += [f"{key} = {_toml(value)}" for key, value in top.items()]
    for kind, tables in (("clusters", clusters or {}), ("models", models)):
        for name, table in tables.items():
            lines.append(f'[{kind}."{name}"]')
            lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, such as auth = { modes = ["api_key"] }
        return "{ " + ", ".join(f"{key} = {_toml(v)}" for key, v in value.items()) + " }"
    return str(value)


def log_events(log: Path) -> list[dict[str, Any]]:
    """The JSON events a hotq process logged (lines that are not JSON, such as tracebacks, left out)."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def wait_for_event(
    child: Child, event: str, count: int = 1, timeout_s: float = EVENTUALLY_S, **fields: object
) -> dict[str, Any]:
    """The `count`-th `event` (with these `fields`, if given) the child logged, once it has logged that many."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [
            e
            for e in log_events(child.log_path)
            if e.get("event") == event and all(e.get(key) == value for key, value in fields.items())
        ]
        return len(found) >= count

    wait_until(logged, timeout_s, f"{event!r} {fields or ''} logged {count} time(s)", child)
    return found[count - 1]


def ready_messages(amqp_url: str, queue: str) -> int:
    """The messages ready in `queue` (0 if there is no such queue): exact, unlike RabbitMQ's sampled stats."""

    async def count() -> int:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return 0
            return declared.declaration_result.message_count or 0

    return asyncio.run(count())


class Stack:
    """An API and workers or agents for one config; `close` stops them all.

    `log_level` (e.g. "debug") is passed to every process; `start_worker(config=...)`
    runs a worker with a config of its own (another RabbitMQ user, say).
    """

    def __init__(self, config: Path, workdir: Path, log_level: str | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: Child | None = None
        self.workers: list[Child] = []  # workers and agents, in the order they started
        self.backend_url: str | None = None  # the fake backend of `api_and_worker_on_a_fake_backend`
        self._options = [] if log_level is None else ["--log-level", log_level]
        self._children = Children(workdir, STOP_S)
        self._numbers: dict[str, Iterator[int]] = {}

    def _start(self, kind: str, args: list[str]) -> Child:
        number = next(self._numbers.setdefault(kind, itertools.count(1)))
        name = kind if kind == "api" else f"{kind}{number}"
        return self._children.start(name, hotq_command(*self._options, *args), cwd=ROOT)

    def start_api(self, wait: bool = True) -> Child:
        """`hotq serve` on the stack's port (again, after a kill); by default once it answers HTTP."""
        self._children.stop("api")  # reaps one that was killed: the new one takes its port and log
        self.api = self._start("api", ["serve", "--config", str(self.config), "--port", str(self.port)])
        if wait:
            self.api.wait_for_http(self.url + "/v1/models", STARTUP_S)
        return self.api

    def start_worker(self, model: str, *extra: str, config: Path | None = None) -> Child:
        """`hotq worker` for `model`, once it consumes."""
        args = ["worker", "--config", str(config or self.config), "--model", model, *extra]
        worker = self._start("worker", args)
        self.workers.append(worker)
        worker.wait_for_log("worker_started", STARTUP_S)
        return worker

    def start_agent(self, model: str, config: Path | None = None) -> Child:
        """`hotq agent` for `model` (its backend from the model's `command`), not waited for: the
        caller waits for the event it needs (`wait_for_event`)."""
        agent = self._start("agent", ["agent", "--config", str(config or self.config), "--model", model])
        self.workers.append(agent)
        return agent

    def log(self, name: str) -> str:
        return (self.workdir / name).read_text(errors="replace")

    def close(self) -> None:
        """Stop the workers and agents (signalled together, so they drain in parallel), then the API."""
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            self._children.stop(worker.name)
        self._children.stop_all()


@contextlib.contextmanager
def api_and_workers(config: Path, workdir: Path, models: Iterable[str]) -> Iterator[Stack]:
    """An API and one worker for each of `models`, from a config already written."""
    stack = Stack(config, workdir)
    try:
        stack.start_api()
        for model in models:
            stack.start_worker(model)
        yield stack
    finally:
        stack.close()


@contextlib.contextmanager
def api_and_worker(
    workdir: Path, amqp_url: str | list[str], model: str, table: Mapping[str, object], **top: object
) -> Iterator[Stack]:
    """An API and one worker serving `model` with the [models] `table`: what most tests need."""
    config = write_config(workdir / "hotq.toml", amqp_url, {model: table}, None, **top)
    with api_and_workers(config, workdir, [model]) as stack:
        yield stack


@contextlib.contextmanager
def api_and_worker_on_a_fake_backend(
    workdir: Path, amqp_url: str | list[str], model: str, table: Mapping[str, object], **top: object
) -> Iterator[Stack]:
    """`api_and_worker`, the model served by a fake backend of its own (`stack.backend_url`)."""
    with running_fake_backend([model]) as backend_url:
        with api_and_worker(workdir, amqp_url, model, {**table, "backend_url": backend_url}, **top) as stack:
            stack.backend_url = backend_url
            yield stack


@contextlib.contextmanager
def worker_on_a_fake_backend(workdir: Path, amqp_url: str, model: str, max_inflight: int) -> Iterator[Stack]:
    """A worker (no API) serving `model` from a fake backend of its own (`stack.backend_url`); the
    config is `stack.config` (its data directory beside it)."""
    with running_fake_backend([model]) as backend_url:
        table = {"backend_url": backend_url, "max_inflight": max_inflight}
        stack = Stack(write_config(workdir / "hotq.toml", amqp_url, {model: table}), workdir)
        stack.backend_url = backend_url
        try:
            stack.start_worker(model)
            yield stack
        finally:
            stack.close()
