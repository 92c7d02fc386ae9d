"""Issue 15 §5: tokens_per_minute counts a stream the client leaves on any backend, not only vLLM.

A module of its own: the usage record it waits for goes to whichever API consumes the vhost's
`hotq.usage` queue, so no other module's API may be running (test_limits keeps one up).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import running_fake_backend
from ops.testing.stack import api_and_worker
from tests.test_limits import cancelled_recorded, leave_after_first_token


def test_a_stream_left_on_a_backend_without_running_usage_is_charged_an_estimate(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    """Issue 15 §5: a backend that ignores continuous_usage_stats (most servers but vLLM) reports
    nothing before its final chunk, so a stream left after its first chunk is charged what was
    streamed and the prompt estimated from its text: a 3,500-word prompt puts the user over 1,000
    tokens per minute."""
    model = f"test-org/limits-estimated-{session_tag}"
    delete_test_queues.append(model)
    prompt = " ".join(f"word{index}" for index in range(3500))
    with running_fake_backend([model], running_usage=False) as backend:
        table = {"backend_url": backend, "limits": {"tokens_per_minute": 1000}}
        with api_and_worker(tmp_path, amqp_url, model, table) as stack:
            client = openai.OpenAI(base_url=stack.url + "/v1", api_key="none", max_retries=0, timeout=EVENTUALLY_S)
            leave_after_first_token(client, model, prompt)
            wait_until(lambda: cancelled_recorded(stack, "anonymous"), EVENTUALLY_S, "the cut stream recorded")
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            assert caught.value.code == "rate_limit_exceeded"
            assert int(caught.value.response.headers["retry-after"]) >= 1

