"""`hotq up`: the whole stack on one machine, the embedded model by default.

Without a config file it converts the embedded SmolLM2 model once (cached),
writes a config for it under the data directory, then starts the API and the
scaler (`hotq scale`, with the local launcher unless the config names clusters)
as child processes (`ops.processes`), shows the agents' progress, and prints how
to call the API once every model is being served. Models with `min_hot = 0` are
served on demand: their first request waits in the queue while an agent starts.
Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops everything: the scaler
first, so its agents drain while the API still takes their answers, then the API.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from broker.config import DEFAULT_CONFIG_PATH, Config, load_config
from ops.processes import Child, Children

READY_POLL_S = 0.5
STOP_TIMEOUT_S = 150.0  # the scaler drains its agents (vLLM included) before it exits
# Agent log events worth showing while the stack starts, as a person would say them.
_PROGRESS = {
    "backend_started": "starting the model server (vLLM loads in about 30 s on a CPU)",
    "backend_ready": "model server ready",
    "backend_died": "model server died; restarting it",
    "agent_exit": "agent left",
    "agent_finished": "agent finished",
}


def default_config_text(model_name: str, model_path: Path, data_dir: Path) -> str:
    return f"""# Written by `hotq up`: the embedded default model, served on this machine.
data_dir = "{data_dir}"

[models."{model_name}"]
model_path = "{model_path}"
max_inflight = 32
# One agent stays hot (the scaler replaces it if it dies); more start under load.
min_hot = 1
max_agents = 1
idle_ttl_s = 86400
"""


def _say(message: str) -> None:
    print(f"[hotq up] {message}", flush=True)


def resolve_config(config_path: str | None, data_dir: Path) -> Path:
    explicit = config_path or os.environ.get("HOTQ_CONFIG")
    if explicit:
        return Path(explicit)
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    from hpc_agents.embedded_model import DEFAULT_MODEL_NAME, ensure_embedded_model

    _say("no hotq.toml here: using the embedded model SmolLM2-135M-Instruct")
    model_path = ensure_embedded_model(log=_say)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "hotq.toml"
    path.write_text(default_config_text(DEFAULT_MODEL_NAME, model_path, data_dir.resolve()))
    _say(f"wrote {path}")
    return path


class Stack:
    def __init__(self, config_path: Path, config: Config, host: str, port: int) -> None:
        self.config_path = config_path
        self.config = config
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"
        self.logs = Path(config.data_dir) / "logs"
        self.children = Children(self.logs, STOP_TIMEOUT_S, append_logs=True)  # each run adds to the logs
        self._log_offsets: dict[Path, int] = {}

    def _start(self, name: str, args: list[str]) -> Child:
        return self.children.start(name, [sys.executable, "-m", "ops.cli", *args, "--config", str(self.config_path)])

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for path in self.logs.glob("*.log"):  # only what this run writes is news
            self._log_offsets[path] = path.stat().st_size
        _say(f"starting the API on {self.url} (log: {self.logs / 'api.log'})")
        self._start("api", ["serve", "--host", self.host, "--port", str(self.port)])
        _say(f"starting the scaler (log: {self.logs / 'scaler.log'}; agents log to {self.logs}/agent-*.log)")
        self._start("scaler", ["scale"])

    def show_progress(self) -> None:
        """Print the notable events the scaler and agents logged since the last call."""
        for path in sorted(self.logs.glob("*.log")):
            if path.name == "api.log" or path.name.startswith("backend-"):
                continue
            with open(path, "rb") as log:
                log.seek(self._log_offsets.get(path, 0))
                lines = log.readlines()
                self._log_offsets[path] = log.tell()
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                model = event.get("model", "")
                name = event.get("event")
                if name == "scaler_decision" and event.get("launched"):
                    _say(f"{model}: launching {event['launched']} agent(s): {event['reason']}")
                elif name == "agent_state":
                    _say(f"{model}: agent {event.get('agent_id', '')} {event['state']}")
                elif name in _PROGRESS:
                    _say(f"{model}: {_PROGRESS[name]}")

    def serving(self) -> bool:
        """True once every model that keeps agents hot has a consumer."""
        try:
            models = httpx.get(self.url + "/v1/models", timeout=2).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        kept_hot = {name for name, model in self.config.models.items() if model.min_hot > 0}
        return bool(models) and all((m.get("hotq") or {}).get("consumers") for m in models if m["id"] in kept_hot)

    def exited(self) -> str | None:
        for child in self.children:
            if child.poll() is not None:
                return f"the {child.name} exited with {child.returncode}; see {child.log_path}"
        return None

    def stop(self) -> None:
        _say("stopping: the scaler drains its agents, then the API stops")
        self.children.stop_all()  # the last started first: the scaler, while the API takes the agents' answers
        self.show_progress()


def print_usage(url: str, model: str) -> None:
    print(
        f"""
hotq is serving {model} at {url}/v1

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  python -c 'import openai; c = openai.OpenAI(base_url="{url}/v1", api_key="none"); \\
r = c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}]); \\
print(r.choices[0].message.content)'

Ctrl-C stops the stack.
""",
        flush=True,
    )


def run_up(config_path: str | None, host: str, port: int, data_dir: Path) -> int:
    path = resolve_config(config_path, data_dir)
    config = load_config(path)
    if not config.models:
        _say(f"{path} configures no models")
        return 1
    stack = Stack(path, config, host, port)
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):  # the children, in sessions of their own, get neither
        signal.signal(signum, on_signal)
    started = time.monotonic()
    stack.start()
    try:
        announced = False
        while True:
            stack.show_progress()
            if problem := stack.exited():
                _say(problem)
                return 1
            if not announced and stack.serving():
                stack.show_progress()  # what the agent logged on its way to hot comes before the banner
                _say(f"ready after {time.monotonic() - started:.0f} s")
                print_usage(stack.url, next(iter(config.models)))
                announced = True
            time.sleep(READY_POLL_S)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
