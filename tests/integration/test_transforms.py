"""A mapping's id transform end to end: `syncd sync` subprocesses against the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from syncd.sandbox import WalkMeSandbox
from tests.support.harness import cli_env, parse_status, segment_requests
from tests.support.ids import file_mapping, make_ids, write_ids
from tests.support.logs import parse_log_lines, run_endings
from tests.support.processes import run_cli


def sync(env: dict[str, str], *args: str, expect: int = 0) -> list[dict[str, Any]]:
    """`syncd sync ARGS`: its log lines (stderr), after checking its exit status."""
    result = run_cli("sync", *args, env=env)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return parse_log_lines(result.stderr)


def ending(events: list[dict[str, Any]], segment: str) -> dict[str, Any]:
    [line] = [e for e in run_endings(events).values() if e["segment"] == segment]
    return line


def named(events: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == event]


def test_transformed_ids_are_sent_once_counted_and_shown_by_a_dry_run(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    emails = file_mapping(
        tmp_path,
        "Emails",
        # Two spellings of Alice become one; Bob has no prefix to strip.
        ["User-Alice@Example.COM", "user-alice@example.com", "  USER-Carol@x.io ", "bob@x.io"],
        transform=["lower", "strip_prefix:user-"],
    )
    numbers = file_mapping(
        tmp_path,
        "Numbers",
        ["crm-1", "2", "crm-x3", "crm-1", "crm-" + "9" * 101, "4"],
        transform=[r"regex:(?:crm-)?(\d+)"],
    )
    env = cli_env(live_sandbox.url, tmp_path, [emails, numbers])

    planned = run_cli("sync", "--dry-run", env=env)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    lines = planned.stdout.splitlines()
    assert (
        "  transform  e.g. 'User-Alice@Example.COM' -> 'alice@example.com',"
        " 'user-alice@example.com' -> 'alice@example.com', 'USER-Carol@x.io' -> 'carol@x.io'"
    ) in lines
    assert "  transform  e.g. 'crm-1' -> '1', '2' -> '2', 'crm-x3': skipped, does not" in (
        planned.stdout
    )
    assert any(line.split()[:2] == ["collapsed", "1"] for line in lines), planned.stdout
    assert "Emails: create the WalkMe segment; source has 3 ids" in lines
    assert segment_requests(live_sandbox) == []  # a dry run contacts nothing

    events = sync(env)
    emails_guid = live_sandbox.find(name="Emails").guid  # type: ignore[union-attr]
    assert live_sandbox.members(emails_guid) == {"alice@example.com", "carol@x.io", "bob@x.io"}
    line = ending(events, "Emails")
    assert (line["added"], line["collapsed"], line["skipped"]) == (3, 1, 0)
    # One create each, its ids each once (Alice, the collapsed "crm-1").
    assert [(r.kind, r.n_ids) for r in segment_requests(live_sandbox)] == [("create", 3)] * 2
    # The regex keeps its group; ids it does not take are skipped and counted, like the
    # over-long one (its group has 101 digits: the id rules come after the transform).
    numbers_guid = live_sandbox.find(name="Numbers").guid  # type: ignore[union-attr]
    assert live_sandbox.members(numbers_guid) == {"1", "2", "4"}
    line = ending(events, "Numbers")
    assert (line["added"], line["collapsed"], line["skipped"]) == (3, 1, 2)
    rows = parse_status(run_cli("status", "--json", env=env).stdout)
    assert (rows["Numbers"]["skipped"], rows["Numbers"]["collapsed"]) == (2, 1)
    reasons = rows["Numbers"]["skipped_examples"]
    assert reasons[0] == r"""'crm-x3': does not match the transform's regex '(?:crm-)?(\\d+)'"""
    assert "longer than 100 characters (101)" in reasons[1]
    assert not named(events, "segment.transform_changed")  # new segments: nothing changed
    # Unchanged bytes, unchanged steps: nothing read, the counts are the last run's.
    line = ending(sync(env), "Emails")
    assert (line["unchanged"], line["collapsed"]) == (True, 1)


def test_a_changed_transform_sends_the_difference_within_the_removal_guard(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    """The same bytes read through other steps: the fingerprint shortcut must not skip
    them, and the difference goes out like any membership change."""
    lower = make_ids(180)
    mixed = [member.capitalize() for member in make_ids(20, start=180)]
    path = write_ids(tmp_path / "people.txt", lower + mixed)
    mapping: dict[str, Any] = {"name": "People", "source": {"type": "file", "path": str(path)}}
    env = cli_env(live_sandbox.url, tmp_path, [mapping])
    sync(env)
    guid = live_sandbox.find(name="People").guid  # type: ignore[union-attr]
    assert ending(sync(env), "People")["unchanged"] is True

    lowered = cli_env(live_sandbox.url, tmp_path, [{**mapping, "transform": ["lower"]}])
    planned = run_cli("sync", "--dry-run", env=lowered)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "transform changed since the last sync (was [])" in planned.stdout
    live_sandbox.clear_requests()
    events = sync(lowered)
    [changed] = named(events, "segment.transform_changed")
    assert (changed["segment"], changed["old_transform"], changed["transform"]) == (
        "People",
        [],
        ["lower"],
    )
    line = ending(events, "People")
    assert (line["unchanged"], line["added"], line["removed"]) == (False, 20, 20)
    assert [(r.action, r.n_ids) for r in segment_requests(live_sandbox)] == [
        ("remove", 20),
        ("add", 20),
    ]
    assert live_sandbox.members(guid) == {member.lower() for member in lower + mixed}
    # Done: the next run is the shortcut again, and says nothing of the transform.
    again = sync(lowered)
    assert ending(again, "People")["unchanged"] is True
    assert not named(again, "segment.transform_changed")

    # Every id changes: the removal guard holds it, and says so, until forced.
    upper = cli_env(live_sandbox.url, tmp_path, [{**mapping, "transform": ["upper"]}])
    live_sandbox.clear_requests()
    held = sync(upper, expect=1)
    assert ending(held, "People")["event"] == "segment.held"
    assert named(held, "segment.transform_changed")[0]["old_transform"] == ["lower"]
    assert segment_requests(live_sandbox) == []
    # Held, the snapshot still follows the old steps: the next run says it again.
    assert named(sync(upper, expect=1), "segment.transform_changed")
    forced = sync(upper, "--segment", "People", "--force")
    line = ending(forced, "People")
    assert (line["event"], line["added"], line["removed"]) == ("segment.synced", 200, 200)
    assert live_sandbox.members(guid) == {member.upper() for member in lower + mixed}
