"""Segment lifecycle (issue 7): orphans, delete and prune, through the real CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from syncd.sandbox import WalkMeSandbox
from tests.integration.conftest import (
    cli_env,
    delete_segment,
    make_ids,
    parse_log_lines,
    run_cli,
    seed_segment,
    write_ids,
)


def mapping(folder: Path, name: str, ids: list[str], **extra: Any) -> dict[str, Any]:
    path = write_ids(folder / f"{name.replace(' ', '_')}.txt", ids)
    return {"name": name, "source": {"type": "file", "path": str(path)}, **extra}


def status(env: dict[str, str]) -> dict[str, Any]:
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def names_in(sandbox: WalkMeSandbox) -> set[str]:
    return {segment["name"] for segment in sandbox.state()["segments"]}


def sync_ok(env: dict[str, str]) -> str:
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_orphan_is_logged_listed_and_pruned_only_with_yes(
    live_sandbox: WalkMeSandbox, tmp_path: Path
) -> None:
    keep = mapping(tmp_path, "Keep", make_ids(30, "k"))
    drop = mapping(tmp_path, "Drop", make_ids(20, "d"))
    sync_ok(cli_env(live_sandbox.url, tmp_path, [keep, drop]))
    assert names_in(live_sandbox) == {"Keep", "Drop"}

    # "Drop" leaves the configuration: a run reports it and leaves it in WalkMe.
    env = cli_env(live_sandbox.url, tmp_path, [keep])
    events = parse_log_lines(sync_ok(env))
    orphaned = [e for e in events if e["event"] == "segment.orphaned"]
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
    adopted = mapping(tmp_path, "Adopted", make_ids(10, "a"))
    created = mapping(tmp_path, "Created", make_ids(10, "c"))
    sync_ok(cli_env(live_sandbox.url, tmp_path, [adopted, created]))
    assert live_sandbox.find(name="Adopted") is not None
    assert live_sandbox.find(name="Adopted").guid == existing  # type: ignore[union-attr]

    env = cli_env(live_sandbox.url, tmp_path, [mapping(tmp_path, "Other", ["o@x.com"])])
    sync_ok(env)
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
    one = mapping(tmp_path, "One", make_ids(5, "o"))
    env = cli_env(live_sandbox.url, tmp_path, [one])
    sync_ok(env)
    record = live_sandbox.find(name="One")
    assert record is not None

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
    sync_ok(cli_env(live_sandbox.url, tmp_path, [mapping(tmp_path, "Old", ids, external_id="e-1")]))
    old_guid = live_sandbox.find(name="Old").guid  # type: ignore[union-attr]

    env = cli_env(live_sandbox.url, tmp_path, [mapping(tmp_path, "New", ids, external_id="e-1")])
    first = run_cli("sync", env=env)
    events = parse_log_lines(first.stdout)
    renamed = [e for e in events if e["event"] == "segment.renamed"]
    assert renamed, first.stdout
    assert renamed[0]["old_segment"] == "Old"
    assert renamed[0]["old_segment_guid"] == old_guid
    assert "syncd delete --segment 'Old' --yes" in renamed[0]["hint"]
    # Never written into the old segment, which is now an orphan.
    assert live_sandbox.members(old_guid) == set(ids)
    assert [row["segment"] for row in status(env)["orphans"]] == ["Old"]

    deleted = run_cli("delete", "--segment", "Old", "--yes", env=env)
    assert deleted.returncode == 0, deleted.stderr
    sync_ok(env)
    new = live_sandbox.find(name="New")
    assert new is not None
    assert new.external_id == "e-1"
    assert live_sandbox.members(new.guid) == set(ids)
    assert names_in(live_sandbox) == {"New"}
