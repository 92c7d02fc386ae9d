"""Globus Compute endpoint configs for hotq, rendered from a hotq cluster table.

`render_endpoint_config` fills ``ops/templates/globus_compute/<scheduler>.yaml``:
a GlobusComputeEngine with one worker per node and a PBS Pro or Slurm provider
whose ``max_blocks`` is the cluster's ``max_nodes``, and whose ``worker_init``
activates the hotq environment on the node. The result is meant to be installed
as the endpoint's ``user_config_template.yaml.j2``. It has no template variables,
so every hotq task gets the same config: one user endpoint, one pool of nodes.

As a command (options as below, with dashes)::

    python -m ops.endpoint_templates --config hotq.toml --cluster NAME --scheduler pbs \\
        --hotq-env /shared/hotq/venv --account PROJ --queue gpu --cpus-per-node 64
"""

from __future__ import annotations

import argparse
import json
import shlex
import string
import sys
from importlib import resources
from pathlib import PurePosixPath
from typing import Literal

from broker.config import ClusterConfig, load_config

# The endpoint renders its config template with Jinja; these would start Jinja syntax.
JINJA_MARKERS = ("{{", "{%", "{#")


def render_endpoint_config(
    scheduler: Literal["pbs", "slurm"],
    cluster: ClusterConfig,
    *,
    hotq_env: str,
    walltime: str = "01:00:00",
    account: str | None = None,
    queue: str | None = None,
    partition: str | None = None,
    cpus_per_node: int | None = None,
    select_options: str = "",
    scheduler_options: str = "",
    worker_init: str = "",
    max_idletime_s: float = 60.0,
) -> str:
    """The endpoint config (YAML text) for `cluster` on a PBS Pro or Slurm site.

    - `hotq_env`: absolute path of the virtual environment on the nodes with
      ``hotq[sites]`` (and the backend, e.g. vLLM); `worker_init` runs first
      (e.g. ``module load cuda``).
    - `walltime`: each node's job length; set the models' ``walltime_s`` to match.
    - `scheduler_options`: extra ``#PBS``/``#SBATCH`` lines.
    - PBS only: `queue`, `cpus_per_node` (required: the job asks for that many
      cores, so give the node's), `select_options` (e.g. ``ngpus=4``).
    - Slurm only: `partition` (jobs get whole nodes).
    - `max_idletime_s`: how long a node whose agent left is kept for the next one.
    """
    if scheduler == "pbs":
        if partition is not None:
            raise ValueError("partition is a Slurm option; PBS takes queue")
        if cpus_per_node is None:
            raise ValueError("cpus_per_node is required for PBS: jobs ask for that many cores; give the node's")
        site: dict[str, object] = {"queue": queue, "cpus_per_node": cpus_per_node, "select_options": select_options}
    elif scheduler == "slurm":
        pbs_only = {"queue": queue, "cpus_per_node": cpus_per_node, "select_options": select_options or None}
        if given := [name for name, value in pbs_only.items() if value is not None]:
            raise ValueError(f"{', '.join(given)}: PBS only; Slurm takes partition")
        site = {"partition": partition}
    else:
        raise ValueError(f"scheduler must be 'pbs' or 'slurm', not {scheduler!r}")
    activate = "source " + shlex.quote(str(PurePosixPath(hotq_env) / "bin" / "activate"))
    values = {
        **site,
        "account": account,
        "scheduler_options": scheduler_options,
        "walltime": walltime,
        "max_idletime": max_idletime_s,
        "max_blocks": cluster.max_nodes,
        "worker_init": "\n".join(part for part in (worker_init.strip("\n"), activate) if part),
    }
    template = resources.files("ops").joinpath("templates", "globus_compute", f"{scheduler}.yaml").read_text()
    # JSON scalars are YAML flow scalars: quoting and escaping come for free.
    text = string.Template(template).substitute({k: json.dumps(v, ensure_ascii=False) for k, v in values.items()})
    for marker in JINJA_MARKERS:
        if marker in text:
            raise ValueError(f"{marker!r} in an option: the endpoint reads its config template as Jinja")
    return text


def main(argv: list[str] | None = None) -> None:
    # Unset options are left out, so render_endpoint_config's defaults apply.
    parser = argparse.ArgumentParser(
        prog="python -m ops.endpoint_templates",
        description="Print a Globus Compute endpoint config for a hotq cluster.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", default=None, help="hotq's config (default: $HOTQ_CONFIG, then ./hotq.toml)")
    parser.add_argument("--cluster", required=True, help='a [clusters."NAME"] of the config')
    parser.add_argument("--scheduler", required=True, choices=["pbs", "slurm"])
    parser.add_argument("--hotq-env", required=True, help="the environment with hotq[sites] on the nodes")
    parser.add_argument("--walltime", help="HH:MM:SS (default 01:00:00)")
    parser.add_argument("--account")
    parser.add_argument("--queue", help="PBS")
    parser.add_argument("--partition", help="Slurm")
    parser.add_argument("--cpus-per-node", type=int, help="PBS, required")
    parser.add_argument("--select-options", help="PBS, e.g. ngpus=4")
    parser.add_argument("--scheduler-options", help="extra #PBS or #SBATCH lines")
    parser.add_argument("--worker-init", help="shell commands before the environment is activated")
    parser.add_argument("--max-idletime-s", type=float, help="default 60")
    options = vars(parser.parse_args(argv))
    config = load_config(options.pop("config"))
    name = options.pop("cluster")
    if name not in config.clusters:
        parser.error(f'the config has no [clusters."{name}"]')
    try:
        text = render_endpoint_config(options.pop("scheduler"), config.clusters[name], **options)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
