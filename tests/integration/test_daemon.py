"""`syncd run` as a daemon: admin endpoints, schedule, SIGTERM (issue cases 8, 9)."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from syncd.sandbox import Faults, WalkMeSandbox
from tests.support.harness import assert_no_secrets, cli_env, status_rows
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


def test_sigterm_during_large_sync_exits_0_and_loses_nothing(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    source = make_ids(200_000)
    path = write_ids(tmp_path / "large.txt", source)
    mapping = {"name": "Large", "source": {"type": "file", "path": str(path)}}
    env = cli_env(live_sandbox.url, tmp_path, [mapping], schedule="1h")
    live_sandbox.faults = Faults(delay=0.5)
    daemon = daemons(env)

    wait_until(lambda: live_sandbox.count("create") >= 1, 60, "the create", step=0.01)
    time.sleep(0.25)  # the first add batch is now in flight (WalkMe takes 0.5 s)
    daemon.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = daemon.wait(30)
    stopped_in = time.monotonic() - started
    assert code == 0, daemon.errors()[-3000:]
    assert stopped_in < 30
    assert "Traceback" not in daemon.errors()
    assert_no_secrets(live_sandbox, daemon.output(), daemon.errors())
    time.sleep(0.6)  # a request the daemon gave up on would land by now

    record = live_sandbox.find(name="Large")
    assert record is not None
    guid = record.guid
    assert live_sandbox.size(guid) < len(source), "the sync should have been interrupted"
    # Everything below is checked before failing, so one run shows every problem.
    problems: list[str] = []
    events = parse_log_lines(daemon.output())
    try:
        endings = run_endings(events)
        if len(endings) != 1:
            problems.append(f"expected one segment run, got {len(endings)}")
    except AssertionError as exc:
        problems.append(f"after SIGTERM: {exc}")
    errors = [e for e in events if e["level"] in ("error", "critical")]
    if errors:
        problems.append(f"error lines on a clean SIGTERM: {errors}")
    # The batch in flight was finished and recorded: the snapshot is what WalkMe holds.
    row = status_rows(env)["Large"]
    if row["members"] != live_sandbox.size(guid):
        problems.append(
            f"after SIGTERM the snapshot holds {row['members']} members,"
            f" WalkMe {live_sandbox.size(guid)}"
        )
    if row["last_result"] not in ("synced", "failed"):
        problems.append(f"the interrupted run was never finished: last_result={row['last_result']}")

    live_sandbox.faults = Faults()
    live_sandbox.clear_requests()
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert live_sandbox.members(guid) == set(source)
    assert status_rows(env)["Large"]["members"] == live_sandbox.size(guid) == len(source)
    assert live_sandbox.count("create") == 0
    assert all(r.action == "add" for r in live_sandbox.requests if r.kind == "update")
    assert not problems, "\n".join(problems)


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
