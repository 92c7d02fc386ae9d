"""Globus Compute endpoint configs rendered from a hotq cluster table (ops/endpoint_templates.py).

The structure is checked by hand; then the endpoint package itself, in the separate
venv `make test` builds for it, renders the result as its config template and loads it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import ClusterConfig
from ops.endpoint_templates import main, render_endpoint_config

SITES_PYTHON = Path(__file__).resolve().parent.parent / ".venv-sites" / "bin" / "python"
CLUSTER = ClusterConfig(launcher="globus-compute", max_nodes=6, endpoint_id="00000000-0000-0000-0000-000000000001")
# Quotes, a colon, a hash, a dollar and non-ASCII: the values must come through unchanged.
ACCOUNT = 'proj "α": #1 $X'
WORKER_INIT = "module load cuda/12\nexport HF_HOME=$HOME/hf"
HOTQ_ENV = "/shared/hotq env"
ACTIVATE = "source '/shared/hotq env/bin/activate'"

SITES: dict[str, dict[str, Any]] = {
    "pbs": {
        "queue": "gpu",
        "cpus_per_node": 64,
        "select_options": "ngpus=4",
        "scheduler_options": "#PBS -l filesystems=home",
    },
    "slurm": {"partition": "gpu", "scheduler_options": "#SBATCH --gpus-per-node=4"},
}


def _render(scheduler: str, **extra: Any) -> str:
    site = {**SITES[scheduler], **extra}
    return render_endpoint_config(
        scheduler,  # type: ignore[arg-type]
        CLUSTER,
        hotq_env=HOTQ_ENV,
        account=ACCOUNT,
        walltime="04:00:00",
        worker_init=WORKER_INIT,
        max_idletime_s=90,
        **site,
    )


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_rendered_config_has_the_structure_hotq_needs(scheduler: str) -> None:
    config = yaml.safe_load(_render(scheduler))
    assert set(config) == {"engine"}
    engine = config["engine"]
    assert engine["type"] == "GlobusComputeEngine"
    assert engine["max_workers_per_node"] == 1  # one agent per node
    assert engine["job_status_kwargs"] == {"strategy": "htex_auto_scale", "max_idletime": 90}
    provider = engine["provider"]
    assert provider["type"] == {"pbs": "PBSProProvider", "slurm": "SlurmProvider"}[scheduler]
    assert provider["nodes_per_block"] == 1
    assert provider["init_blocks"] == 0 and provider["min_blocks"] == 0
    assert provider["max_blocks"] == CLUSTER.max_nodes
    assert provider["walltime"] == "04:00:00"
    assert provider["account"] == ACCOUNT
    assert provider["launcher"] == {"type": "SimpleLauncher"}
    assert provider["worker_init"] == f"{WORKER_INIT}\n{ACTIVATE}"  # site setup first, then hotq's env
    for key, value in SITES[scheduler].items():
        assert provider[key] == value
    if scheduler == "slurm":
        assert provider["exclusive"] is True


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_defaults_and_unset_options(scheduler: str) -> None:
    site = {"cpus_per_node": 8} if scheduler == "pbs" else {}
    config = yaml.safe_load(render_endpoint_config(scheduler, CLUSTER, hotq_env="/opt/hotq", **site))  # type: ignore[arg-type]
    provider = config["engine"]["provider"]
    assert provider["account"] is None  # null: the provider's own default
    assert provider["walltime"] == "01:00:00"
    assert provider["worker_init"] == "source /opt/hotq/bin/activate"
    assert config["engine"]["job_status_kwargs"]["max_idletime"] == 60


@pytest.mark.parametrize(
    ("scheduler", "options", "message"),
    [
        ("pbs", {"cpus_per_node": 8, "partition": "gpu"}, "partition is a Slurm option"),
        ("pbs", {}, "cpus_per_node is required"),
        ("slurm", {"queue": "gpu", "select_options": "ngpus=4"}, "queue, select_options: PBS only"),
        ("lsf", {}, "scheduler must be"),
        ("slurm", {"worker_init": "echo ${#PATH}"}, "the endpoint reads its config template as Jinja"),
    ],
)
def test_wrong_options_are_refused(scheduler: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_endpoint_config(scheduler, CLUSTER, hotq_env="/opt/hotq", **options)  # type: ignore[arg-type]


def test_command_prints_the_config_of_a_configured_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "hotq.toml"
    config.write_text('[clusters."polaris"]\nlauncher = "globus-compute"\nendpoint_id = "e"\nmax_nodes = 3\n')
    main(["--config", str(config), "--cluster", "polaris", "--scheduler", "slurm", "--hotq-env", "/opt/hotq"])
    provider = yaml.safe_load(capsys.readouterr().out)["engine"]["provider"]
    assert provider["max_blocks"] == 3 and provider["walltime"] == "01:00:00"
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--cluster", "nowhere", "--scheduler", "pbs", "--hotq-env", "/opt/hotq"])
    assert 'no [clusters."nowhere"]' in capsys.readouterr().err


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_the_endpoint_renders_and_loads_it_as_its_config_template(scheduler: str, tmp_path: Path) -> None:
    """The endpoint package itself (in the sites venv `make test` builds) loads what we render."""
    if not SITES_PYTHON.exists():
        pytest.skip(f"{SITES_PYTHON} is missing: `make test` creates it with the endpoint package")
    template = tmp_path / "user_config_template.yaml"
    template.write_text(_render(scheduler))
    checked = subprocess.run(
        [str(SITES_PYTHON), str(Path(__file__).with_name("endpoint_schema_check.py")), str(template)],
        capture_output=True,
        text=True,
        check=True,
    )
    built = json.loads(checked.stdout)
    assert built["unchanged_by_jinja"] and built["user_endpoint_config"] and built["globus_compute_engine"]
    assert built["max_workers_per_node"] == 1 and built["simple_launcher"]
    assert built["provider"] == {"pbs": "PBSProProvider", "slurm": "SlurmProvider"}[scheduler]
    assert built["blocks"] == [CLUSTER.max_nodes, 0, 0]
    assert built["nodes_per_block"] == 1 and built["walltime"] == "04:00:00"
    assert built["account"] == ACCOUNT
    assert built["worker_init"].rstrip("\n") == f"{WORKER_INIT}\n{ACTIVATE}"
