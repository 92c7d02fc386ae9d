"""Loading ops/rabbitmq/definitions.json into the test broker, isolated in a throwaway vhost.

The file's vhost and users are renamed (``hotq`` -> ``hotq-test-<tag>``, ``hotq-api`` ->
``hotq-test-<tag>-api``, ...) and given random passwords, so a test run never touches a
deployment's users or the default vhost ``/`` the other tests use. Loaded with
``rabbitmqctl import_definitions`` when the broker's rabbitmqctl has it, else with
add_vhost / add_user / set_permissions / set_policy from the same file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFINITIONS = Path(__file__).resolve().parent.parent / "ops" / "rabbitmq" / "definitions.json"
ROLES = ("api", "agent", "scaler")


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args[:2])} failed: {done.stdout}{done.stderr}")
    return done.stdout


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names, as rabbitmqctl spells it ("/" when the URL's path is empty)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"


def close_connections(amqp_url: str, reason: str) -> None:
    """Force-close every connection to the vhost of `amqp_url`, and no other: the broker is shared."""
    rabbitmqctl("close_all_connections", "--vhost", vhost_of(amqp_url), reason)


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass
class RoleBroker:
    """The definitions loaded under a test vhost; `url(role)` connects as that role's user."""

    vhost: str
    users: dict[str, str]  # role -> user name
    passwords: dict[str, str] = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 5672

    def url(self, role: str) -> str:
        user = self.users[role]
        vhost = urllib.parse.quote(self.vhost, safe="")
        return f"amqp://{user}:{self.passwords[role]}@{self.host}:{self.port}/{vhost}"


def load_definitions(tag: str) -> tuple[RoleBroker, dict[str, object]]:
    """Rename the file's vhost and users for this run, give them random passwords, load them."""
    definitions = json.loads(DEFINITIONS.read_text())
    (original_vhost,) = (v["name"] for v in definitions["vhosts"])
    vhost = f"hotq-test-{tag}"
    renamed: dict[str, str] = {}  # original user name -> test user name
    users: dict[str, str] = {}
    passwords: dict[str, str] = {}
    for user in definitions["users"]:
        role = user["name"].removeprefix("hotq-")
        assert role in ROLES, f"unexpected user {user['name']} in {DEFINITIONS}"
        renamed[user["name"]] = users[role] = f"hotq-test-{tag}-{role}"
        passwords[role] = secrets.token_urlsafe(18)
        user["name"] = users[role]
        user["password_hash"] = password_hash(passwords[role])
    definitions["vhosts"] = [{"name": vhost}]
    for key in ("permissions", "topic_permissions", "policies", "exchanges", "queues", "bindings"):
        for item in definitions.get(key, []):
            item["vhost"] = vhost
            if "user" in item:
                item["user"] = renamed[item["user"]]
    assert original_vhost != vhost
    broker = RoleBroker(vhost, users, passwords)
    if "import_definitions" in rabbitmqctl("help"):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
            json.dump(definitions, file)
        os.chmod(file.name, 0o644)  # the broker's own user reads it
        try:
            rabbitmqctl("import_definitions", file.name)
        finally:
            os.unlink(file.name)
    else:
        _load_with_commands(definitions, broker)
    return broker, definitions


def _load_with_commands(definitions: dict[str, Any], broker: RoleBroker) -> None:  # parsed JSON
    rabbitmqctl("add_vhost", broker.vhost)
    for role, user in broker.users.items():
        rabbitmqctl("add_user", user, broker.passwords[role])
    for item in definitions["permissions"]:
        rabbitmqctl("set_permissions", "-p", broker.vhost, item["user"], item["configure"], item["write"], item["read"])
    for item in definitions.get("policies", []):
        rabbitmqctl(
            "set_policy", "-p", broker.vhost, "--apply-to", item["apply-to"], "--priority", str(item["priority"]),
            item["name"], item["pattern"], json.dumps(item["definition"]),
        )  # fmt: skip


def unload(broker: RoleBroker) -> None:
    """Delete the test vhost (its queues, exchanges, permissions, policies) and the users, in parallel."""
    commands = [["delete_vhost", broker.vhost], *(["delete_user", user] for user in broker.users.values())]
    processes = [
        subprocess.Popen(["rabbitmqctl", *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for command in commands
    ]
    for process in processes:
        process.wait(timeout=60)


def have_rabbitmqctl() -> bool:
    return shutil.which("rabbitmqctl") is not None
