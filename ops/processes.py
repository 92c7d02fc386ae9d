"""Child processes with a log file each: started, waited for, stopped and reaped.

`hotq up` runs the API and the scaler this way; the test suite (`ops.testing`) and the
benchmarks (`bench/`) run their stacks this way too. Each child starts in a session of
its own, so that

- a terminal's Ctrl-C reaches only the parent, which stops its children in the order
  it chooses (`hotq up`: the scaler first, while the API still takes the agents' replies);
- stopping a child reaches whatever it started: SIGTERM lets the child stop its own
  children gracefully, and what is still alive in its process group after that (or
  after the timeout) gets SIGKILL.

Waiting is for a condition with a deadline, never for a fixed time, and gives up at
once, with the end of the child's log, when the child it waits on has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path

POLL_S = 0.05  # how often a condition is looked at again, at first ...
MAX_POLL_S = 0.25  # ... then less and less often, down to this: a long wait (for vLLM, say) costs little
# CPU. Conditions read logs, ask HTTP endpoints or open AMQP connections: at 20 a second for minutes,
# the waiting itself slowed what it waited for on a 2-core machine.
LOG_TAIL_LINES = 40  # how much of a child's log an error shows
# A child that ignores SIGTERM past its stop timeout is asked for its thread stacks (SIGUSR1: hotq's
# processes write them to their log, see ops/cli.py) and killed once they are written, or after this.
STACK_DUMP_S = 10.0
STACKS_HEADER = "most recent call first"  # how faulthandler starts each thread's stack

# Loopback checks must never go through a proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProcessExited(RuntimeError):
    """A child ended while something that needs it running was awaited."""


class Child(subprocess.Popen[bytes]):
    """A process whose stdout and stderr go to `log_path` (or, without one, to the parent's), in a
    session (process group) of its own; `pass_fds` it inherits (a listening socket)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        append: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.log_path = log_path or Path(os.devnull)
        with contextlib.ExitStack() as stack:
            log = None
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = stack.enter_context(open(log_path, "ab" if append else "wb"))
            super().__init__(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=None if log is None else subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,  # its own process group: see the module's docstring
                pass_fds=tuple(pass_fds),
            )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_after(self, offset: int) -> str:
        """What the child logged past `offset` (its log may be large)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def ensure_running(self, waiting_for: str) -> None:
        """Raise `ProcessExited` (with the end of the log) if the child has ended."""
        if self.poll() is not None:
            raise ProcessExited(
                f"{self.name} exited with {self.returncode} while waiting for {waiting_for};"
                f" the end of {self.log_path}:\n{self.log_tail()}"
            )

    def wait_for_log(self, needle: str, timeout_s: float) -> None:
        """Wait until the log holds `needle`."""
        wait_until(lambda: needle in self.log_text(), timeout_s, f"{needle!r} in its log", self)

    def wait_for_http(self, url: str, timeout_s: float, accept: Callable[[int], bool] = lambda status: True) -> None:
        """Wait until `url` answers with a status `accept` takes (by default any answer at all)."""

        def answered() -> bool:
            status = http_status(url)
            return status is not None and accept(status)

        wait_until(answered, timeout_s, f"answer from {url}", self)

    def stop(self, timeout_s: float) -> int:
        """SIGTERM the child; SIGKILL its process group once it exited or `timeout_s` passed; reap it.
        A child still running at the deadline leaves its thread stacks and a line saying so in its log."""
        if self.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._record_stuck_stop(timeout_s)
        signal_group(self.pid, signal.SIGKILL)  # pgid == pid: the child, if still there, and what it left
        return self.wait()

    def _record_stuck_stop(self, timeout_s: float) -> None:
        """Where a child that ignored SIGTERM was stuck: its stacks (SIGUSR1), then a line naming it."""
        at_signal = logged = self._log_size()
        self.send_signal(signal.SIGUSR1)

        def stacks_written() -> bool:  # the log has them and stopped growing; or SIGUSR1 ended the child
            nonlocal logged
            before, logged = logged, self._log_size()
            return self.poll() is not None or (logged == before and STACKS_HEADER in self._log_after(at_signal))

        with contextlib.suppress(TimeoutError):
            wait_until(stacks_written, STACK_DUMP_S, f"{self.name}'s thread stacks")
        with contextlib.suppress(OSError), open(self.log_path, "a") as log:
            log.write(f"hotq: {self.name} was still running {timeout_s:g} s after SIGTERM: killed (stacks above)\n")


class Children:
    """Named children logging to `<log_dir>/<name>.log`; `stop_all` stops the last started first."""

    def __init__(self, log_dir: Path, stop_timeout_s: float, *, append_logs: bool = False) -> None:
        self.log_dir = log_dir
        self.stop_timeout_s = stop_timeout_s
        self._append_logs = append_logs
        self._running: dict[str, Child] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        own_log: bool = True,
        pass_fds: Sequence[int] = (),
    ) -> Child:
        """Start `name`, logging to its own file (`own_log`) or to this process's output."""
        if name in self._running:
            raise ValueError(f"a child named {name!r} is running already")
        log_path = self.log_path(name) if own_log else None
        child = Child(name, argv, log_path, env=env, cwd=cwd, append=self._append_logs, pass_fds=pass_fds)
        self._running[name] = child
        return child

    def __getitem__(self, name: str) -> Child:
        return self._running[name]

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._running.values()))

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def stop(self, name: str, timeout_s: float | None = None) -> int | None:
        """Stop the child `name` (see `Child.stop`) and forget it; its exit code, None if there was none."""
        child = self._running.pop(name, None)
        if child is None:
            return None
        return child.stop(self.stop_timeout_s if timeout_s is None else timeout_s)

    def stop_all(self) -> None:
        for name in reversed(list(self._running)):
            self.stop(name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's counts too; a zombie, dead and not
    yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return not Path("/proc").is_dir()  # no /proc (not Linux): kill(0) is all we can know


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (Linux's VmHWM), None once it is gone. Not the
    rusage of a reaped child: that counts the parent's memory too, as the child had it before exec."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def signal_group(pgid: int, signum: int) -> None:
    """Send `signum` to process group `pgid`, if it is still there."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """The HTTP status a GET of `url` answers with; None when nothing answered."""
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


class Deadline:
    """A wait for `what` that may last `timeout_s`, and only while `child` (if any) runs."""

    def __init__(self, timeout_s: float, what: str, child: Child | None = None) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.child = child
        self._ends_at = time.monotonic() + timeout_s

    def check(self) -> None:
        """Raise `ProcessExited` if the child ended, `TimeoutError` if the time is up."""
        if self.child is not None:
            self.child.ensure_running(self.what)
        if time.monotonic() > self._ends_at:
            tail = "" if self.child is None else f"; the end of {self.child.log_path}:\n{self.child.log_tail()}"
            raise TimeoutError(f"no {self.what} within {self.timeout_s:g} s{tail}")


def wait_until(
    condition: Callable[[], object],
    timeout_s: float,
    what: str,
    child: Child | None = None,
    poll_s: float | None = None,
) -> None:
    """Return once `condition()` is true; raise when `timeout_s` passed or `child` exited first.
    `poll_s`: look every `poll_s` (by default `POLL_S` at first, less often as the wait goes on)."""
    deadline = Deadline(timeout_s, what, child)
    for pause in _pauses(poll_s):
        if condition():
            return
        deadline.check()
        time.sleep(pause)


def _pauses(poll_s: float | None) -> Iterator[float]:
    """The pauses between looks at a condition: `poll_s` each time, or by default `POLL_S` growing by
    half each time up to `MAX_POLL_S`."""
    if poll_s is not None:
        yield from itertools.repeat(poll_s)
    pause = POLL_S
    while True:
        yield pause
        pause = min(pause * 1.5, MAX_POLL_S)


async def wait_until_async(
    condition: Callable[[], object | Awaitable[object]],
    timeout_s: float,
    what: str,
    child: Child | None = None,
    poll_s: float | None = None,
) -> None:
    """`wait_until` for an event loop: `condition` may be a plain or an async function."""
    deadline = Deadline(timeout_s, what, child)
    for pause in _pauses(poll_s):
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        deadline.check()
        await asyncio.sleep(pause)
