"""`hotq`: the one command, with a subcommand per role."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import signal
import sys

import click
import msgspec
import uvloop

from broker.config import backend_base_url
from broker.errors import ConfigError
from broker.logs import configure_logging
from ops.cli_accounts import keys, usage
from ops.cli_options import config_option, load


@click.group()
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def cli(log_level: str) -> None:
    """hotq: a queue-based LLM inference broker for HPC centres."""
    configure_logging(log_level)


@cli.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=1),
    help="API processes sharing the port and the job store (default: [api] workers, else 1)",
)
@click.option("--fd", default=None, type=int, hidden=True, help="serve this inherited listening socket")
@click.pass_context
def serve(
    ctx: click.Context, config_path: str | None, host: str, port: int, workers: int | None, fd: int | None
) -> None:
    """Run the OpenAI-compatible HTTP API."""
    import socket

    import uvicorn

    from api.app import create_app
    from api.auth import check_bind

    config = load(config_path)
    workers = workers or config.api.workers
    try:
        warning = check_bind(config, host)
        if workers > 1 and fd is None:  # the supervisor: it only binds the port and runs the children
            app = None
        else:
            app = create_app(config, shared=fd is not None)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None
    if warning and fd is None:
        click.secho(warning, fg="red", bold=True, err=True)
    if app is None:
        from pathlib import Path

        from ops.api_workers import serve_workers

        log_level = ctx.parent.params["log_level"] if ctx.parent is not None else "info"
        child_args = ["--log-level", log_level, "serve", "--host", host, "--workers", "1"]
        if config_path is not None:
            child_args += ["--config", config_path]
        serve_workers(child_args, host, port, workers, Path(config.data_dir), config.api.drain_grace_s)
        return
    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # hotq logs each request itself, with its request id
        log_level="warning",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=config.api.drain_grace_s,
    )
    server = uvicorn.Server(settings)
    if fd is not None:
        from ops.api_workers import leave_with_supervisor

        leave_with_supervisor()
    server.run(sockets=None if fd is None else [socket.socket(fileno=fd)])
    if not server.started:
        sys.exit(3)  # as uvicorn.run: it could not start (the port taken, the app's start-up failed)


@cli.command()
@config_option
@click.option("--model", required=True, help="the configured model whose queue to consume")
@click.option("--backend-url", default=None, help="override the model's backend_url")
@click.option("--grace", "grace_s", default=30.0, show_default=True, help="seconds in-flight requests get on SIGTERM")
def worker(config_path: str | None, model: str, backend_url: str | None, grace_s: float) -> None:
    """Consume a model's queue and serve it from a running OpenAI-compatible backend."""
    from consumers.service import run_worker

    config = load(config_path)
    try:
        model_config = config.model(model)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None
    url = backend_url or model_config.backend_url
    if url is None:
        raise click.ClickException(f'models."{model}" has no backend_url; pass --backend-url or set it in the config')
    try:
        url = backend_base_url(url, "--backend-url")
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None
    uvloop.run(run_worker(config, model, url, grace_s))


@cli.command()
@config_option
@click.option("--model", required=True, help="the configured model to serve on this node")
@click.option("--cluster", default="local", show_default=True, help="the cluster name the agent announces")
@click.option("--agent-id", default=None, help="the id to announce (a launcher sets it)")
@click.option("--summary-file", default=None, help="write the exit summary here as JSON")
def agent(config_path: str | None, model: str, cluster: str, agent_id: str | None, summary_file: str | None) -> None:
    """Start the model's backend here and serve its queues while work keeps coming."""
    from hpc_agents.agent import run_agent

    config = load(config_path)
    try:
        config.model(model)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None
    params = {"config": msgspec.to_builtins(config), "model": model, "cluster": cluster, "agent_id": agent_id}
    summary = run_agent(params)
    if summary_file:
        with open(summary_file, "w") as out:
            json.dump(summary, out)
    sys.exit(1 if summary["exit_reason"] == "backend_failed" else 0)


@cli.command()
@config_option
@click.option("--metrics-port", default=None, type=int, help="serve Prometheus /metrics on this port")
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="the address /metrics listens on (it names every model: widen it only behind a firewall)",
)
def scale(config_path: str | None, metrics_port: int | None, metrics_host: str) -> None:
    """Keep each model's agent count matched to its queue, launching agents on its clusters."""
    from prometheus_client import CollectorRegistry, start_http_server

    from hpc_agents.launchers import build_launchers
    from hpc_agents.scaler import run_scaler
    from ops.metrics import ScalerMetrics

    config = load(config_path)
    metrics = ScalerMetrics(CollectorRegistry())
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_scaler(config, build_launchers(config), stop, metrics)

    uvloop.run(main())


@cli.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", default=".hotq", show_default=True, help="where a generated config and logs go")
def up(config_path: str | None, host: str, port: int, data_dir: str) -> None:
    """Run the whole stack here: the API and an agent per model (the embedded model by default)."""
    from pathlib import Path

    from ops.up import run_up

    try:
        sys.exit(run_up(config_path, host, port, Path(data_dir)))
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None


