"""How hotq processes stop: a child that will not stop on SIGTERM leaves, in its log, where it was
stuck (ops/processes.py); an API stops within its drain grace however its clients behave."""

from __future__ import annotations

import concurrent.futures
import signal
import sys
from pathlib import Path

import httpx

from ops.processes import STACKS_HEADER, Child, free_port, wait_until
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S
from ops.testing.fake_backend import Hold, fake_stats, running_fake_backend
from ops.testing.stack import ROOT, Stack, hotq_command, log_events, write_config

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


def test_an_api_stops_after_its_drain_grace_though_a_request_never_finishes(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    """SIGTERM while a request is held in the backend for good: the API cuts it once `[api]
    drain_grace_s` has passed (its client gets a 500), closes, and exits, instead of waiting for it forever."""
    model = f"grace-{session_tag}"
    delete_test_queues.append(model)
    hold = Hold(tmp_path / "release")  # never released while the API stops
    with running_fake_backend([model]) as backend_url:
        config = write_config(
            tmp_path / "hotq.toml", amqp_url, {model: {"backend_url": backend_url}}, api={"drain_grace_s": 1}
        )
        stack = Stack(config, tmp_path)
        try:
            api = stack.start_api()
            stack.start_worker(model)
            body = {"model": model, "messages": [{"role": "user", "content": "held"}], **hold.field}
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                # The client waits longer than the stop below, so that it cannot end the request first.
                url = stack.url + "/v1/chat/completions"
                held = pool.submit(httpx.post, url, json=body, timeout=2 * EVENTUALLY_S)
                wait_until(lambda: fake_stats(backend_url)["active"] == 1, EVENTUALLY_S, "the request in the backend")
                # It ends on the SIGTERM itself, as uvicorn does; it would be SIGKILLed past the stop
                # timeout if it waited for the request.
                assert api.stop(timeout_s=EVENTUALLY_S) == -signal.SIGTERM, api.log_text()[-3000:]
                assert held.result().status_code == 500  # cut by the server, not answered
        finally:
            hold.release()
            stack.close()
    assert "timeout graceful shutdown exceeded" in api.log_text(), api.log_text()[-3000:]
    events = [e for e in log_events(api.log_path) if e.get("event") in ("request_done", "api_stopping", "api_stopped")]
    assert [e["event"] for e in events] == ["request_done", "api_stopping", "api_stopped"], events
    assert events[0]["status"] == 500 and events[0]["error"] == "cancelled_at_shutdown", events[0]
