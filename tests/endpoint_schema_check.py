"""Load a rendered endpoint config the way the Globus Compute endpoint does; print what it built.

Run with the sites venv's python (`make test` creates `.venv-sites` with the endpoint
package, which cannot share hotq's venv: it pins an older click than vLLM's
dependencies need). Usage: python endpoint_schema_check.py TEMPLATE_FILE
"""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

import yaml
from globus_compute_endpoint.endpoint.config import CoreEndpointConfig, UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml, render_config_user_template
from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity
from globus_compute_endpoint.engines import GlobusComputeEngine
from parsl.launchers import SimpleLauncher


def main(template_path: Path) -> dict[str, object]:
    template = template_path.read_text()
    rendered = render_config_user_template(  # what the endpoint does before starting a user endpoint
        parent_config=CoreEndpointConfig(),
        user_config_template=template,
        user_config_template_path=template_path.with_suffix(".yaml.j2"),
        mapped_identity=MappedPosixIdentity(pwd.getpwuid(os.getuid()), [], None),
        user_opts={},
    )
    config = load_config_yaml(rendered)
    engine = config.engine
    provider = engine.executor.provider
    return {
        "unchanged_by_jinja": yaml.safe_load(rendered) == yaml.safe_load(template),
        "user_endpoint_config": isinstance(config, UserEndpointConfig),
        "globus_compute_engine": isinstance(engine, GlobusComputeEngine),
        "max_workers_per_node": engine.max_workers_per_node,
        "provider": type(provider).__name__,
        "simple_launcher": isinstance(provider.launcher, SimpleLauncher),
        "blocks": [provider.max_blocks, provider.min_blocks, provider.init_blocks],
        "nodes_per_block": provider.nodes_per_block,
        "walltime": provider.walltime,
        "account": provider.account,
        "worker_init": provider.worker_init,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
