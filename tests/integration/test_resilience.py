"""One bad input fails one thing, never the daemon: bad rows already stored, state
store faults under a running daemon, and the signals that stop a run gracefully."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from syncd.sandbox import Faults, WalkMeSandbox
from tests.support.harness import cli_env, parse_status, status_rows
from tests.support.ids import make_ids, write_ids
from tests.support.logs import named, parse_log_lines, run_endings
from tests.support.net import free_port
from tests.support.postgres import (
    admin_connection,
    create_database,
    drop_database,
    postgres_url,
    url_for_database,
)
from tests.support.processes import REPO_ROOT, DaemonProcess, run_cli, syncd_command
from tests.support.stores import create_store
from tests.support.waiting import wait_until

StartDaemon = Callable[[dict[str, str]], DaemonProcess]

# Names a Heap page may carry that no mapping accepts (too long, trailing space,
# a line break and a terminal escape), as an older syncd could have stored them.
BAD_HEAP_NAMES = {
    901: "N" * 199 + " tail",
    902: "N" * 203 + " ",
    903: "two\nlines\x1b[31m",
}


def escaped(name: str) -> str:
    """How syncd prints a name holding control characters (these are all ASCII)."""
    return name.encode("unicode_escape").decode("ascii")


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1
            body: dict[str, Any] = json.load(response)
            return response.status, body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def store_bad_heap_rows(state_db: Path) -> None:
    """Heap segments written straight into the state database, past every check."""
    asyncio.run(create_store("sqlite:///" + str(state_db)))
    with sqlite3.connect(state_db) as conn:
        conn.executemany(
            "INSERT INTO heap_segments (heap_segment_id, name, mapping_name, updated_at)"
            " VALUES (?, ?, ?, '2026-01-01T00:00:00+00:00')",
            [(heap_id, name, name) for heap_id, name in BAD_HEAP_NAMES.items()],
        )


def heap_env(sandbox: WalkMeSandbox, folder: Path, **extra: object) -> dict[str, str]:
    """A file-source segment "Good", the webhook receiver on (so auto-mapping is on)."""
    path = write_ids(folder / "good.txt", make_ids(300))
    mapping = {"name": "Good", "source": {"type": "file", "path": str(path)}}
    return cli_env(
        sandbox.url,
        folder,
        [mapping],
        heap_webhook_secret="resilience-webhook-secret",
        webhook_port=free_port(),
        **extra,
    )


def failed_segments(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["segment"]: e for e in events if e["event"] == "segment.failed"}


def test_bad_stored_heap_rows_fail_only_their_segments_in_every_command(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """status, sync, history and prune work with bad Heap rows stored; each bad row
    is its own failing segment, reported with segment.failed and a hint, printed
    escaped; the good segment syncs; nothing is an orphan."""
    env = heap_env(live_sandbox, tmp_path)
    store_bad_heap_rows(tmp_path / "state.db")

    rows = status_rows(env)
    for name in BAD_HEAP_NAMES.values():
        assert rows[name]["last_result"] == "invalid"
        assert "SYNCD_SEGMENTS" in rows[name]["last_error"]
    table = run_cli("status", env=env)
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout
    assert "two\\nlines\\x1b[31m" in table.stdout
    assert "Traceback" not in table.stderr

    result = run_cli("sync", env=env)
    assert result.returncode == 1, result.stdout + result.stderr  # some segments failed
    assert "Traceback" not in result.stderr
    events = parse_log_lines(result.stderr)
    failed = failed_segments(events)
    assert set(failed) == {escaped(name) for name in BAD_HEAP_NAMES.values()}
    assert all("heap_segment_id" in e["error"] for e in failed.values())
    assert any(e["event"] == "segment.synced" and e["segment"] == "Good" for e in events)
    record = live_sandbox.find(name="Good")
    assert record is not None
    assert live_sandbox.members(record.guid) == set(make_ids(300))

    for args in (("history", "--segment", "Good"), ("prune",)):
        answer = run_cli(*args, env=env)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert "Traceback" not in answer.stderr
    assert "nothing to prune" in run_cli("prune", env=env).stdout


def test_daemon_starts_and_serves_with_bad_stored_heap_rows(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    """`syncd run` starts, syncs the good segment every cycle, logs each bad row as a
    failed segment each cycle, and /readyz and /metrics answer."""
    port = free_port()
    env = heap_env(live_sandbox, tmp_path, admin_port=port, schedule="2s")
    store_bad_heap_rows(tmp_path / "state.db")
    daemon = daemons(env)
    daemon.wait_for("cycle.finished", count=2, timeout=30)

    status, ready = http_get(f"http://127.0.0.1:{port}/readyz")
    assert status == 200, ready
    assert {row["segment"] for row in ready["invalid"]} == {
        escaped(name) for name in BAD_HEAP_NAMES.values()
    }
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
    assert daemon.terminate(30) == 0
    events = parse_log_lines(daemon.output())
    cycles = named(events, "cycle.finished")
    assert all(c["failed"] == len(BAD_HEAP_NAMES) and c["synced"] == 1 for c in cycles)
    assert daemon.count("segment.failed") >= 2 * len(BAD_HEAP_NAMES)
    run_endings(events)
    assert "Traceback" not in daemon.errors()
    assert "Job raised" not in daemon.output() + daemon.errors()


def test_state_errors_taking_a_lease_fail_the_segment_and_finish_the_cycle(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    """A store that fails every lease: each cycle logs segment.failed for the segment
    and cycle.finished; nothing is swallowed, no job exception, the daemon goes on."""
    path = write_ids(tmp_path / "leased.txt", make_ids(50))
    mapping = {"name": "Leased", "source": {"type": "file", "path": str(path)}}
    env = cli_env(live_sandbox.url, tmp_path, [mapping], schedule="2s")
    asyncio.run(create_store("sqlite:///" + str(tmp_path / "state.db")))
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("DROP TABLE leases")
    daemon = daemons(env)
    daemon.wait_for("cycle.finished", count=2, timeout=30)
    assert daemon.terminate(30) == 0
    events = parse_log_lines(daemon.output())
    failures = named(events, "segment.failed")
    assert len(failures) >= 2
    assert all(e["segment"] == "Leased" and "leases" in e["error"] for e in failures)
    assert all(c["failed"] == 1 for c in events if c["event"] == "cycle.finished")
    assert "Traceback" not in daemon.errors()
    assert "Job raised" not in daemon.output() + daemon.errors()

    result = run_cli("sync", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "leases" in failed_segments(parse_log_lines(result.stderr))["Leased"]["error"]


@pytest.mark.parametrize("damage", ["deleted", "overwritten"])
def test_readyz_reports_a_sqlite_file_deleted_or_damaged_under_the_daemon(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon, damage: str
) -> None:
    """The open connection would go on writing into a ghost: /readyz says 503, what
    happened, and what to do."""
    path = write_ids(tmp_path / "kept.txt", make_ids(20))
    mapping = {"name": "Kept", "source": {"type": "file", "path": str(path)}}
    port = free_port()
    env = cli_env(live_sandbox.url, tmp_path, [mapping], admin_port=port, schedule="1h")
    daemon = daemons(env)
    daemon.wait_for("cycle.finished", timeout=30)
    assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    state_db = tmp_path / "state.db"
    if damage == "deleted":
        state_db.unlink()
    else:
        with state_db.open("r+b") as file:
            file.write(b"\0" * 4096)
    status, body = http_get(f"http://127.0.0.1:{port}/readyz")
    assert status == 503, body
    message = body["state_store"]
    assert str(state_db) in message
    assert ("deleted" if damage == "deleted" else "damaged") in message
    assert "start syncd again" in message
    assert daemon.terminate(30) == 0
    assert "Traceback" not in daemon.errors()


def test_sighup_stops_the_daemon_gracefully(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    """SIGHUP (terminals, process managers) ends `syncd run` like SIGTERM: exit 0,
    the signal named in the log, the batch in flight finished and recorded."""
    source = make_ids(100_000)
    path = write_ids(tmp_path / "hup.txt", source)
    mapping = {"name": "Hup", "source": {"type": "file", "path": str(path)}}
    env = cli_env(live_sandbox.url, tmp_path, [mapping], schedule="1h", batch_size=10_000)
    live_sandbox.faults = Faults(delay=0.3)
    daemon = daemons(env)
    wait_until(lambda: live_sandbox.count("create") >= 1, 60, "the create", step=0.01)
    daemon.process.send_signal(signal.SIGHUP)
    assert daemon.wait(30) == 0, daemon.errors()[-3000:]
    assert "Traceback" not in daemon.errors()
    assert daemon.count("daemon.stopping", signal="SIGHUP") == 1
    assert daemon.count("daemon.stopped") == 1
    live_sandbox.faults = Faults()
    record = live_sandbox.find(name="Hup")
    assert record is not None
    assert status_rows(env)["Hup"]["members"] == live_sandbox.size(record.guid) < len(source)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_signals_stop_an_interactive_sync_after_the_batch_in_flight(
    live_sandbox: WalkMeSandbox, tmp_path: Path, signum: signal.Signals
) -> None:
    """`syncd sync` on SIGHUP, SIGINT or SIGTERM: the batch in flight is finished and
    recorded, the signal is logged, the run ends as failed (exit 1), no traceback."""
    source = make_ids(100_000)
    path = write_ids(tmp_path / "interactive.txt", source)
    mapping = {"name": "Interactive", "source": {"type": "file", "path": str(path)}}
    env = cli_env(live_sandbox.url, tmp_path, [mapping], batch_size=10_000)
    live_sandbox.faults = Faults(delay=0.3)
    process = subprocess.Popen(
        syncd_command("sync"),
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: live_sandbox.count("create") >= 1, 60, "the create", step=0.01)
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    events = parse_log_lines(err)  # an interactive command logs on stderr
    assert [e["signal"] for e in events if e["event"] == "sync.stopping"] == [signum.name]
    ending = run_endings(events)
    assert [e["interrupted"] for e in ending.values()] == [True]
    live_sandbox.faults = Faults()
    record = live_sandbox.find(name="Interactive")
    assert record is not None
    rows = parse_status(run_cli("status", "--json", env=env).stdout)
    assert rows["Interactive"]["members"] == live_sandbox.size(record.guid) < len(source)


async def _recreate_database(name: str) -> None:
    await drop_database(name)
    conn = await admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.mark.postgres
def test_postgres_state_dropped_and_recreated_is_rebuilt_without_a_restart(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    """The state database is dropped and created again empty under `syncd run`: the
    store makes its tables again (state.recreated), and each segment is found again
    in WalkMe (by external id, or by name) and rebuilt with override: no twin."""
    database = asyncio.run(create_database())
    try:
        with_id = write_ids(tmp_path / "with_id.txt", make_ids(400, "a"))
        by_name = write_ids(tmp_path / "by_name.txt", make_ids(300, "b"))
        mappings = [
            {
                "name": "With id",
                "external_id": "with-id-1",
                "source": {"type": "file", "path": str(with_id)},
            },
            {"name": "By name", "source": {"type": "file", "path": str(by_name)}},
        ]
        url = url_for_database(postgres_url(), database)
        env = cli_env(live_sandbox.url, tmp_path, mappings, state_url=url, schedule="2s")
        daemon = daemons(env)
        daemon.wait_for("segment.synced", count=2, timeout=30)
        guids = {name: live_sandbox.find(name=name) for name in ("With id", "By name")}
        asyncio.run(_recreate_database(database))
        daemon.wait_for("state.recreated", timeout=30)

        def rebuilt() -> bool:
            events = daemon.events()
            start = next(i for i, e in enumerate(events) if e["event"] == "state.recreated")
            synced = {e["segment"] for e in events[start:] if e["event"] == "segment.synced"}
            return synced == {"With id", "By name"}

        wait_until(rebuilt, 30, "both segments synced after the state was recreated")
        assert daemon.terminate(30) == 0
        assert "Traceback" not in daemon.errors()
        for name, members in (("With id", make_ids(400, "a")), ("By name", make_ids(300, "b"))):
            twins = [s for s in live_sandbox.state()["segments"] if s["name"] == name]
            assert len(twins) == 1, twins
            record = guids[name]
            assert record is not None
            assert live_sandbox.find(name=name) == record
            assert live_sandbox.members(record.guid) == set(members)
            overrides = [
                r for r in live_sandbox.requests if r.action == "override" and record.guid in r.path
            ]
            assert overrides, f"{name} was not rebuilt with override"
        adopted = [e for e in daemon.events() if e["event"] == "segment.adopted"]
        assert {(e["segment"], e["by"]) for e in adopted} == {
            ("With id", "external_id"),
            ("By name", "name"),
        }
        assert live_sandbox.count("create") == 2  # the first run's, none after
    finally:
        asyncio.run(drop_database(database))
