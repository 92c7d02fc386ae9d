"""`hotq keys` and `hotq usage`: API keys and the tokens used, read and written in the job store."""

from __future__ import annotations

import time

import click

from ops.cli_options import config_option, load


@click.group()
def keys() -> None:
    """API keys: clients send them as `Authorization: Bearer KEY` ([auth] modes with "api_key")."""


def _parse_expiry(value: str) -> float:
    """`30d`, `12h`, `90m`, `3600s`, `2w` from now, or an ISO date/time."""
    import re
    from datetime import UTC, datetime

    match = re.fullmatch(r"(\d+)\s*([smhdw])", value.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
        return time.time() + int(match.group(1)) * unit
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a duration (30d, 12h, 90m) nor an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _when(timestamp: float | None) -> str:
    from datetime import UTC, datetime

    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@keys.command("create")
@config_option
@click.option("--user", required=True, help="whom the key identifies (the name model allow_users lists)")
@click.option("--expires", default=None, help="a duration from now (30d, 12h, 90m) or an ISO date; default never")
def keys_create(config_path: str | None, user: str, expires: str | None) -> None:
    """Make a key for USER; the key is printed once, as the last line, and stored only hashed."""
    from broker.jobstore import JobStore

    expires_at = _parse_expiry(expires) if expires else None
    if expires_at is not None and expires_at <= time.time():
        raise click.BadParameter("the expiry is in the past", param_hint="--expires")
    try:
        record, key = JobStore(load(config_path).data_dir).keys.create(user, expires_at)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--user") from None
    click.echo(f"created {record.id} for {user}, expires {_when(expires_at)}; the key is shown only now:")
    click.echo(key)


@keys.command("list")
@config_option
@click.option("--all", "include_revoked", is_flag=True, help="include revoked keys")
def keys_list(config_path: str | None, include_revoked: bool) -> None:
    """List keys (ids and users; the keys themselves are not stored)."""
    from broker.jobstore import JobStore

    keys = JobStore(load(config_path).data_dir).keys.list(include_revoked=include_revoked)
    click.echo(f"{'ID':<32} {'USER':<32} {'CREATED':<21} {'EXPIRES':<21} REVOKED")
    for key in keys:
        click.echo(
            f"{key.id:<32} {key.user:<32} {_when(key.created_at):<21} {_when(key.expires_at):<21}"
            f" {_when(key.revoked_at)}"
        )


@keys.command("revoke")
@config_option
@click.argument("key_or_id")
def keys_revoke(config_path: str | None, key_or_id: str) -> None:
    """Revoke a key, named by its id or by the key itself (the API refuses it within [auth] key_refresh_s)."""
    from broker.jobstore import JobStore

    record = JobStore(load(config_path).data_dir).keys.revoke(key_or_id)
    if record is None:
        raise click.ClickException("no such key")
    click.echo(f"revoked {record.id} ({record.user})")


@click.command()
@config_option
@click.option("--user", default=None, help="only this user")
@click.option("--model", default=None, help="only this model")
@click.option("--since", default=None, help="from this day on: YYYY-MM-DD, or the last N days as Nd (7d)")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON (what GET /v1/usage answers)")
def usage(config_path: str | None, user: str | None, model: str | None, since: str | None, as_json: bool) -> None:
    """Tokens used per day, user, model and lane, as the backends counted them."""
    import json

    from rich.console import Console
    from rich.table import Table

    from broker.jobstore import JobStore, since_day

    try:
        first_day = since_day(since) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    rows = JobStore(load(config_path).data_dir).usage.totals(user, model, first_day)
    if as_json:
        click.echo(json.dumps({"object": "list", "data": rows}, indent=2))
        return
    table = Table(
        "day", "user", "model", "lane", "requests", "cancelled", "prompt tokens", "completion tokens", "total tokens"
    )
    for column in table.columns[4:]:
        column.justify = "right"
    counts = [
        (row["requests"], row["cancelled"], row["prompt_tokens"], row["completion_tokens"], row["total_tokens"])
        for row in rows
    ]
    for row, numbers in zip(rows, counts):
        table.add_row(row["day"], row["user"], row["model"], row["lane"], *(f"{n:,}" for n in numbers))
    if len(rows) > 1:
        table.add_section()
        table.add_row("total", "", "", "", *(f"{sum(column):,}" for column in zip(*counts)))
    Console(width=200).print(table)
