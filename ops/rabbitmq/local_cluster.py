#!/usr/bin/env python3
"""A three-node RabbitMQ cluster on this machine, for tests and for trying failover by hand.

Each node has its own name, AMQP and Erlang distribution ports, data and log directories, all under
one directory; the nodes and the rabbitmqctl calls share an Erlang cookie in a private HOME there.
A RabbitMQ that already runs here (``rabbit@localhost`` on 5672) is left alone: other node names,
ports, cookie and data, and /etc/rabbitmq is not read. No plugins (so no management port).

    python3 ops/rabbitmq/local_cluster.py start          # prints the AMQP URLs, comma-separated
    python3 ops/rabbitmq/local_cluster.py status         # nodes, ports, each quorum queue's leader
    python3 ops/rabbitmq/local_cluster.py kill 2         # kill -9 node 2: a crash
    python3 ops/rabbitmq/local_cluster.py start-node 2   # back into the cluster
    python3 ops/rabbitmq/local_cluster.py stop-node 2    # a clean stop
    python3 ops/rabbitmq/local_cluster.py stop           # all nodes; the data stays for the next start

Standard library only, so any Python >= 3.11 runs it without hotq installed; the tests drive the same
`LocalCluster` (tests/rabbitmq_cluster.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

NODE_COUNT = 3
DEFAULT_DIRECTORY = Path(".hotq/rabbitmq-cluster")
DEFAULT_NAME = "hotq"
DEFAULT_FIRST_AMQP_PORT = 5681
DISTRIBUTION_PORT_OFFSET = 20000  # RabbitMQ's own convention: 5672 -> 25672
# Generous: on a busy two-core machine one node boots in ~10-30 s, a slow CI machine may take 3x.
DEFAULT_TIMEOUT_S = 300.0
# Debian's /usr/sbin wrappers switch to the rabbitmq user (and its cookie) when run as root; these don't.
SCRIPT_DIRECTORIES = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/local/lib/rabbitmq/bin"))
LOOPBACK_ONLY = "-kernel inet_dist_use_interface {127,0,0,1}"


class ClusterError(RuntimeError):
    """A node did not start, stop or answer as asked; the message says which and where its log is."""


@dataclass(frozen=True)
class Node:
    number: int  # 1-based, as on the command line
    name: str  # the Erlang node name, e.g. hotq1@localhost
    amqp_port: int
    distribution_port: int

    @property
    def url(self) -> str:
        # guest may log in over loopback only, which is all the node listens on.
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"


@dataclass(frozen=True)
class QueueStatus:
    vhost: str
    name: str
    leader: str
    members: tuple[str, ...]
    online: tuple[str, ...]


class LocalCluster:
    """The nodes laid out in `directory` (its cluster.json); start and stop them, ask about queues."""

    def __init__(self, directory: Path, nodes: Sequence[Node], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.directory = directory.resolve()
        self.nodes = tuple(nodes)
        self.timeout_s = timeout_s
        self._scripts = _rabbitmq_scripts()

    # -- layout -----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        name: str = DEFAULT_NAME,
        first_amqp_port: int = DEFAULT_FIRST_AMQP_PORT,
        first_distribution_port: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> LocalCluster:
        """The cluster in `directory`, laid out there now unless it already is (then it must match)."""
        amqp, distribution = first_amqp_port, first_distribution_port or first_amqp_port + DISTRIBUTION_PORT_OFFSET
        nodes = [
            Node(number, f"{name}{number}@localhost", amqp + number - 1, distribution + number - 1)
            for number in range(1, NODE_COUNT + 1)
        ]
        layout = directory / "cluster.json"
        if layout.exists():
            cluster = cls.open(directory, timeout_s)
            if cluster.nodes != tuple(nodes):
                raise ClusterError(f"{layout} holds another layout (names or ports); use another directory")
            return cluster
        directory.mkdir(parents=True, exist_ok=True)
        cluster = cls(directory, nodes, timeout_s)
        cluster._write_files()
        layout.write_text(json.dumps({"nodes": [asdict(node) for node in nodes]}, indent=2) + "\n")
        return cluster

    @classmethod
    def open(cls, directory: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> LocalCluster:
        layout = directory / "cluster.json"
        if not layout.exists():
            raise ClusterError(f"no cluster in {directory.resolve()} (run `start` first)")
        nodes = [Node(**node) for node in json.loads(layout.read_text())["nodes"]]
        return cls(directory, nodes, timeout_s)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, which: str) -> Node:
        """A node by number (1..3) or by name (with or without @localhost)."""
        for node in self.nodes:
            if which in (str(node.number), node.name, node.name.split("@")[0]):
                return node
        raise ClusterError(f"no node {which!r}: the nodes are {', '.join(n.name for n in self.nodes)}")

    def _node_directory(self, node: Node) -> Path:
        return self.directory / node.name.split("@")[0]

    def _pid_file(self, node: Node) -> Path:
        return self._node_directory(node) / "rabbitmq.pid"

    def _log_file(self, node: Node) -> Path:
        return self._node_directory(node) / "log" / f"{node.name}.log"

    def _write_files(self) -> None:
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
        cookie.chmod(0o400)  # Erlang refuses a cookie that others can read
        # An empty environment file instead of /etc/rabbitmq/rabbitmq-env.conf, which names the system node.
        (self.directory / "rabbitmq-env.conf").write_text("")
        for node in self.nodes:
            node_directory = self._node_directory(node)
            (node_directory / "log").mkdir(parents=True, exist_ok=True)
            (node_directory / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}\n"
                # Logs are for reading after a crash: keep them in the node's directory only.
                "log.console = false\n"
                "log.file.level = info\n"
            )
            # No plugins: the management plugin would want port 15672, which the system node may hold.
            (node_directory / "enabled_plugins").write_text("[].\n")

    # -- environments -----------------------------------------------------------------------------

    def _cli_environment(self) -> dict[str, str]:
        """What rabbitmqctl and rabbitmq-server need to find our cookie and none of the system's settings."""
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_")) and key not in ("NODENAME", "CONFIG_FILE")
        }
        environment.update(
            HOME=str(self.directory / "home"),
            RABBITMQ_CONF_ENV_FILE=str(self.directory / "rabbitmq-env.conf"),
            ERL_FLAGS=LOOPBACK_ONLY,
            ERL_EPMD_ADDRESS="127.0.0.1",  # if our node is the one that starts epmd
        )
        return environment

    def _server_environment(self, node: Node) -> dict[str, str]:
        node_directory = self._node_directory(node)
        environment = self._cli_environment()
        environment.update(
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_DIST_PORT=str(node.distribution_port),
            RABBITMQ_CONFIG_FILE=str(node_directory / "rabbitmq"),  # RabbitMQ adds .conf
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node_directory / "advanced.config"),  # absent: none
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node_directory / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(node_directory / "data"),
            RABBITMQ_LOG_BASE=str(node_directory / "log"),
            RABBITMQ_PID_FILE=str(self._pid_file(node)),
            ERL_CRASH_DUMP=str(node_directory / "erl_crash.dump"),  # not in the caller's working directory
        )
        return environment

    def rabbitmqctl(self, node: Node, *arguments: str, timeout_s: float | None = None) -> str:
        """Run rabbitmqctl against `node` with the cluster's cookie; its output, or ClusterError."""
        # A minute past our own deadline, so that a command given `--timeout` reports its own timeout.
        timeout_s = self.timeout_s + 60 if timeout_s is None else timeout_s
        command = self._rabbitmqctl_command(node, *arguments)
        try:
            done = subprocess.run(
                command, env=self._cli_environment(), capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as error:
            raise ClusterError(f"{' '.join(command[3:])}: no answer in {timeout_s:.0f} s") from error
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(command[3:])} failed: {(done.stdout + done.stderr).strip()}")
        return done.stdout

    def _rabbitmqctl_command(self, node: Node, *arguments: str) -> list[str]:
        return [str(self._scripts / "rabbitmqctl"), "-q", "-n", node.name, *arguments]

    # -- one node ---------------------------------------------------------------------------------

    def pid(self, node: Node) -> int | None:
        """The node's OS process id while its Erlang VM runs (whether or not RabbitMQ is up in it).

        Found by the environment we started it with, not by its pid file: the file appears only some
        way into the boot, and one left by a crash may name a pid the system has given to another
        process. The VM's command line does not name the node.
        """
        ours = f"RABBITMQ_PID_FILE={self._pid_file(node)}\0".encode()
        for process in Path("/proc").iterdir():
            try:
                if process.name.isdigit() and (process / "comm").read_text().strip() == "beam.smp":
                    if ours in (process / "environ").read_bytes():
                        return int(process.name)
            except OSError:  # gone meanwhile, or another user's
                continue
        return None

    def is_running(self, node: Node) -> bool:
        return self.pid(node) is not None

    def start_node(self, node: Node) -> None:
        """Start the node and wait until RabbitMQ runs in it; a node that was in the cluster rejoins it."""
        if not self.is_running(node):
            self._launch(node)
        self._wait_for_boot(node)

    def _launch(self, node: Node) -> None:
        """Start the node's VM in the background (rabbitmq-server -detached returns at once)."""
        for port in (node.amqp_port, node.distribution_port):
            if not port_is_free(port):
                raise ClusterError(f"{node.name} cannot start: port {port} is taken (another cluster? --first-port)")
        self._pid_file(node).unlink(missing_ok=True)  # a crashed node's stale pid would fool `wait`
        _progress(f"starting {node.name} (AMQP 127.0.0.1:{node.amqp_port})")
        with open(self._node_directory(node) / "startup.log", "ab") as output:
            subprocess.run(
                [str(self._scripts / "rabbitmq-server"), "-detached"],
                env=self._server_environment(node),
                stdout=output,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=self.timeout_s,
            )

    def _wait_for_boot(self, node: Node) -> None:
        try:
            # `wait` returns once the pid file's process runs the rabbit application, and fails at once
            # if that process exits; its own timeout is in seconds too.
            self.rabbitmqctl(node, "wait", str(self._pid_file(node)), "--timeout", str(int(self.timeout_s)))
        except ClusterError as error:
            raise ClusterError(f"{error}\n{node.name} did not boot; its log: {self._log_file(node)}") from error

    def stop_node(self, node: Node) -> None:
        """A clean stop: RabbitMQ hands its quorum queue leaderships over and the VM exits."""
        if not self.is_running(node):
            return
        _progress(f"stopping {node.name}")
        self.rabbitmqctl(node, "stop", str(self._pid_file(node)))

    def kill(self, node: Node) -> None:
        """kill -9: the node crashes (its peers and clients see its sockets close at once). Returns once
        the process and its ports are gone."""
        pid = self.pid(node)
        if pid is None:
            raise ClusterError(f"{node.name} is not running")
        _progress(f"killing {node.name} (pid {pid}) with SIGKILL")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + self.timeout_s
        # Until its ports are closed too: while its threads exit, a killed VM still holds its listening
        # socket, which accepts a connection and then resets it.
        while not (_process_gone(pid) and port_is_free(node.amqp_port) and port_is_free(node.distribution_port)):
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} (pid {pid}) still runs {self.timeout_s:.0f} s after SIGKILL")
            time.sleep(0.1)

    # -- the cluster ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every node that is not running, join new nodes to node 1, wait until all are in.

        Idempotent: on a running cluster it only checks, with one rabbitmqctl call (each starts an
        Erlang VM: about a CPU-second). The nodes boot in parallel; joins go one at a time
        (stop_app, join_cluster, start_app), as RabbitMQ asks.
        """
        launched = [node for node in self.nodes if not self.is_running(node)]
        for node in launched:
            self._launch(node)
        # A node already running was booted and joined by the start that launched it;
        # `await_online_nodes` below checks that it is in the cluster still.
        for node in launched:
            self._wait_for_boot(node)
        first = self.nodes[0]
        members = set(self._cluster_status(first)["disk_nodes"]) if launched else set()
        for node in launched:
            if node is first or node.name in members:
                continue
            _progress(f"joining {node.name} to {first.name}")
            self.rabbitmqctl(node, "stop_app")
            self.rabbitmqctl(node, "join_cluster", first.name)
            self.rabbitmqctl(node, "start_app")
        self.rabbitmqctl(first, "await_online_nodes", str(len(self.nodes)), "--timeout", str(int(self.timeout_s)))

    def stop(self) -> None:
        """Stop every running node cleanly (in parallel); their data stays for the next start."""
        stopping = []
        for node in self.nodes:
            if self.is_running(node):
                _progress(f"stopping {node.name}")
                command = self._rabbitmqctl_command(node, "stop", str(self._pid_file(node)))
                stopping.append(subprocess.Popen(command, env=self._cli_environment(), stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + self.timeout_s
        for process in stopping:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                process.kill()
        # A node that could not stop cleanly (still booting, hung) is killed rather than left behind.
        refused = [node for node in self.nodes if self.is_running(node)]
        for node in refused:
            self.kill(node)
        if refused:
            raise ClusterError(f"killed after no clean stop: {', '.join(node.name for node in refused)}")

    def running_nodes(self) -> list[Node]:
        return [node for node in self.nodes if self.is_running(node)]

    def _cluster_status(self, node: Node) -> dict[str, list[str]]:
        status: dict[str, list[str]] = json.loads(self.rabbitmqctl(node, "cluster_status", "--formatter", "json"))
        return status

    def quorum_queues(self, via: Node | None = None) -> list[QueueStatus]:
        """Every quorum queue in every vhost with its leader, as `via` (default: a running node) sees it."""
        running = self.running_nodes()
        if via is None and not running:
            raise ClusterError("no node is running")
        via = via or running[0]
        queues = []
        for vhost in json.loads(self.rabbitmqctl(via, "list_vhosts", "name", "--formatter", "json")):
            listing = self.rabbitmqctl(
                via, "list_queues", "-p", vhost["name"], "name", "type", "leader", "members", "online",
                "--formatter", "json",
            )  # fmt: skip
            for queue in json.loads(listing):
                if queue["type"] == "quorum":
                    members, online = tuple(queue["members"]), tuple(queue["online"])
                    queues.append(QueueStatus(vhost["name"], queue["name"], queue["leader"], members, online))
        return queues

    def leader(self, queue: str, vhost: str = "/", via: Node | None = None) -> Node | None:
        """The node that leads quorum queue `queue`, or None if it has none right now."""
        for status in self.quorum_queues(via):
            if (status.vhost, status.name) == (vhost, queue) and status.leader in status.online:
                return self.node(status.leader)
        return None

    def describe(self) -> str:
        """What `status` prints: nodes and ports, then quorum queues and their leaders, then the URLs."""
        lines = [f"cluster in {self.directory}", f"{'node':<24}{'AMQP':>7}{'dist':>7}  state"]
        for node in self.nodes:
            pid = self.pid(node)
            state = f"running (pid {pid})" if pid else "down"
            lines.append(f"{node.name:<24}{node.amqp_port:>7}{node.distribution_port:>7}  {state}")
        if self.running_nodes():
            queues = self.quorum_queues()
            lines.append(f"quorum queues: {len(queues)}")
            for queue in queues:
                online = f"{len(queue.online)}/{len(queue.members)} members online"
                lines.append(f"  {queue.vhost} {queue.name}: leader {queue.leader or '(none)'}, {online}")
        lines.append("urls: " + ",".join(self.urls))
        return "\n".join(lines)


def _process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie nobody reaps yet


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Erlang listens: TIME_WAIT is no clash
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _rabbitmq_scripts() -> Path:
    """Where rabbitmq-server and rabbitmqctl live: $RABBITMQ_SCRIPTS_DIR, the Debian layout, or PATH."""
    candidates = [Path(os.environ["RABBITMQ_SCRIPTS_DIR"])] if "RABBITMQ_SCRIPTS_DIR" in os.environ else []
    candidates += SCRIPT_DIRECTORIES
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").exists() and (directory / "rabbitmqctl").exists():
            return directory
    raise ClusterError("RabbitMQ is not installed (Debian/Ubuntu: apt-get install rabbitmq-server)")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("HOTQ_CLUSTER_DIR", DEFAULT_DIRECTORY)),
        help="where the nodes' data, logs and cookie live (default: $HOTQ_CLUSTER_DIR or %(default)s)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait per step")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start the cluster (or check it runs); print the AMQP URLs")
    start.add_argument("--name", default=DEFAULT_NAME, help="node names are NAME1@localhost ... (first start)")
    start.add_argument("--first-port", type=int, default=DEFAULT_FIRST_AMQP_PORT, help="node 1's AMQP port")
    start.add_argument("--first-dist-port", type=int, help="node 1's distribution port (default: first-port+20000)")
    commands.add_parser("stop", help="stop every node cleanly; data stays")
    commands.add_parser("status", help="nodes, ports and each quorum queue's leader")
    commands.add_parser("urls", help="print the AMQP URLs, comma-separated")
    for command, help_text in (
        ("kill", "kill -9 one node (a crash)"),
        ("start-node", "start one node; it rejoins the cluster"),
        ("stop-node", "stop one node cleanly"),
    ):
        commands.add_parser(command, help=help_text).add_argument("node", help="1, 2, 3 or a node name")
    arguments = parser.parse_args(argv)

    try:
        if arguments.command == "start":
            cluster = LocalCluster.create(
                arguments.dir, arguments.name, arguments.first_port, arguments.first_dist_port, arguments.timeout
            )
            cluster.start()
            print(",".join(cluster.urls))
            return 0
        cluster = LocalCluster.open(arguments.dir, arguments.timeout)
        if arguments.command == "stop":
            cluster.stop()
        elif arguments.command == "status":
            print(cluster.describe())
        elif arguments.command == "urls":
            print(",".join(cluster.urls))
        elif arguments.command == "kill":
            cluster.kill(cluster.node(arguments.node))
        elif arguments.command == "start-node":
            cluster.start_node(cluster.node(arguments.node))
        elif arguments.command == "stop-node":
            cluster.stop_node(cluster.node(arguments.node))
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
