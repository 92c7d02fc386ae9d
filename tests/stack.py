"""Running hotq as real processes for tests: one API and any number of workers."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_log(process: subprocess.Popen[bytes], path: str, needle: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{open(path).read()}")
        if needle in open(path).read():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{needle!r} not logged within {timeout} s:\n{open(path).read()}")


def write_config(
    path: Path,
    amqp_url: str,
    models: dict[str, dict[str, object]],
    clusters: dict[str, dict[str, object]] | None = None,
    **top: object,
) -> Path:
    lines = [f'amqp_url = "{amqp_url}"', f'data_dir = "{path.parent / "data"}"']
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


class Stack:
    """An API process and workers for one config; everything is killed on `close`."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def _spawn(self, args: list[str], log_name: str) -> tuple[subprocess.Popen[bytes], str]:
        log = str(self.workdir / log_name)
        process = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),
            cwd=Path(__file__).resolve().parent.parent,
        )
        return process, log

    def start_api(self, wait: bool = True) -> subprocess.Popen[bytes]:
        self.api, log = self._spawn(["serve", "--config", str(self.config), "--port", str(self.port)], "api.log")
        if wait:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    httpx.get(self.url + "/v1/models", timeout=1)
                    break
                except httpx.TransportError:
                    if self.api.poll() is not None:
                        raise RuntimeError(open(log).read()) from None
                    time.sleep(0.1)
            else:
                raise TimeoutError(open(log).read())
        return self.api

    def start_worker(self, model: str, *extra: str) -> subprocess.Popen[bytes]:
        self._count += 1
        process, log = self._spawn(
            ["worker", "--config", str(self.config), "--model", model, *extra], f"worker{self._count}.log"
        )
        wait_for_log(process, log, "worker_started")
        self.workers.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.workdir / name).read_text()

    def close(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.api]:
            if process is not None:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@contextlib.contextmanager
def api_and_worker(
    workdir: Path, amqp_url: str, model: str, table: dict[str, object], **top: object
) -> Iterator[Stack]:
    """An API and one worker serving `model` with the [models] `table`: what most tests need."""
    stack = Stack(write_config(workdir / "hotq.toml", amqp_url, {model: table}, **top), workdir)
    try:
        stack.start_api()
        stack.start_worker(model)
        yield stack
    finally:
        stack.close()
