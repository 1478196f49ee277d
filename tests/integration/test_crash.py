"""SIGKILL in the middle of a sync, then a restart."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from syncd.sandbox import Faults, WalkMeSandbox
from tests.support.harness import cli_env, segment_requests, segments_named, status_rows
from tests.support.ids import file_mapping, make_ids
from tests.support.logs import parse_log_lines, run_endings
from tests.support.processes import DaemonProcess
from tests.support.waiting import wait_until

StartDaemon = Callable[[dict[str, str]], DaemonProcess]

BATCH = 10_000


def start_slow_sync(
    sandbox: WalkMeSandbox,
    tmp_path: Path,
    start: StartDaemon,
    name: str,
    source: list[str],
    delay: float,
) -> tuple[dict[str, str], DaemonProcess]:
    """Start `syncd run` syncing ``source`` to segment ``name`` in batches of BATCH,
    WalkMe answering each call ``delay`` s late: time to kill it mid-sync."""
    mapping = file_mapping(tmp_path, name, source)
    env = cli_env(sandbox.url, tmp_path, [mapping], schedule="1h", batch_size=BATCH)
    sandbox.faults = Faults(delay=delay)
    return env, start(env)


def run_to_convergence(start: StartDaemon, env: dict[str, str]) -> DaemonProcess:
    """Restart `syncd run`, let its first sync finish, stop it cleanly."""
    daemon = start(env)
    daemon.wait_for("segment.synced", timeout=60)
    assert daemon.terminate(30) == 0
    endings = run_endings(parse_log_lines(daemon.output()))
    assert [e["event"] for e in endings.values()] == ["segment.synced"]
    return daemon


def test_sigkill_mid_first_sync_resends_at_most_one_batch(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    source = make_ids(200_000)
    env, first = start_slow_sync(live_sandbox, tmp_path, daemons, "Crash", source, delay=0.2)
    wait_until(lambda: len(segment_requests(live_sandbox)) >= 5, 60, "five batches", step=0.01)
    first.kill()
    # A handler the kill left running still finishes; let it land before looking.
    time.sleep(0.5)
    record = live_sandbox.find(name="Crash")
    assert record is not None
    sent_before = len(segment_requests(live_sandbox))
    assert live_sandbox.size(record.guid) < len(source), "the sync should have been cut short"
    snapshot = status_rows(env)["Crash"]["members"]
    assert snapshot <= live_sandbox.size(record.guid)

    live_sandbox.faults = Faults(delay=0.02)
    run_to_convergence(daemons, env)

    assert live_sandbox.members(record.guid) == set(source)
    assert len(segments_named(live_sandbox, "Crash")) == 1
    minimum = math.ceil(len(source) / BATCH)
    total = len(segment_requests(live_sandbox))
    assert total <= minimum + 1, f"{total} requests (before the kill: {sent_before})"
    assert live_sandbox.count("create") == 1
    assert status_rows(env)["Crash"]["members"] == len(source)


def test_sigkill_right_after_create_adopts_instead_of_duplicating(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    source = make_ids(30_000)
    env, first = start_slow_sync(live_sandbox, tmp_path, daemons, "Ambiguous", source, delay=1.0)
    # The list answered, so the create is on its way: kill while WalkMe works on it.
    wait_until(lambda: live_sandbox.count("list") >= 1, 60, "the list call", step=0.01)
    time.sleep(0.3)
    first.kill()
    # WalkMe applies the create all the same; syncd never saw the answer.
    wait_until(lambda: live_sandbox.find(name="Ambiguous") is not None, 10, "the create")
    assert status_rows(env)["Ambiguous"]["segment_guid"] is None
    record = live_sandbox.find(name="Ambiguous")
    assert record is not None

    live_sandbox.faults = Faults()
    live_sandbox.clear_requests()
    run_to_convergence(daemons, env)

    assert len(segments_named(live_sandbox, "Ambiguous")) == 1
    assert live_sandbox.members(record.guid) == set(source)
    after = segment_requests(live_sandbox)
    assert [(r.kind, r.action) for r in after] == [
        ("update", "override"),
        ("update", "add"),
        ("update", "add"),
    ]
    # With the lost create: one batch more than the minimum, not a second segment.
    assert 1 + len(after) <= math.ceil(len(source) / BATCH) + 1
    row = status_rows(env)["Ambiguous"]
    assert row["segment_guid"] == record.guid
    assert row["members"] == len(source)
