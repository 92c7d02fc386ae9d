"""ops/processes.py: a child that will not stop on SIGTERM leaves, in its log, where it was stuck."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from ops.processes import STACKS_HEADER, Child, free_port
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S
from ops.testing.stack import ROOT, hotq_command, write_config

# What a hotq process does at start (ops/cli.py), then it ignores SIGTERM and waits in a named function.
STUCK_CHILD = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def waiting_forever_on_purpose():
    print("ready", flush=True)
    while True:
        time.sleep(1)
waiting_forever_on_purpose()
"""


def test_a_child_that_ignores_sigterm_is_killed_and_its_stacks_are_in_its_log(tmp_path: Path) -> None:
    child = Child("stuck", [sys.executable, "-c", STUCK_CHILD], tmp_path / "stuck.log")
    try:
        child.wait_for_log("ready", STARTUP_S)
    finally:
        returncode = child.stop(timeout_s=1)
    assert returncode == -signal.SIGKILL
    log = child.log_text()
    assert STACKS_HEADER in log and "waiting_forever_on_purpose" in log, log
    assert "hotq: stuck was still running 1 s after SIGTERM: killed (stacks above)" in log, log


def test_a_hotq_process_writes_its_stacks_on_sigusr1(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    model = f"stacks-{session_tag}"
    delete_test_queues.append(model)
    config = write_config(tmp_path / "hotq.toml", amqp_url, {model: {"backend_url": "http://127.0.0.1:9"}})
    port = free_port()
    api = Child(
        "api", hotq_command("serve", "--config", str(config), "--port", str(port)), tmp_path / "api.log", cwd=ROOT
    )
    try:
        api.wait_for_http(f"http://127.0.0.1:{port}/v1/models", STARTUP_S)
        api.send_signal(signal.SIGUSR1)
        api.wait_for_log(STACKS_HEADER, EVENTUALLY_S)
        assert api.poll() is None, "SIGUSR1 only asks for the stacks"
    finally:
        api.stop(timeout_s=EVENTUALLY_S)
