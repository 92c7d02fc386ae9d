"""The scaler's decisions, kept (sqlite-utils) for the ops views.

One row per model per tick in which something was decided or changed: the
inputs, the desired agent count, how many agents were launched and where, and
the reason in words. `hotq watch` and the API's /ops page read this table.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

TABLE = "decisions"
COLD_STARTS = "cold_starts"  # cluster -> the scaler's running estimate of launch-to-hot seconds


@dataclass(frozen=True, slots=True)
class Decision:
    model: str
    backlog: int  # ready + unacked requests over the model's lanes
    agents_hot: int
    agents_starting: int  # announced, not hot yet (starting or loading)
    launches_pending: int  # launched, not yet announced
    throughput_rps: float  # measured requests/s per hot agent (0 when unknown)
    desired: int
    launched: int
    clusters: str  # where the launches went, comma-separated
    reason: str
    at: float = 0.0


class DecisionLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite_utils.Database(path)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (watch, /ops) never block the scaler

    def record(self, decision: Decision) -> None:
        row = asdict(decision)
        row["at"] = decision.at or time.time()
        self._db.table(TABLE).insert(row, alter=True)

    def recent(self, since_s: float = 3600.0, model: str | None = None) -> list[dict[str, Any]]:
        if not self._db[TABLE].exists():
            return []
        where, args = "at >= ?", [time.time() - since_s]
        if model is not None:
            where += " and model = ?"
            args.append(model)  # type: ignore[arg-type]
        return list(self._db[TABLE].rows_where(where, args, order_by="at"))

    def measured_throughput(self) -> dict[str, float]:
        """Each model's last measured requests/s per agent, so a restarted scaler sizes its
        first burst from experience rather than a guess."""
        if not self._db[TABLE].exists():
            return {}
        rows = self._db.execute(
            f"select model, throughput_rps from {TABLE} where throughput_rps > 0 and at = "
            f"(select max(at) from {TABLE} as later where later.model = {TABLE}.model and later.throughput_rps > 0)"
        ).fetchall()
        return {model: rps for model, rps in rows}

    def record_cold_start(self, cluster: str, seconds: float) -> None:
        self._db.table(COLD_STARTS).upsert({"cluster": cluster, "seconds": seconds, "at": time.time()}, pk="cluster")

    def cold_starts(self) -> dict[str, float]:
        """Each cluster's cold start as last estimated, so a restarted scaler still knows it."""
        if not self._db[COLD_STARTS].exists():
            return {}
        return {row["cluster"]: row["seconds"] for row in self._db[COLD_STARTS].rows}


def decision_log_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "scaler.db"
