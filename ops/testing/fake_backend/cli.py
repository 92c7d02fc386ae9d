"""Running the fake backend: as a process (`python -m ops.testing.fake_backend`), or from a test."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import uvicorn

from ops.processes import Child
from ops.testing.deadlines import STARTUP_S, STOP_S
from ops.testing.fake_backend.app import create_app
from ops.testing.fake_backend.behaviour import DEFAULT_MODEL

DESCRIPTION: Final = "A deterministic fake OpenAI-compatible backend (stands in for vLLM)."
URL_LINE_PREFIX: Final = "FAKE_BACKEND_URL "
# A model's `command` that makes agents run this backend instead of vLLM.
FAKE_BACKEND_COMMAND: Final = ["{python}", "-m", "ops.testing.fake_backend", "--port", "{port}", "--model", "{model}"]


def _url_for(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve(models: list[str], host: str, port: int, running_usage: bool = True, ready_after_s: float = 0.0) -> None:
    """Bind (port 0 = free port), print the URL line, then serve until SIGINT/SIGTERM."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Binding ourselves (instead of letting uvicorn do it) lets port 0 work race-free:
    # the real port is known before we announce it.
    sock.listen(2048)
    config = uvicorn.Config(
        create_app(models, running_usage, ready_after_s),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Long fake streams would otherwise hold up a SIGTERM shutdown indefinitely.
        timeout_graceful_shutdown=1,
    )
    print(f"{URL_LINE_PREFIX}{_url_for(host, sock.getsockname()[1])}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ops.testing.fake_backend",
        description="A deterministic fake OpenAI-compatible backend (stands in for vLLM).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--model", dest="models", action="extend", nargs="+", default=[], metavar="NAME")
    parser.add_argument(
        "--no-running-usage", action="store_true", help="ignore continuous_usage_stats (like most servers)"
    )
    parser.add_argument(
        "--ready-after", dest="ready_after_s", type=float, default=0.0, help="seconds /health says 503 (loading)"
    )
    args = parser.parse_args(argv)
    serve(args.models or [DEFAULT_MODEL], args.host, args.port, not args.no_running_usage, args.ready_after_s)


@contextlib.contextmanager
def running_fake_backend(
    models: Sequence[str] | None = None, *, host: str = "127.0.0.1", port: int = 0, running_usage: bool = True
) -> Iterator[str]:
    """Run the fake backend in a subprocess; yield its base URL (no ``/v1`` suffix).
    `running_usage` False: a backend that ignores ``continuous_usage_stats``.

    A subprocess (not a thread) so tests can also SIGKILL it and so its event loop never
    competes with the code under test.
    """
    root = Path(__file__).resolve().parents[3]
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "ops.testing.fake_backend", "--host", host, "--port", str(port)]
    if models:
        argv += ["--model", *models]
    if not running_usage:
        argv.append("--no-running-usage")
    with tempfile.TemporaryDirectory(prefix="hotq-fake-backend-") as logs:
        backend = Child("fake backend", argv, Path(logs) / "fake-backend.log", env=env, cwd=root)
        try:
            backend.wait_for_log(URL_LINE_PREFIX, STARTUP_S)
            announced = next(line for line in backend.log_text().splitlines() if line.startswith(URL_LINE_PREFIX))
            url = announced.removeprefix(URL_LINE_PREFIX).strip()
            backend.wait_for_http(url + "/health", STARTUP_S, accept=lambda status: status == 200)
            yield url
        finally:
            backend.stop(STOP_S)
