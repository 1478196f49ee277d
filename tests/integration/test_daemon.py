"""`syncd run` as a daemon: admin endpoints and schedule (SIGTERM: tests/chaos)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from syncd.sandbox import WalkMeSandbox
from tests.support.harness import assert_no_secrets, cli_env
from tests.support.ids import make_ids, write_ids
from tests.support.logs import parse_log_lines, run_endings
from tests.support.net import free_port
from tests.support.processes import DaemonProcess, run_cli
from tests.support.waiting import wait_until

StartDaemon = Callable[[dict[str, str]], DaemonProcess]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1
            json.load(response)
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_daemon_serves_health_and_syncs_on_schedule(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    path = write_ids(tmp_path / "scheduled.txt", make_ids(1_000))
    mapping = {"name": "Scheduled", "source": {"type": "file", "path": str(path)}}
    port = free_port()
    env = cli_env(live_sandbox.url, tmp_path, [mapping], admin_port=port, schedule="2s")
    daemon = daemons(env)

    daemon.wait_for("segment.synced", timeout=30)  # the sync at start
    assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
    assert http_status(f"http://127.0.0.1:{port}/readyz") == 200
    record = live_sandbox.find(name="Scheduled")
    assert record is not None
    guid = record.guid
    assert live_sandbox.members(guid) == set(make_ids(1_000))

    # A change after start is picked up by a scheduled run, no restart needed.
    changed = [*make_ids(900, start=100), "late@example.com"]
    write_ids(path, changed)
    wait_until(
        lambda: live_sandbox.members(guid) == set(changed), 20, "the scheduled sync of the change"
    )
    daemon.wait_for("segment.synced", timeout=20, added=1, removed=100)
    synced_runs = daemon.count("segment.synced")
    daemon.wait_for("segment.synced", count=synced_runs + 1, timeout=20)  # and on it goes

    started = time.monotonic()
    assert daemon.terminate(30) == 0
    assert time.monotonic() - started < 30
    events = parse_log_lines(daemon.output())
    names = [e["event"] for e in events]
    assert "daemon.started" in names
    endings = run_endings(events)
    assert len(endings) >= 3
    assert all(e["event"] == "segment.synced" for e in endings.values())
    assert all(e["segment"] == "Scheduled" for e in endings.values())
    assert "Traceback" not in daemon.errors()
    assert live_sandbox.count("create") == 1
    assert_no_secrets(live_sandbox, daemon.output(), daemon.errors())


def test_run_with_admin_port_in_use_fails_with_one_line(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    path = write_ids(tmp_path / "ids.txt", ["a@example.com"])
    mapping = {"name": "Busy", "source": {"type": "file", "path": str(path)}}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - the admin server binds every address
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(live_sandbox.url, tmp_path, [mapping], admin_port=port)
        result = run_cli("run", env=env, timeout=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "SYNCD_ADMIN_PORT" in lines[0]
