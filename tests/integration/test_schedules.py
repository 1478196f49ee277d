"""Per-segment schedules: `syncd run` runs each segment on its own schedule; `status`
shows each one's next run and `/readyz` judges staleness by each one's interval."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from syncd.sandbox import WalkMeSandbox
from syncd.state import StateStore
from tests.support.harness import cli_env, status_rows
from tests.support.ids import file_mapping, make_ids
from tests.support.logs import named, parse_log_lines, run_endings
from tests.support.net import fetch_text, free_port
from tests.support.processes import DaemonProcess, run_cli
from tests.support.stores import with_store
from tests.support.waiting import wait_until

StartDaemon = Callable[[dict[str, str]], DaemonProcess]
NIGHTLY = "0 3 * * *"


def missing_file(folder: Path, name: str, **extra: Any) -> dict[str, Any]:
    """A mapping whose source file does not exist: each of its runs fails."""
    path = folder / f"{name.replace(' ', '_')}.missing"
    return {"name": name, "source": {"type": "file", "path": str(path)}, **extra}


def readyz(port: int) -> dict[str, Any]:
    status, body = fetch_text(f"http://127.0.0.1:{port}/readyz")
    assert status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def test_each_segment_runs_on_its_own_schedule(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    mappings = [
        file_mapping(tmp_path, "Fast", make_ids(10, "f"), schedule="1s"),
        missing_file(tmp_path, "Fast broken", schedule="1s"),
        file_mapping(tmp_path, "Nightly", make_ids(10, "n"), schedule=NIGHTLY),
        file_mapping(tmp_path, "Hourly", make_ids(10, "h")),  # SYNCD_SCHEDULE's
        missing_file(tmp_path, "Hourly broken"),
    ]
    port = free_port()
    env = cli_env(live_sandbox.url, tmp_path, mappings, admin_port=port, schedule="1h")
    started = datetime.now(UTC)
    daemon = daemons(env)
    daemon.wait_for("segment.synced", count=4, timeout=30, segment="Fast")

    # Stale after 3 of its own intervals: the segment failing every second is listed
    # after 3 s; the one failing hourly is not for 3 hours.
    def stale() -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = readyz(port)["stale"]
        return listed

    wait_until(lambda: stale() != [], 15, "a stale segment in /readyz")
    assert stale() == [{"segment": "Fast broken", "last_success_at": None, "stale_after_s": 3.0}]
    assert readyz(port)["stale_after_s"] == 3 * 3600.0  # SYNCD_SCHEDULE's segments'

    rows = status_rows(env)
    now = datetime.now(UTC)
    assert {name: row["schedule"] for name, row in rows.items()} == {
        "Fast": "1s",
        "Fast broken": "1s",
        "Nightly": NIGHTLY,
        "Hourly": "1h",
        "Hourly broken": "1h",
    }
    next_runs = {name: datetime.fromisoformat(row["next_run"]) for name, row in rows.items()}
    tomorrow = now.replace(hour=3, minute=0, second=0, microsecond=0)
    if tomorrow <= now:
        tomorrow += timedelta(days=1)
    assert next_runs["Nightly"] == tomorrow
    hour_after_start = started + timedelta(hours=1)
    for name in ("Hourly", "Hourly broken"):
        assert abs(next_runs[name] - hour_after_start) < timedelta(seconds=10), next_runs
    for name in ("Fast", "Fast broken"):
        assert now - timedelta(seconds=3) < next_runs[name] < now + timedelta(seconds=3), next_runs

    assert daemon.terminate(30) == 0
    events = parse_log_lines(daemon.output())
    endings = list(run_endings(events).values())
    runs = {name: sum(1 for e in endings if e["segment"] == name) for name in rows}
    assert runs["Fast"] >= 4
    assert runs["Fast broken"] >= 4
    # The others ran once, at start: their next run is an hour or a night away.
    assert (runs["Nightly"], runs["Hourly"], runs["Hourly broken"]) == (1, 1, 1)
    cycles = named(events, "cycle.finished")
    by_schedule = {e["schedule"]: e for e in cycles}
    assert (by_schedule["1h"]["segments"], by_schedule["1h"]["failed"]) == (2, 1)
    assert (by_schedule[NIGHTLY]["segments"], by_schedule[NIGHTLY]["synced"]) == (1, 1)
    assert all(e["segments"] == 2 for e in cycles if e["schedule"] == "1s")
    assert [e["schedule"] for e in cycles].count("1s") >= 4
    [started_line] = named(events, "daemon.started")
    assert started_line["schedules"] == ["1h", "1s", NIGHTLY]
    # No daemon: nothing will run them, so status shows no next run.
    assert all(row["next_run"] is None for row in status_rows(env).values())


def test_status_shows_the_earliest_next_run_of_the_live_replicas(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """Replicas run on their own clocks: a segment runs next when the first does."""
    env = cli_env(live_sandbox.url, tmp_path, [file_mapping(tmp_path, "Shared", ["a@x.io"])])
    soon, later = 2_000_000_000.0, 2_000_000_600.0

    async def heartbeats(store: StateStore) -> None:
        await store.heartbeat("host-a:1:aaa", ["Shared"], 60, {"Shared": later})
        await store.heartbeat("host-b:2:bbb", ["Shared"], 60, {"Shared": soon})

    asyncio.run(with_store(env["SYNCD_STATE_URL"], heartbeats))
    expected = datetime.fromtimestamp(soon, UTC).isoformat(timespec="seconds")
    assert status_rows(env)["Shared"]["next_run"] == expected
    table = run_cli("status", env=env)
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if line.startswith("Shared")]
    assert expected in row.split()
