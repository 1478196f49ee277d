"""Segment lifecycle: orphans, delete and prune, through the real CLI and daemon.

Every environment here runs on a 1 s schedule, so a segment counts as in use for
IN_USE_INTERVALS seconds after its last successful run."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from syncd.engine import IN_USE_INTERVALS
from syncd.sandbox import Faults, WalkMeSandbox
from tests.support.harness import cli_env, delete_segment, seed_segment
from tests.support.ids import file_mapping, make_ids
from tests.support.logs import named, parse_log_lines
from tests.support.net import free_port
from tests.support.processes import DaemonProcess, run_cli

StartDaemon = Callable[[dict[str, str]], DaemonProcess]
SCHEDULE = "1s"


def env_for(
    sandbox: WalkMeSandbox, folder: Path, mappings: list[dict[str, Any]], **extra: object
) -> dict[str, str]:
    return cli_env(sandbox.url, folder, mappings, schedule=SCHEDULE, **extra)


def wait_out_in_use_window() -> None:
    """Until a segment synced just now is no longer in use by its last run alone."""
    time.sleep(IN_USE_INTERVALS * 1.0 + 0.3)


def status(env: dict[str, str]) -> dict[str, Any]:
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def names_in(sandbox: WalkMeSandbox) -> set[str]:
    return {segment["name"] for segment in sandbox.state()["segments"]}


def sync_ok(env: dict[str, str]) -> str:
    """The log lines of a `syncd sync` that succeeded (on stderr, as for every
    interactive command)."""
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stderr


def test_orphan_is_logged_listed_and_pruned_only_with_yes(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    keep = file_mapping(tmp_path, "Keep", make_ids(30, "k"))
    drop = file_mapping(tmp_path, "Drop", make_ids(20, "d"))
    sync_ok(env_for(live_sandbox, tmp_path, [keep, drop]))
    assert names_in(live_sandbox) == {"Keep", "Drop"}

    # "Drop" leaves the configuration. Just synced, it may still be mapped by a
    # replica mid-rollout: no orphan yet, and prune keeps it, naming its last run.
    # (A 10-minute schedule here: the window must not pass on a slow machine.)
    env = env_for(live_sandbox, tmp_path, [keep])
    recent = {**env, "SYNCD_SCHEDULE": "10m"}
    events = parse_log_lines(sync_ok(recent))
    assert not named(events, "segment.orphaned")
    kept = run_cli("prune", "--yes", env=recent)
    assert kept.returncode == 0, kept.stderr
    assert "keep   'Drop'" in kept.stdout
    assert "last synced at" in kept.stdout
    assert names_in(live_sandbox) == {"Keep", "Drop"}

    # Once that window has passed, a run reports it and leaves it in WalkMe.
    wait_out_in_use_window()
    events = parse_log_lines(sync_ok(env))
    orphaned = named(events, "segment.orphaned")
    assert [(e["segment"], e["members"]) for e in orphaned] == [("Drop", 20)]
    assert orphaned[0]["segment_guid"]
    assert orphaned[0]["since"]
    assert names_in(live_sandbox) == {"Keep", "Drop"}
    document = status(env)
    assert [row["segment"] for row in document["orphans"]] == ["Drop"]
    assert [row["segment"] for row in document["segments"]] == ["Keep"]

    # Without --yes: the plan only.
    plan = run_cli("prune", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "would delete 'Drop'" in plan.stdout
    assert "nothing deleted" in plan.stdout
    assert names_in(live_sandbox) == {"Keep", "Drop"}
    assert live_sandbox.count("delete") == 0

    pruned = run_cli("prune", "--yes", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert names_in(live_sandbox) == {"Keep"}
    assert live_sandbox.count("delete") == 1
    assert status(env)["orphans"] == []
    # The kept segment is untouched and still syncs with no request.
    sync_ok(env)
    assert live_sandbox.count("update") == 0


def test_adopted_orphan_survives_prune_until_include_adopted(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    existing = asyncio.run(seed_segment(live_sandbox, "Adopted", ["old@x.com"]))
    adopted = file_mapping(tmp_path, "Adopted", make_ids(10, "a"))
    created = file_mapping(tmp_path, "Created", make_ids(10, "c"))
    sync_ok(env_for(live_sandbox, tmp_path, [adopted, created]))
    assert live_sandbox.find(name="Adopted") is not None
    assert live_sandbox.find(name="Adopted").guid == existing  # type: ignore[union-attr]

    env = env_for(live_sandbox, tmp_path, [file_mapping(tmp_path, "Other", ["o@x.com"])])
    sync_ok(env)
    wait_out_in_use_window()
    pruned = run_cli("prune", "--yes", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert "adopted, not created by syncd" in pruned.stdout
    assert names_in(live_sandbox) == {"Adopted", "Other"}

    everything = run_cli("prune", "--yes", "--include-adopted", env=env)
    assert everything.returncode == 0, everything.stderr
    assert names_in(live_sandbox) == {"Other"}
    assert status(env)["orphans"] == []


def test_delete_without_yes_changes_nothing_and_already_gone_exits_0(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    one = file_mapping(tmp_path, "One", make_ids(5, "o"))
    env = env_for(live_sandbox, tmp_path, [one])
    sync_ok(env)
    record = live_sandbox.find(name="One")
    assert record is not None
    wait_out_in_use_window()

    dry = run_cli("delete", "--segment", "One", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would delete 'One'" in dry.stdout
    assert live_sandbox.find(name="One") is not None

    # Someone deletes it in WalkMe first: 404, state forgotten, exit 0.
    asyncio.run(delete_segment(live_sandbox, record.guid))
    gone = run_cli("delete", "--segment", "One", "--yes", env=env)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert "already gone" in gone.stdout
    assert "One" not in {row["segment"] for row in status(env)["orphans"]}
    assert status(env)["segments"][0]["last_result"] == "never run"

    unknown = run_cli("delete", "--segment", "Nope", "--yes", env=env)
    assert unknown.returncode == 2
    assert "Nope" in unknown.stderr


def test_renamed_mapping_keeping_external_id_is_recognised(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    ids = make_ids(12, "r")
    old = file_mapping(tmp_path, "Old", ids, external_id="e-1")
    sync_ok(env_for(live_sandbox, tmp_path, [old]))
    old_guid = live_sandbox.find(name="Old").guid  # type: ignore[union-attr]

    env = env_for(live_sandbox, tmp_path, [file_mapping(tmp_path, "New", ids, external_id="e-1")])
    first = run_cli("sync", env=env)
    events = parse_log_lines(first.stderr)
    renamed = named(events, "segment.renamed")
    assert renamed, first.stdout
    assert renamed[0]["old_segment"] == "Old"
    assert renamed[0]["old_segment_guid"] == old_guid
    assert "syncd delete --segment 'Old' --yes" in renamed[0]["hint"]
    # Never written into the old segment, which is now an orphan.
    assert live_sandbox.members(old_guid) == set(ids)
    wait_out_in_use_window()
    assert [row["segment"] for row in status(env)["orphans"]] == ["Old"]

    deleted = run_cli("delete", "--segment", "Old", "--yes", env=env)
    assert deleted.returncode == 0, deleted.stderr
    sync_ok(env)
    new = live_sandbox.find(name="New")
    assert new is not None
    assert new.external_id == "e-1"
    assert live_sandbox.members(new.guid) == set(ids)
    assert names_in(live_sandbox) == {"New"}


def test_a_segment_stays_in_use_for_3_of_its_own_schedule_intervals(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """A nightly segment synced seconds ago is in use for 3 nights, one on the 1 s
    default for 3 s; a segment this configuration no longer maps gets the longest
    interval configured (it may be a nightly one of another replica's)."""
    fast = file_mapping(tmp_path, "Fast", make_ids(5, "f"))
    nightly = file_mapping(tmp_path, "Nightly", make_ids(5, "n"), schedule="0 3 * * *")
    gone = file_mapping(tmp_path, "Gone", make_ids(5, "g"))
    sync_ok(env_for(live_sandbox, tmp_path, [fast, nightly, gone]))
    env = env_for(live_sandbox, tmp_path, [fast, nightly])
    wait_out_in_use_window()

    assert "would delete 'Fast'" in run_cli("delete", "--segment", "Fast", env=env).stdout
    refused = run_cli("delete", "--segment", "Nightly", env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "in use: last synced at" in refused.stdout
    assert f"less than {IN_USE_INTERVALS} schedule intervals (259200 s) ago" in refused.stdout
    kept = run_cli("prune", env=env)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "keep   'Gone'" in kept.stdout
    assert "(259200 s)" in kept.stdout
    assert names_in(live_sandbox) == {"Fast", "Nightly", "Gone"}


def test_a_running_daemon_keeps_the_segments_it_maps_from_prune_and_delete(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    """SQLite, one host: a ``syncd prune`` on the daemon's state file sees the daemon
    as a live replica, long after the segment's last run stopped protecting it."""
    live = file_mapping(tmp_path, "Live", make_ids(10, "l"))
    daemon = daemons(cli_env(live_sandbox.url, tmp_path, [live], schedule="1h"))
    daemon.wait_for("segment.synced")
    guid = live_sandbox.find(name="Live").guid  # type: ignore[union-attr]
    replica = f"{socket.gethostname()}:{daemon.process.pid}"
    # An operator whose configuration lacks "Live" (an old checkout, the next release).
    env = env_for(live_sandbox, tmp_path, [file_mapping(tmp_path, "Other", ["o@x.com"])])
    wait_out_in_use_window()

    pruned = run_cli("prune", "--yes", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert f"keep   'Live' ({guid}): mapped by live replica {replica}" in pruned.stdout
    assert "nothing to prune" in pruned.stdout
    for args in (("--yes",), ()):
        refused = run_cli("delete", "--segment", "Live", *args, env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        [line] = [line for line in refused.stdout.splitlines() if "REFUSED" in line]
        assert f"'Live' ({guid}): in use: mapped by live replica {replica}" in line
        assert "Traceback" not in refused.stdout + refused.stderr
    assert live_sandbox.count("delete") == 0
    assert live_sandbox.members(guid) == set(make_ids(10, "l"))
    assert daemon.count("segment.orphaned") == 0

    # Stopped, the daemon maps nothing: the segment is an orphan prune deletes.
    assert daemon.terminate() == 0
    pruned = run_cli("prune", "--yes", env=env)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert f"'Live' ({guid}): deleted" in pruned.stdout
    assert names_in(live_sandbox) == set()


def test_a_cycle_outlasting_the_schedule_logs_cycle_overrun(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    live_sandbox.faults = Faults(delay=3.0)  # each WalkMe call: longer than the schedule
    daemon = daemons(env_for(live_sandbox, tmp_path, [file_mapping(tmp_path, "Slow", ["s@x.com"])]))
    daemon.wait_for("cycle.overrun", timeout=30)
    daemon.wait_for("cycle.finished", timeout=30)
    assert daemon.terminate() == 0
    [first, *_] = [e for e in daemon.events() if e["event"] == "cycle.overrun"]
    assert first["level"] == "warning"
    assert first["segments"] == ["Slow"]
    assert 0.5 <= first["running_s"] < 10
    assert first["schedule"] == SCHEDULE
    # APScheduler's own free-text line is gone: the catalogued event replaces it.
    assert "maximum number of running instances" not in daemon.output() + daemon.errors()


def accepts(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


@pytest.mark.parametrize(
    ("host", "reachable", "unreachable"),
    [("::1", "::1", "127.0.0.1"), ("::", "::1", None)],
    ids=["ipv6-loopback-only", "every-ipv6-interface"],
)
def test_admin_and_webhook_servers_listen_on_their_configured_host(
    live_sandbox: WalkMeSandbox,
    tmp_path: Path,
    daemons: StartDaemon,
    host: str,
    reachable: str,
    unreachable: str | None,
) -> None:
    admin, webhook = free_port(), free_port()
    env = env_for(
        live_sandbox,
        tmp_path,
        [file_mapping(tmp_path, "Bound", ["b@x.com"])],
        admin_host=host,
        admin_port=admin,
        webhook_host=host,
        webhook_port=webhook,
        heap_webhook_secret="bind-test-webhook-secret",
    )
    daemon = daemons(env)
    daemon.wait_for("daemon.started")
    assert daemon.count("daemon.started", admin_host=host, admin_port=admin) == 1
    assert daemon.count("heap.webhook_listening", host=host, port=webhook) == 1
    for port in (admin, webhook):
        assert accepts(reachable, port), f"nothing listens on [{reachable}]:{port}"
        if unreachable is not None:
            assert not accepts(unreachable, port), f"{unreachable}:{port} answers"
    assert daemon.terminate() == 0


def test_an_admin_host_not_on_this_machine_fails_with_one_line(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    # 192.0.2.1 is TEST-NET-1 (documentation only): binding to it fails, nothing is sent.
    env = env_for(
        live_sandbox, tmp_path, [file_mapping(tmp_path, "Far", ["f@x.com"])], admin_host="192.0.2.1"
    )
    result = run_cli("run", env=env, timeout=30)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "syncd: configuration error: SYNCD_ADMIN_HOST: cannot listen on 192.0.2.1"
    )
    assert "Traceback" not in result.stdout + result.stderr
