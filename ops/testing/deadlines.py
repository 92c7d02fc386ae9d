"""How long the test suite waits for things: generously, and only for conditions.

A test must pass on a machine several times slower than the one it was written on (CI
machines are; real vLLM on a small CPU is ten times slower still), and on one whose
cores other work shares. So a test never sleeps a fixed time hoping something has
happened: it waits for the condition (`ops.processes.wait_until`), and the deadline is
there only to turn a hang into a failure. A wait ends as soon as its condition holds, so
a generous deadline costs nothing when the test passes.
"""

from __future__ import annotations

from typing import Final

STARTUP_S: Final = 180.0  # a process (an API, a worker, an agent with the fake backend) until it is ready
EVENTUALLY_S: Final = 120.0  # what the stack does by itself: an answer, a usage record, a state change
STOP_S: Final = 60.0  # a graceful stop (a drain included) before SIGKILL
LONG_WORK_S: Final = 600.0  # a long piece of work: 20,000 batch lines, 500 concurrent streams
VLLM_STARTUP_S: Final = 1800.0  # `hotq up` converting and loading the embedded model on a slow CPU
VLLM_EVENTUALLY_S: Final = 600.0  # an answer or a record from real vLLM on a slow CPU
