"""How long the test suite waits for things: generously, and only for conditions.

A test must pass on a machine several times slower than the one it was written on (CI
machines are; real vLLM on a small CPU is ten times slower still), and on one whose
cores other work shares. So a test never sleeps a fixed time hoping something has
happened: it waits for the condition (`ops.processes.wait_until`), and the deadline is
there only to turn a hang into a failure. A wait ends as soon as its condition holds, so
a generous deadline costs nothing when the test passes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Final

STARTUP_S: Final = 180.0  # a process (an API, a worker, an agent with the fake backend) until it is ready
EVENTUALLY_S: Final = 120.0  # what the stack does by itself: an answer, a usage record, a state change
STOP_S: Final = 60.0  # a graceful stop (a drain included) before SIGKILL
LONG_WORK_S: Final = 600.0  # a long piece of work: 20,000 batch lines, 500 concurrent streams
VLLM_STARTUP_S: Final = 1800.0  # `hotq up` converting and loading the embedded model on a slow CPU
VLLM_EVENTUALLY_S: Final = 600.0  # an answer or a record from real vLLM on a slow CPU

# How many windows `in_growing_windows` tries, each twice the one before (the last: 16 times the first).
WINDOW_TRIES: Final = 5


def in_growing_windows(attempt: Callable[[float], str | None], first_s: float) -> None:
    """For a test whose window must expire (a key's life, a queue wait, a batch's completion window)
    and must also be long enough for the machine to do its part inside it. One window long enough
    for any machine would make every run wait it out; instead `attempt(window_s)` runs with a short
    one and says why it was too short for this machine (None: it was not, and the test passed), and
    then runs again with twice the window. A slow machine costs time, never a failure; each retry
    warns, so that a product grown slower shows in pytest's summary."""
    window_s = first_s
    for tries_left in reversed(range(WINDOW_TRIES)):
        too_short = attempt(window_s)
        if too_short is None:
            return
        if not tries_left:
            raise AssertionError(f"{too_short}, even in a {window_s:g} s window")
        warnings.warn(f"{too_short} in a {window_s:g} s window; trying {2 * window_s:g} s", stacklevel=2)
        window_s *= 2
