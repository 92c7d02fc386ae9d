"""`hotq serve --workers N`: N API processes on one port, supervised by this one.

This process binds the port once and each child inherits the listening socket (`--fd`), so the
kernel hands every new connection to whichever child accepts first: a busy child takes fewer,
and a child that dies loses only the connections it had accepted (with SO_REUSEPORT each child
would have its own accept queue, lost with it, and connections spread by hash, not by load).
uvicorn's own `--workers` does the same, but takes the app as an import string and configures
it from the environment; these children are plain `hotq serve` processes (`ops.processes`):
each with its own AMQP connection, job store connection and event loop. A child that dies is
started again; SIGTERM (or Ctrl-C, SIGHUP) is passed on to every child, which finishes the
requests it has, and this process exits once they all have.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import structlog

from api.app import SHUTDOWN_CLOSE_S
from ops.processes import Children

log = structlog.get_logger("hotq.serve")

POLL_S = 0.2  # how often the children are looked at
RESTART_PAUSE_S = 1.0  # between a child's death and its replacement (no busy loop if it cannot start)
# A child gets its requests' `[api] drain_grace_s`, then its close (bounded by api.app), then this
# long to exit, before it is killed.
EXIT_S = 5.0
BACKLOG = 2048


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def leave_with_supervisor() -> None:
    """In a child: stop (as on SIGTERM) once the supervisor is gone, even killed with -9, so no
    orphaned API process keeps serving the port after its `hotq serve` ended."""
    supervisor = os.getppid()

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(POLL_S)
        log.warning("api_supervisor_gone_stopping", supervisor=supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def serve_workers(
    child_args: list[str], host: str, port: int, workers: int, data_dir: Path, drain_grace_s: int
) -> None:
    """Run `workers` children (`hotq <child_args> --fd N`) on `host:port` until told to stop."""
    sock = listen(host, port)
    children = Children(data_dir / "logs", drain_grace_s + SHUTDOWN_CLOSE_S + EXIT_S)
    argv = [sys.executable, "-m", "ops.cli", *child_args, "--fd", str(sock.fileno())]
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    names = [f"api-{n}" for n in range(1, workers + 1)]
    for name in names:
        children.start(name, argv, own_log=False, pass_fds=[sock.fileno()])
    log.info("api_workers_started", workers=workers, host=host, port=port, pids=[child.pid for child in children])
    try:
        while not stopping:
            time.sleep(POLL_S)
            for name in names:
                if stopping or children[name].poll() is None:
                    continue
                code = children.stop(name)  # reaps it (and anything it left in its group)
                log.warning("api_worker_died_restarting", worker=name, exit_code=code)
                time.sleep(RESTART_PAUSE_S)
                child = children.start(name, argv, own_log=False, pass_fds=[sock.fileno()])
                log.info("api_worker_restarted", worker=name, pid=child.pid)
    finally:
        for child in children:  # all at once, then wait for each
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        children.stop_all()
        sock.close()
        log.info("api_workers_stopped", signal=stopping[0] if stopping else None)