@cli.command()
@config_option
@click.option("--interval", "interval_s", default=1.0, show_default=True, type=float, help="seconds between frames")
@click.option("--once", is_flag=True, help="print one frame and exit (for scripts)")
def watch(config_path: str | None, interval_s: float, once: bool) -> None:
    """Show queues, agents and the scaler's decisions, live."""
    from broker.errors import BrokerUnavailable
    from ops.watch import run_watch

    config = load(config_path)
    try:
        uvloop.run(run_watch(config, interval_s, once))
    except BrokerUnavailable as exc:
        raise click.ClickException(exc.message) from None
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view ends


@cli.command()
@config_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--model", required=True, help="the configured model to run every line on")
@click.option("--out", "out_path", default=None, help="write the results here (OpenAI batch output format)")
@click.option("--detach", is_flag=True, help="publish, print the job id and exit; collect later with `hotq jobs`")
@click.option("--job-id", default=None, help="resume this job (or name a new one)")
@click.option("--user", default=None, help="whose usage the job counts as [default: your login name]")
def submit(
    config_path: str | None,
    file: str,
    model: str,
    out_path: str | None,
    detach: bool,
    job_id: str | None,
    user: str | None,
) -> None:
    """Publish a JSONL file of requests (FILE "-": stdin) straight onto the model's batch lane and
    collect the results."""
    from pathlib import Path

    from broker.jobstore import JobStore
    from broker.openai_objects import batch_object
    from ops.submit import SubmitError, create_job, run_job, write_results

    config = load(config_path)
    if not detach and out_path is None:
        raise click.UsageError("--out is required unless --detach")
    try:
        config.model(model)
        store = JobStore(config.data_dir)
        stored = store.batches.get(job_id) if job_id else None
        batch = batch_object(stored) if stored is not None else None
        if batch is None:
            batch = create_job(config, file, model, job_id, user or _login_name())
            click.echo(f"job {batch['id']}: {batch['request_counts']['total']} requests for {model}", err=True)
        else:
            click.echo(f"resuming job {batch['id']} ({batch['status']})", err=True)
        batch = uvloop.run(run_job(config, store, batch["id"], collect=not detach, show_progress=True))
    except (ConfigError, SubmitError) as exc:
        raise click.ClickException(str(exc)) from None
    if detach:
        click.echo(batch["id"])
        return
    written = write_results(store, batch["id"], Path(out_path))  # type: ignore[arg-type]
    counts = batch["request_counts"]
    click.echo(
        f"job {batch['id']} {batch['status']}: {counts['completed']} completed, {counts['failed']} failed;"
        f" {written} lines in {out_path}",
        err=True,
    )


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        raise click.UsageError("cannot tell who you are here; name the user with --user") from None


@cli.group()
def jobs() -> None:
    """Bulk jobs started by `hotq submit` (and batches made through the API)."""


@jobs.command("status")
@config_option
@click.argument("job_id")
def jobs_status(config_path: str | None, job_id: str) -> None:
    """Print the job as an OpenAI batch object."""
    from broker.jobstore import JobStore
    from broker.openai_objects import batch_object

    batch = JobStore(load(config_path).data_dir).batches.get(job_id)
    if batch is None:
        raise click.ClickException(f"no job {job_id}")
    click.echo(json.dumps(batch_object(batch), indent=2))


@jobs.command("fetch")
@config_option
@click.argument("job_id")
@click.option("--out", "out_path", required=True, help="write the results here (OpenAI batch output format)")
def jobs_fetch(config_path: str | None, job_id: str, out_path: str) -> None:
    """Collect a job's results until it is finished, then write them."""
    from pathlib import Path

    from broker.jobstore import TERMINAL_STATUSES, JobStore
    from ops.submit import run_job, write_results

    config = load(config_path)
    store = JobStore(config.data_dir)
    batch = store.batches.get(job_id)
    if batch is None:
        raise click.ClickException(f"no job {job_id}")
    status = batch.status
    if status not in TERMINAL_STATUSES:
        status = uvloop.run(run_job(config, store, job_id, collect=True, show_progress=True))["status"]
    written = write_results(store, job_id, Path(out_path))
    click.echo(f"job {job_id} {status}: {written} lines in {out_path}", err=True)


@jobs.command("cancel")
@config_option
@click.argument("job_id")
def jobs_cancel(config_path: str | None, job_id: str) -> None:
    """Stop dispatching a job; it ends `cancelled` with the results it has."""
    from broker.jobstore import JobStore
    from ops.submit import SubmitError, cancel_job

    config = load(config_path)
    try:
        batch = cancel_job(config, JobStore(config.data_dir), job_id)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"job {job_id} {batch['status']}")


cli.add_command(keys)
cli.add_command(usage)


cli.add_command(keys)
cli.add_command(usage)


def main() -> None:
    # SIGUSR1 writes every thread's stack to stderr (the process's log): where a process that will not
    # stop is stuck, for an operator, and for `ops.processes.Child.stop` before it kills one.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    cli(prog_name="hotq")


if __name__ == "__main__":
    main()
