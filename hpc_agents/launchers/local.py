"""The local launcher: agents as child processes on this machine (`hotq up`, tests)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import msgspec

from broker.config import Config
from hpc_agents.launchers import Launcher

STOP_TIMEOUT_S = 120.0


class LocalLauncher(Launcher):
    def __init__(
        self,
        cluster: str,
        config: Config,
        max_nodes: int | None = None,
        log_dir: Path | None = None,
        start_delay_s: float = 0.0,
    ) -> None:
        """`start_delay_s` stands in for a batch scheduler's queue wait (to rehearse placement)."""
        super().__init__(cluster, config, max_nodes)
        self._start_delay_s = start_delay_s
        self._closed = threading.Event()
        self._log_dir = log_dir or Path(config.data_dir) / "logs"
        self._workdir = Path(tempfile.mkdtemp(prefix="hotq-local-launcher-"))
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def submit(self, params: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        agent_id = params["agent_id"]
        config_path = self._workdir / f"{agent_id}.json"
        config_path.write_bytes(msgspec.json.encode(params["config"]))
        summary_path = self._workdir / f"{agent_id}.summary.json"
        self._log_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "ops.cli", "agent",
            "--config", str(config_path), "--model", params["model"],
            "--cluster", params["cluster"], "--agent-id", agent_id,
            "--summary-file", str(summary_path),
        ]  # fmt: skip
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(start_and_wait())
            except Exception as exc:  # the scaler must learn that this launch is over
                future.set_exception(exc)

        def start_and_wait() -> dict[str, Any]:
            if self._closed.wait(self._start_delay_s):
                return {"agent_id": agent_id, "exit_reason": "not_started"}
            with open(self._log_dir / f"agent-{agent_id}.log", "ab") as log:
                # The config file holds the URL already resolved (the agent role's, if configured):
                # the scaler's own $HOTQ_AMQP_URL must not override it.
                env = {key: value for key, value in os.environ.items() if key != "HOTQ_AMQP_URL"}
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
            with self._lock:
                self._processes[agent_id] = process
            if self._closed.is_set():  # shut down while it was starting: it drains at once
                process.send_signal(signal.SIGTERM)
            returncode = process.wait()
            with self._lock:
                self._processes.pop(agent_id, None)
            try:
                summary: dict[str, Any] = json.loads(summary_path.read_text())
            except (OSError, ValueError):
                summary = {"agent_id": agent_id, "exit_reason": "crashed"}
            summary["returncode"] = returncode
            return summary

        threading.Thread(target=run, name=f"agent-{agent_id}", daemon=True).start()
        return future

    def shutdown(self) -> None:
        self._closed.set()
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            process.send_signal(signal.SIGTERM)  # agents drain: nothing is lost
        for process in processes:
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
