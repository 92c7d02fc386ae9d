"""A direct job past the Batch API's 50,000 lines (issue 16): 50,001 lines read from stdin by
`hotq submit -` run through the fake backend exactly once, every result in input order. Past the cap
is what this proves; the job streams in chunks of 5,000 lines (`producers/bulk.py`), so it goes
through its bounded windows eleven times, as a larger job would, only fewer times."""

from __future__ import annotations

import json
import subprocess

import httpx

from ops.processes import peak_rss_mb, wait_until
from ops.testing.deadlines import EVENTUALLY_S, LONG_WORK_S
from ops.testing.fake_backend import fake_stats, reply_text
from ops.testing.stack import ROOT, hotq_command
from tests.conftest import FakeWorker

LINES = 50_001  # one past the Batch API's cap


def _prompt(number: int) -> str:
    return f"prompt number {number} of the big job"


def test_a_job_past_the_batch_api_s_cap_from_stdin_completes_exactly_once(fake_worker: FakeWorker) -> None:
    workdir = fake_worker.config.parent
    source, out = workdir / "big.jsonl", workdir / "big-results.jsonl"
    with open(source, "w") as file:
        for n in range(1, LINES + 1):
            file.write(json.dumps({"messages": [{"role": "user", "content": _prompt(n)}]}) + "\n")
    httpx.post(fake_worker.backend_url + "/_reset", timeout=EVENTUALLY_S)
    command = hotq_command(
        "submit", "-", "--model", fake_worker.model, "--out", str(out), "--config", str(fake_worker.config)
    )
    peak = 0.0

    def exited() -> bool:
        nonlocal peak
        peak = max(peak, peak_rss_mb(submit.pid) or 0.0)  # sampled while it runs, printed below
        return submit.poll() is not None

    with open(source, "rb") as stdin, open(workdir / "submit.log", "wb") as log:
        submit = subprocess.Popen(command, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:  # 50,001 lines are 2.5 times the 20,000 LONG_WORK_S is sized for
            wait_until(exited, 3 * LONG_WORK_S, f"hotq submit of {LINES} lines finished")
        except BaseException:
            submit.kill()
            submit.wait()
            raise
    assert submit.returncode == 0, (workdir / "submit.log").read_text()[-3000:]

    count = 0
    with open(out) as results:
        for count, line in enumerate(results, start=1):
            record = json.loads(line)
            assert record["custom_id"] == str(count)  # every line once, in input order
            assert record["error"] is None and record["response"]["status_code"] == 200, record
            content = record["response"]["body"]["choices"][0]["message"]["content"]
            assert content == reply_text([{"role": "user", "content": _prompt(count)}], None)
    assert count == LINES
    assert fake_stats(fake_worker.backend_url)["started"] == LINES  # nothing published or served twice
    print(f"\nhotq submit of {LINES} lines: peak RSS {peak:.0f} MB (sampled)")
