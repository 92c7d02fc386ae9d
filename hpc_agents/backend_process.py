"""Starting and supervising the model's inference server on the node.

The server is a child process in its own process group (vLLM starts an engine
process of its own), listening on a free local port, its output captured to a
log file. Readiness is `/health` then `/v1/models` answering 200. Stopping sends
SIGTERM to the whole group, then SIGKILL, so nothing is left behind; on Linux
the child also gets SIGTERM if the agent itself dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import structlog

from broker.config import ModelConfig
from hpc_agents.vllm_command import vllm_command, vllm_environment
from ops.processes import signal_group

log = structlog.get_logger("hotq.agent")

STOP_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1


class BackendFailed(Exception):
    """The backend exited, or did not become ready in time."""


def backend_command(model: str, model_config: ModelConfig, port: int) -> list[str]:
    """The configured command with its placeholders filled, or vLLM's server by default."""
    model_path = model_config.model_path or model
    if model_config.command is None:
        return vllm_command(model_path, model, port)
    values = {"port": str(port), "model": model, "model_path": model_path, "python": sys.executable}
    return [part.format(**values) for part in model_config.command]


def backend_environment(model_config: ModelConfig, cache_dir: Path) -> dict[str, str]:
    extra = vllm_environment(cache_dir) if model_config.command is None else {}
    return {**os.environ, **extra, **model_config.env}


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when the agent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class BackendProcess:
    def __init__(self, command: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.command = command
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() takes all of it
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        log.info("backend_started", pid=self.process.pid, port=self.port, log=str(self.log_path))

    async def wait_ready(self, timeout_s: float) -> float:
        """Poll until the server answers; return how long it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for path in ("/health", "/v1/models"):
                while True:
                    if self.process is not None and self.process.poll() is not None:
                        raise BackendFailed(
                            f"the backend exited with {self.process.returncode} while loading; see {self.log_path}"
                        )
                    if time.monotonic() > deadline:
                        raise BackendFailed(f"the backend was not ready within {timeout_s:g} s; see {self.log_path}")
                    try:
                        async with session.get(self.url + path) as response:
                            if response.status == 200:
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(0.25)
        return time.monotonic() - started

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    async def wait_exit(self) -> int:
        """Return the exit code when the backend process ends."""
        assert self.process is not None
        while self.process.poll() is None:
            await asyncio.sleep(0.2)
        return self.process.returncode

    async def stop(self) -> None:
        """SIGTERM the whole process group; SIGKILL what is left after a timeout."""
        process = self.process
        if process is None:
            return
        signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        signal_group(process.pid, signal.SIGKILL)  # also takes children the server left behind
        while process.poll() is None:  # reaped at once after SIGKILL; never block the loop on it
            await asyncio.sleep(0.05)
        log.info("backend_stopped", pid=process.pid, returncode=process.returncode)
