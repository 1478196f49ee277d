"""The command line as users run it: `python -m syncd ...` subprocesses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from syncd.sandbox import WalkMeSandbox
from tests.support.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    assert_no_secrets,
    cli_env,
    parse_status,
    segment_requests,
)
from tests.support.ids import make_ids, write_ids
from tests.support.logs import named, parse_log_lines, run_endings
from tests.support.net import free_port
from tests.support.processes import REPO_ROOT, base_env, run_cli
from tests.support.waiting import wait_until


def file_mapping(folder: Path, name: str, ids: list[str] | None, **extra: Any) -> dict[str, Any]:
    """A mapping whose file holds ``ids``; None leaves the file missing."""
    path = folder / f"{name}.txt"
    if ids is not None:
        write_ids(path, ids)
    return {"name": name, "source": {"type": "file", "path": str(path)}, **extra}


def test_sync_exit_0_and_logs(live_sandbox: WalkMeSandbox, tmp_path: Path) -> None:
    source = make_ids(3_000)
    mapping = file_mapping(tmp_path, "Trial", source)
    env = cli_env(live_sandbox.url, tmp_path, [mapping], batch_size=1_000, log_level="debug")

    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    record = live_sandbox.find(name="Trial")
    assert record is not None
    assert live_sandbox.members(record.guid) == set(source)
    assert result.stdout == "", "`sync` prints nothing on stdout: its log lines go to stderr"
    events = parse_log_lines(result.stderr)
    endings = run_endings(events)
    assert [e["event"] for e in endings.values()] == ["segment.synced"]
    ending = next(iter(endings.values()))
    assert ending["segment"] == "Trial"
    assert ending["added"] == 3_000
    assert ending["removed"] == 0
    assert ending["skipped"] == 0
    assert ending["requests"] >= 3
    assert isinstance(ending["duration_s"], int | float)
    assert "Traceback" not in result.stderr
    assert_no_secrets(live_sandbox, result.stdout, result.stderr)


def test_one_failing_segment_exits_1_and_the_other_still_syncs(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    good = make_ids(500)
    mappings = [file_mapping(tmp_path, "Good", good), file_mapping(tmp_path, "Broken", None)]
    env = cli_env(live_sandbox.url, tmp_path, mappings)

    result = run_cli("sync", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    record = live_sandbox.find(name="Good")
    assert record is not None
    assert live_sandbox.members(record.guid) == set(good)
    assert live_sandbox.find(name="Broken") is None
    endings = {e["segment"]: e for e in run_endings(parse_log_lines(result.stderr)).values()}
    assert endings["Good"]["event"] == "segment.synced"
    assert endings["Broken"]["event"] == "segment.failed"
    assert "Broken.txt" in endings["Broken"]["error"]
    assert "Traceback" not in result.stdout + result.stderr

    rows = parse_status(run_cli("status", "--json", env=env).stdout)
    assert rows["Good"]["last_result"] == "synced"
    assert rows["Broken"]["last_result"] == "failed"
    assert "Broken.txt" in rows["Broken"]["last_error"]

    # Only the healthy segment: exit 0. Then the file appears: all green.
    assert run_cli("sync", "--segment", "Good", env=env).returncode == 0
    write_ids(tmp_path / "Broken.txt", ["fixed@example.com"])
    assert run_cli("sync", env=env).returncode == 0
    fixed = live_sandbox.find(name="Broken")
    assert fixed is not None
    assert live_sandbox.members(fixed.guid) == {"fixed@example.com"}


def test_unreadable_source_file_fails_that_segment(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok@example.com\n\x00\x01\x02garbage\n")
    mappings = [
        {"name": "Binary", "source": {"type": "file", "path": str(binary)}},
        {"name": "Directory", "source": {"type": "file", "path": str(tmp_path)}},
        file_mapping(tmp_path, "Fine", ["fine@example.com"]),
    ]
    result = run_cli("sync", env=cli_env(live_sandbox.url, tmp_path, mappings))
    assert result.returncode == 1
    endings = {e["segment"]: e for e in run_endings(parse_log_lines(result.stderr)).values()}
    assert {name: e["event"] for name, e in endings.items()} == {
        "Binary": "segment.failed",
        "Directory": "segment.failed",
        "Fine": "segment.synced",
    }
    # A partial read must not reach WalkMe: nothing was created for the broken ones.
    assert live_sandbox.find(name="Binary") is None
    assert live_sandbox.find(name="Directory") is None
    assert "Traceback" not in result.stdout + result.stderr


def test_dry_run_prints_the_plan_and_sends_nothing(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    source = make_ids(2_500)
    mapping = file_mapping(tmp_path, "Planned", source)
    env = cli_env(live_sandbox.url, tmp_path, [mapping], batch_size=1_000)

    # Never synced: the plan is a create of everything.
    result = run_cli("sync", "--dry-run", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert segment_requests(live_sandbox) == []
    assert live_sandbox.find(name="Planned") is None
    assert "create" in result.stdout
    assert re.search(r"\badd\s+2500\b", result.stdout), result.stdout
    assert source[0] in result.stdout

    assert run_cli("sync", env=env).returncode == 0
    live_sandbox.clear_requests()
    changed = [*source[7:], "zz-new1@example.com", "zz-new2@example.com"]
    write_ids(tmp_path / "Planned.txt", changed)

    result = run_cli("sync", "--dry-run", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert segment_requests(live_sandbox) == []
    assert re.search(r"\badd\s+2\b", result.stdout), result.stdout
    assert re.search(r"\bremove\s+7\b", result.stdout), result.stdout
    assert "zz-new1@example.com" in result.stdout
    assert source[0] in result.stdout  # an example of the removes
    # The dry run changed nothing: the real run still has the whole change to send.
    assert run_cli("sync", env=env).returncode == 0
    assert [r.action for r in segment_requests(live_sandbox)] == ["remove", "add"]
    record = live_sandbox.find(name="Planned")
    assert record is not None
    assert live_sandbox.members(record.guid) == set(changed)


def test_check_prints_ok_lines(live_sandbox: WalkMeSandbox, tmp_path: Path) -> None:
    mapping = file_mapping(tmp_path, "Checked", ["a@example.com"])
    env = cli_env(live_sandbox.url, tmp_path, [mapping])
    result = run_cli("check", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    # Log lines (JSON) may come in between; every other line is an "ok" line.
    lines = [
        line for line in result.stdout.splitlines() if line.strip() and not line.startswith("{")
    ]
    assert len(lines) >= 3
    assert all(line.lower().startswith("ok") for line in lines), result.stdout
    assert any("token" in line for line in lines)
    assert segment_requests(live_sandbox) == []
    assert_no_secrets(live_sandbox, result.stdout, result.stderr)

    env["SYNCD_WALKME_CLIENT_SECRET"] = "not-the-secret"
    result = run_cli("check", env=env)
    assert result.returncode == 1
    assert "SYNCD_WALKME_CLIENT_SECRET" in result.stdout + result.stderr
    assert "not-the-secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_status_json_parses(live_sandbox: WalkMeSandbox, tmp_path: Path) -> None:
    mappings = [
        file_mapping(tmp_path, "Synced", make_ids(42)),
        file_mapping(tmp_path, "Never", make_ids(1)),
    ]
    env = cli_env(live_sandbox.url, tmp_path, mappings)
    assert run_cli("sync", "--segment", "Synced", env=env).returncode == 0
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)
    rows = parse_status(result.stdout)
    record = live_sandbox.find(name="Synced")
    assert record is not None
    assert rows["Synced"]["members"] == 42
    assert rows["Synced"]["segment_guid"] == record.guid
    assert rows["Synced"]["last_result"] == "synced"
    assert rows["Never"].get("members", 0) == 0
    assert rows["Never"]["last_result"] == "never run"


def test_sync_against_sandbox_process(tmp_path: Path) -> None:
    """The sandbox as a separate process, inspected through GET /_sandbox/state."""
    port = free_port()
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "syncd.sandbox",
            "--port",
            str(port),
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--list-shape",
            "bare",
            "--no-create-guid",
        ],
        env=base_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def state(members: bool = False) -> dict[str, Any]:
        query = "?members=1" if members else ""
        with urllib.request.urlopen(f"{url}/_sandbox/state{query}", timeout=5) as response:  # noqa: S310
            document: dict[str, Any] = json.load(response)
            return document

    def listening() -> bool:
        try:
            state()
        except OSError:
            assert sandbox.poll() is None, sandbox.communicate()
            return False
        return True

    try:
        wait_until(listening, 20, "the sandbox process to listen")
        source = make_ids(1_234)
        env = cli_env(url, tmp_path, [file_mapping(tmp_path, "Remote", source)], batch_size=500)
        result = run_cli("sync", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        document = state(members=True)
        [segment] = document["segments"]
        assert segment["name"] == "Remote"
        assert set(segment["members"]) == set(source)
        assert document["requests"]["byKind"]["create"] == 1
        assert document["requests"]["byKind"]["update"] == 2
        assert_no_secrets(None, result.stdout, result.stderr)
    finally:
        sandbox.terminate()
        sandbox.communicate(timeout=20)


GUID = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
BAD_CONFIGS: list[tuple[str, str, dict[str, str | None]]] = [
    ("missing-secret", "sync", {"SYNCD_WALKME_CLIENT_SECRET": None}),
    ("bad-system-guid", "sync", {"SYNCD_WALKME_SYSTEM_GUID": "not-a-guid"}),
    ("segments-not-json", "sync", {"SYNCD_SEGMENTS": "[{"}),
    (
        "segment-named-twice",
        "sync",
        {
            "SYNCD_SEGMENTS": json.dumps(
                [{"name": "a", "source": {"type": "file", "path": "/x"}}] * 2
            )
        },
    ),
    ("no-segments", "check", {"SYNCD_SEGMENTS": None}),
    ("batch-too-large", "sync", {"SYNCD_BATCH_SIZE": "25001"}),
    ("bad-schedule", "run", {"SYNCD_SCHEDULE": "every tuesday"}),
    ("bad-state-url", "status", {"SYNCD_STATE_URL": "mysql://nowhere/db"}),
    (
        "secret-file-missing",
        "sync",
        {
            "SYNCD_WALKME_CLIENT_SECRET": None,
            "SYNCD_WALKME_CLIENT_SECRET_FILE": "/nonexistent/secret",
        },
    ),
    ("unknown-segment-option", "sync --segment Nope", {}),
]


@pytest.fixture
def config_folder(tmp_path: Path) -> Path:
    write_ids(tmp_path / "ids.txt", ["a@example.com"])
    return tmp_path


@pytest.mark.parametrize(
    ("command", "changes"),
    [(c, v) for _, c, v in BAD_CONFIGS],
    ids=[name for name, _, _ in BAD_CONFIGS],
)
def test_bad_config_exits_2_with_one_line(
    config_folder: Path, command: str, changes: dict[str, str | None]
) -> None:
    mapping = {"name": "Seg", "source": {"type": "file", "path": str(config_folder / "ids.txt")}}
    # No sandbox needed: nothing may reach WalkMe. An unused port makes sure of it.
    env = cli_env(f"http://127.0.0.1:{free_port()}", config_folder, [mapping])
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = run_cli(*command.split(), env=env, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert CLIENT_SECRET not in result.stderr + result.stdout
    changed = [k for k in changes if k.startswith("SYNCD_")]
    if changed and not command.startswith("sync --segment"):
        # The message names the variable to fix.
        assert any(k in lines[0] for k in changed) or "SYNCD_" in lines[0], lines[0]


def test_check_with_walkme_unreachable_fails_fast_naming_host_port_and_cause(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there: the connection is refused
    mapping = file_mapping(tmp_path, "Unreachable", ["a@example.com"])
    env = cli_env(f"http://127.0.0.1:{port}", tmp_path, [mapping], retry_max_wait=5)

    started = time.monotonic()
    result = run_cli("check", env=env)
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < 15, f"check took {elapsed:.1f}s: connection failures must not be retried"
    fail = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1, result.stdout
    assert f"127.0.0.1:{port}" in fail[0]
    assert "Connection refused" in fail[0]
    assert "retry" not in result.stderr, "check must not retry a connection that was refused"
    assert "Traceback" not in result.stdout + result.stderr


def test_a_run_that_cannot_connect_names_host_port_and_cause(tmp_path: Path) -> None:
    port = free_port()
    mapping = file_mapping(tmp_path, "Unreachable", ["a@example.com"])
    env = cli_env(f"http://127.0.0.1:{port}", tmp_path, [mapping], retry_attempts=2)

    result = run_cli("sync", env=env)

    assert result.returncode == 1, result.stdout + result.stderr
    events = parse_log_lines(result.stderr)
    retries = named(events, "walkme.retry")
    assert [e["reason"] for e in retries] == ["connection error"], retries
    assert f"127.0.0.1:{port}: Connection refused" in retries[0]["error"]
    failed = named(events, "segment.failed")
    assert len(failed) == 1, events
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in failed[0]["error"]


def test_check_with_an_unknown_system_guid_points_at_the_variable(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    mapping = file_mapping(tmp_path, "Elsewhere", ["a@example.com"])
    wrong = "0badbad0-0000-4000-8000-000000000000"
    env = cli_env(live_sandbox.url, tmp_path, [mapping], walkme_system_guid=wrong)

    result = run_cli("check", env=env)

    assert result.returncode == 1, result.stdout + result.stderr
    fail = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1, result.stdout
    assert "SYNCD_WALKME_SYSTEM_GUID" in fail[0]
    assert wrong in fail[0]


def test_a_dry_run_the_guard_would_hold_exits_3_and_status_shows_the_force_command(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    source = make_ids(400)
    mapping = file_mapping(tmp_path, "Guarded one", source)
    env = cli_env(live_sandbox.url, tmp_path, [mapping])
    assert run_cli("sync", env=env).returncode == 0
    write_ids(tmp_path / "Guarded one.txt", source[:10])
    force = "syncd sync --segment 'Guarded one' --force"

    planned = run_cli("sync", "--dry-run", env=env)
    assert planned.returncode == 3, planned.stdout + planned.stderr
    assert force in planned.stdout

    held = run_cli("sync", env=env)
    assert held.returncode == 1, held.stdout + held.stderr
    table = run_cli("status", env=env)
    assert table.returncode == 0, table.stderr
    assert force in table.stdout
    assert parse_status(run_cli("status", "--json", env=env).stdout)["Guarded one"]["hint"]

    # A plan that cannot be made is a failure, whatever else would be held.
    (tmp_path / "Guarded one.txt").unlink()
    assert run_cli("sync", "--dry-run", env=env).returncode == 1


def test_status_and_history_read_local_state_without_walkme_settings(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    mapping = file_mapping(tmp_path, "Local", make_ids(5))
    env = cli_env(live_sandbox.url, tmp_path, [mapping])
    assert run_cli("sync", env=env).returncode == 0
    for name in list(env):
        if name.startswith("SYNCD_WALKME_"):
            del env[name]
    live_sandbox.clear_requests()

    table = run_cli("status", env=env)
    assert table.returncode == 0, table.stderr
    assert "Local" in table.stdout
    assert "synced" in table.stdout
    history = run_cli("history", "--segment", "Local", env=env)
    assert history.returncode == 0, history.stderr
    header = history.stdout.splitlines()[0].split()
    assert header[:3] == ["STARTED", "ENDED", "RESULT"], history.stdout
    # Without mappings, every segment the state store knows, none called an orphan.
    del env["SYNCD_SEGMENTS"]
    document = json.loads(run_cli("status", "--json", env=env).stdout)
    assert [row["segment"] for row in document["segments"]] == ["Local"]
    assert document["orphans"] == []
    assert live_sandbox.requests == []


@pytest.mark.parametrize("state_url", [None, "sqlite:///elsewhere/syncd.db"])
def test_read_only_commands_never_create_a_state_store(
    tmp_path: Path, state_url: str | None
) -> None:
    """Run in the wrong directory (the default ``syncd.db``, or a path that is not
    there): one line naming SYNCD_STATE_URL, and no file created."""
    env = base_env()
    if state_url is not None:
        env["SYNCD_STATE_URL"] = state_url
    for argv in (["status"], ["history", "--segment", "X"], ["reset", "--segment", "X"]):
        result = run_cli(*argv, env=env, cwd=tmp_path, timeout=60)
        assert result.returncode == 2, (argv, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert "\n" not in line
        assert line.startswith("syncd: configuration error: SYNCD_STATE_URL")
        assert list(tmp_path.iterdir()) == [], f"{argv} created {list(tmp_path.iterdir())}"
