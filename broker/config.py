"""hotq's configuration: one TOML file, validated once at start-up.

Lookup order for the file: ``--config FILE``, then ``$HOTQ_CONFIG``, then
``./hotq.toml``. ``$HOTQ_AMQP_URL`` overrides ``amqp_url`` (comma-separated: the nodes of a
cluster). Errors name the key.
"""

from __future__ import annotations

import json
import os
import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from broker.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("hotq.toml")
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
# RabbitMQ's own default. A crashed node closes its sockets, so a failover does not wait for
# heartbeats; they only find a node that hangs silently (after two or three missed). Shorter ones (10 s) cost
# connections on a loaded 2-core machine whose event loops were busy past two of them.
DEFAULT_AMQP_HEARTBEAT_S = 60
# Replicas of each new quorum queue; RabbitMQ places as many as there are nodes, up to this.
DEFAULT_QUORUM_REPLICAS = 3

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[limits]`` (or a model's ``limits = {...}``): per user and model, for interactive requests only.

    Unset means unlimited. Kept in memory by each API process (several processes: each enforces its own).
    """

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None  # prompt + completion tokens, charged from the answer's usage
    max_concurrent_per_user: PositiveInt | None = None  # requests of one user in flight on one model (fair share)

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrent_per_user)


SpillMs = Annotated[int, msgspec.Meta(ge=1, le=60_000)]


class SpillAfterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A model's ``spill_after_ms = {interactive = ..., batch = ...}``: how long a request waits in
    its agent's affinity queue before any agent may take it from the shared queue."""

    interactive: SpillMs = 500
    batch: SpillMs = 1000  # an agent that dies leaves its waiting batch lines to others within about a second


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One ``[models."NAME"]`` table."""

    backend_url: str | None = None  # an OpenAI-compatible server that is already running
    # The server the agent starts, with {port}, {model}, {model_path} and {python}
    # placeholders; without it the agent starts vLLM's OpenAI server.
    command: list[str] | None = None
    model_path: str | None = None  # weights folder for vLLM; defaults to the model name
    env: dict[str, str] = {}  # extra environment for the backend process
    min_hot: NonNegativeInt = 0
    max_agents: PositiveInt = 1
    idle_ttl_s: PositiveFloat = 300.0
    max_inflight: PositiveInt = 32
    reserved_interactive: NonNegativeInt = 4  # backend slots batch work may not take
    start_timeout_s: PositiveFloat = 900.0  # backend start until ready
    max_restarts: NonNegativeInt = 3  # backend restarts before the agent gives up
    walltime_s: PositiveFloat | None = None  # the node allocation's length, if bounded
    drain_before_s: PositiveFloat = 120.0  # start draining this long before walltime ends
    drain_grace_s: PositiveFloat = 60.0  # in-flight requests get this long when draining
    clusters: list[str] = []  # where the scaler may start agents, in order of preference
    target_drain_s: PositiveFloat = 60.0  # the scaler sizes agents so the backlog drains within this
    # Who may use the model (any one list admitting the caller suffices); all empty: every authenticated caller.
    allow_users: list[str] = []  # API key users (`hotq keys create --user`) or Globus usernames
    allow_groups: list[str] = []  # Globus group ids (looked up with the caller's token)
    allow_domains: list[str] = []  # identity-provider domains, e.g. "anl.gov" (any identity in the caller's set)
    limits: LimitsConfig | None = None  # replaces the top-level [limits] for this model
    # "prefix": requests sharing a prefix go to the same agent (its KV cache); default when max_agents > 1.
    affinity: Literal["prefix", "off"] | None = None
    spill_after_ms: SpillAfterConfig = SpillAfterConfig()

    @property
    def affinity_on(self) -> bool:
        return self.affinity == "prefix" if self.affinity is not None else self.max_agents > 1

    @property
    def restricted(self) -> bool:
        return bool(self.allow_users or self.allow_groups or self.allow_domains)


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One ``[clusters."NAME"]`` table: where and how agents are started."""

    launcher: Literal["local", "globus-compute"] = "local"
    max_nodes: PositiveInt = 1
    endpoint_id: str | None = None  # Globus Compute endpoint
    user_endpoint_config: dict[str, Any] = {}  # e.g. account, queue, walltime for the endpoint's template


GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"


class GlobusAuthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[auth.globus]``: how Globus Auth access tokens are checked (client id/secret come from the env)."""

    audience: str | None = None  # must be in the token's `aud`; default: the client id
    required_scope: str | None = None  # must be among the token's scopes, if set
    client_id_env: str = "HOTQ_GLOBUS_CLIENT_ID"
    client_secret_env: str = "HOTQ_GLOBUS_CLIENT_SECRET"
    introspect_ttl_s: PositiveFloat = 30.0  # a good token's introspection is reused this long (never past exp)
    failure_ttl_s: PositiveFloat = 5.0  # a rejected token is rejected from memory this long
    groups_ttl_s: PositiveFloat = 300.0  # a user's group memberships are reused this long
    groups_scope: str = GROUPS_SCOPE  # the dependent scope hotq's own scope must list for group policies


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[auth]``: who may call the API."""

    modes: list[Literal["none", "api_key", "globus"]]
    key_refresh_s: PositiveFloat = 2.0  # how soon the API sees keys revoked by `hotq keys revoke`
    admins: list[str] = []  # users who may read everyone's usage (GET /v1/usage), /metrics and /ops/data
    # A bearer token that may read /metrics and /ops/data (a Prometheus scraper), from this variable.
    metrics_token_env: str = "HOTQ_METRICS_TOKEN"
    globus: GlobusAuthConfig = GlobusAuthConfig()

    @property
    def enabled(self) -> bool:
        return "none" not in self.modes


class ApiConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[api]``: how `hotq up` runs the API."""

    workers: PositiveInt = 1  # API processes sharing the port and the job store (`hotq serve --workers`)
    # On SIGTERM, requests in flight get this long to finish; then they are cut (a 500) and the process
    # exits. Unbounded, one request that never ends (a client that stopped reading its stream, a hung
    # backend) would keep the API from ever stopping. Whole seconds, as uvicorn takes it.
    drain_grace_s: PositiveInt = 20


class AmqpTls(msgspec.Struct, frozen=True):
    """The files an ``amqps://`` connection verifies the broker with and presents as its own identity."""

    ca_file: str | None = None  # CA bundle the broker's certificate must chain to (default: the system's)
    cert_file: str | None = None  # client certificate (for RabbitMQ's EXTERNAL / x509 authentication)
    key_file: str | None = None  # its private key (default: inside cert_file)


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    amqp_url: str | list[str] = DEFAULT_AMQP_URL  # a list: the nodes of one cluster, tried in turn
    amqp_heartbeat_s: PositiveInt = DEFAULT_AMQP_HEARTBEAT_S  # a node that hangs silently is left after ~2-3x this
    quorum_replicas: PositiveInt = DEFAULT_QUORUM_REPLICAS  # replication factor of new quorum queues
    # TLS for an amqps:// amqp_url (see ops/rabbitmq/README.md); paths on the machine that connects.
    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None
    # What the scaler hands the agents it launches instead of its own amqp_url: a RabbitMQ
    # user with the agent role (ops/rabbitmq/definitions.json). Default: amqp_url.
    agent_amqp_url: str | list[str] | None = None
    data_dir: str = "./.hotq"
    max_body_bytes: PositiveInt = 10 * 1024 * 1024  # a request body, and each line of a batch file
    max_file_bytes: PositiveInt = 200 * 1024 * 1024  # one upload to /v1/files (OpenAI's limit for batch input)
    user_storage_bytes: PositiveInt | None = None  # what one user's files may take in all; unset: no quota
    max_queue_wait_s: PositiveFloat = 60.0  # how long a request may wait for a consumer
    request_timeout_s: PositiveFloat = 600.0  # the longest a client may wait for an answer
    keepalive_s: PositiveFloat = 5.0  # SSE comment interval while a stream waits
    # The shortest gap between two frames of one stream; 0: each token at once, coalesced only under load.
    stream_flush_ms: NonNegativeInt = 0
    heartbeat_s: PositiveFloat = 5.0  # agent status interval on the events exchange
    # How often one stream may move to another consumer (its consumer lost, or draining) before it ends in an error.
    max_migrations: NonNegativeInt = 2
    ops_sample_s: PositiveFloat = 5.0  # how often the API samples queues and agents for /ops and /metrics
    # How long a batch may run before its unfinished lines expire (OpenAI's "24h" completion window).
    batch_window_s: PositiveFloat = 24 * 3600.0
    models: dict[str, ModelConfig] = {}
    clusters: dict[str, ClusterConfig] = {}
    auth: AuthConfig | None = None  # without it the API serves anyone, and binds loopback only
    limits: LimitsConfig = LimitsConfig()  # per-user limits on interactive requests (default: none)
    api: ApiConfig = ApiConfig()

    @property
    def amqp_urls(self) -> list[str]:
        return _as_list(self.amqp_url)

    @property
    def amqp_tls(self) -> AmqpTls | None:
        if not (self.amqp_ca_file or self.amqp_cert_file or self.amqp_key_file):
            return None
        return AmqpTls(self.amqp_ca_file, self.amqp_cert_file, self.amqp_key_file)

    def for_agents(self) -> Config:
        """The config an agent is launched with: the agent role's RabbitMQ URL, if there is one."""
        if self.agent_amqp_url is None:
            return self
        return msgspec.structs.replace(self, amqp_url=self.agent_amqp_url, agent_amqp_url=None)

    def clusters_of(self, model: str) -> list[str]:
        """The clusters that serve `model`, in order of preference: those it names, else all."""
        return self.models[model].clusters or list(self.clusters)

    def pinned_clusters(self) -> dict[str, list[str]]:
        """Each model's clusters: where requests for it may be pinned (X-Hotq-Cluster)."""
        return {name: self.clusters_of(name) for name in self.models}

    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ConfigError(f"model {name!r} is not configured (configured: {known})") from None


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return config_from_mapping(raw, source)


def config_from_mapping(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate an already parsed config (as a Globus Compute task receives it)."""
    raw = dict(raw)
    raw_models = raw.pop("models", {})
    if not isinstance(raw_models, dict):
        raise ConfigError(f'{source}: `models` must be a table of [models."NAME"] tables')
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.max_body_bytes`"
        raise ConfigError(f"{source}: {exc}") from exc
    models = {}
    for name, table in raw_models.items():
        # Converted one by one so that an error names the model, not `models[...]`.
        where = f'models."{name}"'
        try:
            models[name] = msgspec.convert(table, ModelConfig)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: {where}: {exc}".replace("$.", f"{where}.")) from exc
        if models[name].backend_url is not None:
            base = backend_base_url(models[name].backend_url, f"{source}: {where}.backend_url")  # type: ignore[arg-type]
            models[name] = msgspec.structs.replace(models[name], backend_url=base)
        if models[name].command == []:
            raise ConfigError(f"{source}: {where}.command must not be empty")
        for cluster in models[name].clusters:
            if cluster not in config.clusters:
                raise ConfigError(f'{source}: {where}.clusters names "{cluster}", which has no [clusters."{cluster}"]')
    auth = config.auth
    if auth is not None:
        if not auth.modes:
            raise ConfigError(f'{source}: auth.modes must name "api_key", "globus" or "none"')
        if "none" in auth.modes and len(auth.modes) > 1:
            raise ConfigError(f'{source}: auth.modes: "none" cannot be combined with other modes')
    for name, model in models.items():
        if model.restricted and (auth is None or not auth.enabled):
            raise ConfigError(
                f'{source}: models."{name}" has allow_users/allow_groups/allow_domains,'
                ' which need [auth] modes "api_key" or "globus"'
            )
        if model.allow_groups and (auth is None or "globus" not in auth.modes):
            raise ConfigError(f'{source}: models."{name}".allow_groups needs [auth] mode "globus"')
    for name, cluster_config in config.clusters.items():
        if cluster_config.launcher == "globus-compute" and not cluster_config.endpoint_id:
            raise ConfigError(f'{source}: clusters."{name}".endpoint_id is required by the globus-compute launcher')
    config = msgspec.structs.replace(config, models=models)
    if url := os.environ.get("HOTQ_AMQP_URL"):
        urls = [part.strip() for part in url.split(",") if part.strip()]
        config = msgspec.structs.replace(config, amqp_url=urls[0] if len(urls) == 1 else urls)
    _check_amqp_urls(config, source)
    _check_amqp_tls(config, source)
    return config


def backend_base_url(url: str, where: str = "backend_url") -> str:
    """The server's root URL, to which hotq adds `/v1/chat/completions` and the like.

    Accepts the root (`http://host:8000`) and the OpenAI client's `base_url` habit
    (`http://host:8000/v1`); refuses anything else with the form to write instead.
    """
    parts = urllib.parse.urlsplit(url.strip())
    path = parts.path.rstrip("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{where}: {url!r} is not an http(s) URL like http://host:8000 or http://host:8000/v1")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    for route in ("/chat/completions", "/completions", "/embeddings"):
        if path.endswith(route):
            base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path.removesuffix(route), "", ""))
            raise ConfigError(f"{where}: {url!r} names an endpoint; write the server's base URL, {base!r}")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _as_list(urls: str | list[str]) -> list[str]:
    return [urls] if isinstance(urls, str) else list(urls)


def _check_amqp_urls(config: Config, source: str) -> None:
    for key, urls in (("amqp_url", config.amqp_url), ("agent_amqp_url", config.agent_amqp_url)):
        if urls is None:
            continue
        if not _as_list(urls):
            raise ConfigError(f"{source}: {key} must name at least one broker address")
        for url in _as_list(urls):
            if not url.startswith(("amqp://", "amqps://")):
                raise ConfigError(f"{source}: {key}: {url!r} is not an amqp:// or amqps:// URL")


def _check_amqp_tls(config: Config, source: str) -> None:
    tls = config.amqp_tls
    if tls is None:
        return
    addresses = [("amqp_url", url) for url in _as_list(config.amqp_url)]
    addresses += [("agent_amqp_url", url) for url in _as_list(config.agent_amqp_url or [])]
    for url_key, url in addresses:
        if not url.startswith("amqps://"):
            key = "amqp_ca_file" if tls.ca_file else "amqp_cert_file" if tls.cert_file else "amqp_key_file"
            raise ConfigError(f"{source}: {key} is set, so {url_key} must be an amqps:// URL")
    if tls.key_file and not tls.cert_file:
        raise ConfigError(f"{source}: amqp_key_file needs amqp_cert_file")
    for key, path in (
        ("amqp_ca_file", tls.ca_file),
        ("amqp_cert_file", tls.cert_file),
        ("amqp_key_file", tls.key_file),
    ):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{source}: {key}: {path} is not a readable file")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the config file; a missing default file means an empty config."""
    explicit = path or os.environ.get("HOTQ_CONFIG")
    file = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    try:
        text = file.read_text()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {file} does not exist") from None
        text = ""
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from exc
    if file.suffix == ".json":  # what launchers hand their agents: the validated config, as data
        try:
            return config_from_mapping(json.loads(text), str(file))
        except ValueError as exc:
            raise ConfigError(f"{file}: not valid JSON: {exc}") from exc
    return parse_config(text, str(file))
