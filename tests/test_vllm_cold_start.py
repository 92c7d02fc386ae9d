"""Issue 10 §1 with real vLLM: a request sent to a model with no agent at all waits while the
scaler launches one on demand and vLLM loads the embedded model, and is answered, although
`max_queue_wait_s` is far shorter than the load."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from hpc_agents.embedded_model import ensure_embedded_model
from ops.processes import Child, free_port, wait_until
from ops.testing.deadlines import EVENTUALLY_S, VLLM_EVENTUALLY_S, VLLM_STARTUP_S
from ops.testing.stack import hotq_command, write_config

MAX_QUEUE_WAIT_S = 1.0  # any vLLM load takes longer: the answer must come from waiting for it


@pytest.mark.timeout(2 * VLLM_STARTUP_S + VLLM_EVENTUALLY_S)
def test_a_request_to_a_cold_model_is_answered_once_vllm_is_hot(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    model = f"smollm-cold-{session_tag}"
    delete_test_queues.append(model)
    table = {"model_path": str(ensure_embedded_model()), "min_hot": 0, "max_agents": 1, "idle_ttl_s": 600}
    config = write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, max_queue_wait_s=MAX_QUEUE_WAIT_S)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    command = hotq_command("up", "--config", str(config), "--port", str(port))
    up = Child("hotq up", command, tmp_path / "up.log", env=os.environ | {"HOTQ_AMQP_URL": amqp_url}, cwd=tmp_path)
    try:
        up.wait_for_http(url + "/models", EVENTUALLY_S, accept=lambda status: status == 200)
        listed = httpx.get(url + "/models", timeout=EVENTUALLY_S).json()["data"][0]["hotq"]
        assert listed["consumers"] == 0 and listed["state"] != "hot"  # nothing serves it: min_hot 0, no work yet
        response = httpx.post(
            url + "/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8},
            timeout=VLLM_STARTUP_S,
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
        assert int(response.headers["x-hotq-queue-wait-ms"]) >= 0
        up.wait_for_log("launching 1 agent(s)", EVENTUALLY_S)  # on demand, for this request
        up.wait_for_log("model server ready", EVENTUALLY_S)

        def hot() -> bool:
            return bool(httpx.get(url + "/models", timeout=EVENTUALLY_S).json()["data"][0]["hotq"]["state"] == "hot")

        wait_until(hot, EVENTUALLY_S, "/v1/models saying the model is hot")
    finally:
        returncode = up.stop(VLLM_EVENTUALLY_S)  # the agent drains, vLLM stops
    assert returncode == 0, up.log_tail()
