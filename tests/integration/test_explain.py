"""`syncd explain`: one id across the segments, against a state a real sync built."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import pytest

from syncd.sandbox import WalkMeSandbox
from tests.support.harness import Harness, HarnessFactory, assert_no_secrets, cli_env
from tests.support.processes import run_cli_async
from tests.support.stores import with_store

TOO_LONG = "x" * 150


@dataclass
class Synced:
    """The segments after one real sync, their sources changed since, and the CLI's
    environment."""

    harness: Harness
    env: dict[str, str]
    first_run: str  # the run id that delivered the first sync


@pytest.fixture
async def synced(make_harness: HarnessFactory) -> Synced:
    harness = await make_harness(rejected_ids=["poison"])
    mappings = [
        harness.mapping("Explain", ["kept", "gone", "poison"], max_remove_fraction=1.0),
        harness.mapping("Guarded", ["g1", "g2", "g3", "g4"], max_remove_fraction=0.25),
    ]
    settings = harness.settings(mappings, guard_min_members=1)
    outcomes = await harness.sync(settings)
    assert [o.result for o in outcomes] == ["synced", "synced"]
    assert harness.sandbox.members(harness.guid("Explain")) == {"kept", "gone"}
    # Since: 'gone' left the source, 'new' and a too-long id arrived, 'kept' is
    # spelt with a space; 'Guarded' lost 3 of 4 members, so its run was held.
    harness.source("Explain", [" kept", "new", TOO_LONG, "poison"])
    harness.source("Guarded", ["g1"])
    [held] = await harness.sync(settings, ["Guarded"])
    assert held.result == "held"
    first_run = ""

    async def remember(store: Any) -> None:
        nonlocal first_run
        [run] = await store.history("Explain", 10)
        first_run = run.run_id
        await store.begin_batch("Explain", "add", ["late"])  # its answer was lost

    await with_store(settings.state_url, remember)
    env = cli_env(harness.sandbox.url, harness.folder, mappings, guard_min_members=1)
    return Synced(harness, env, first_run)


async def explain(synced: Synced, *args: str) -> dict[str, Any]:
    """``syncd explain --json`` by segment name; exit 0 and no secret printed."""
    code, out, err = await run_cli_async("explain", "--json", *args, env=synced.env)
    assert code == 0, out + err
    assert_no_secrets(None, out, err)
    document = json.loads(out)
    return {row["segment"]: row for row in document["segments"]}


async def text(synced: Synced, *args: str) -> str:
    code, out, err = await run_cli_async("explain", *args, env=synced.env)
    assert code == 0, out + err
    assert "Traceback" not in err
    return out


async def test_in_source_and_snapshot(synced: Synced) -> None:
    found = await explain(synced, "--id", "kept")
    assert set(found) == {"Explain", "Guarded"}  # every segment without --segment
    row = found["Explain"]
    assert row["source"]["in_source"] is True
    assert row["source"]["originals"] == [" kept"]  # as the source holds it
    assert row["snapshot"]["delivered"] is True
    assert row["snapshot"]["run_id"] == synced.first_run
    assert row["snapshot"]["run_started_at"] is not None
    assert row["next_run"]["action"] == "nothing"
    assert found["Guarded"]["source"]["in_source"] is False
    assert found["Guarded"]["next_run"]["action"] == "nothing"
    shown = await text(synced, "--id", "kept", "--segment", "Explain")
    assert f"delivered by run {synced.first_run}, started" in shown
    assert "next run    nothing" in shown
    assert "Guarded" not in shown


async def test_in_source_only_is_added(synced: Synced) -> None:
    row = (await explain(synced, "--id", "new", "--segment", "Explain"))["Explain"]
    assert (row["source"]["in_source"], row["snapshot"]["delivered"]) == (True, False)
    assert row["next_run"]["action"] == "add"


async def test_in_snapshot_only_is_removed(synced: Synced) -> None:
    row = (await explain(synced, "--id", "gone", "--segment", "Explain"))["Explain"]
    assert (row["source"]["in_source"], row["snapshot"]["delivered"]) == (False, True)
    assert row["next_run"]["action"] == "remove"


async def test_delivered_before_the_run_was_recorded(synced: Synced) -> None:
    with sqlite3.connect(synced.harness.folder / "state.db") as conn:
        conn.execute("UPDATE members SET delivered_by = NULL WHERE id = 'kept'")
    row = (await explain(synced, "--id", "kept", "--segment", "Explain"))["Explain"]
    assert row["snapshot"] == {"delivered": True, "run_id": None, "run_started_at": None}
    shown = await text(synced, "--id", "kept", "--segment", "Explain")
    assert "delivered (before this version recorded by which run)" in shown


async def test_skipped_by_the_id_rules_says_why(synced: Synced) -> None:
    row = (await explain(synced, "--id", TOO_LONG, "--segment", "Explain"))["Explain"]
    assert row["source"]["in_source"] is False
    assert row["source"]["values_found"] == 1
    assert row["id_rules"] == "longer than 100 characters (150)"
    assert row["next_run"]["action"] == "nothing"
    shown = await text(synced, "--id", TOO_LONG, "--segment", "Explain")
    assert "skipped by the id rules: longer than 100 characters (150)" in shown


async def test_quarantined_shows_walkmes_answer(synced: Synced) -> None:
    row = (await explain(synced, "--id", "poison", "--segment", "Explain"))["Explain"]
    [entry] = row["quarantine"]
    assert entry["action"] == "add"
    assert "some userIds were rejected" in entry["walkme_answer"]
    assert row["next_run"]["action"] == "quarantined"
    assert "not sent again until its membership changes" in row["next_run"]["why"]
    shown = await text(synced, "--id", "poison", "--segment", "Explain")
    assert "add rejected by WalkMe since" in shown
    assert "some userIds were rejected" in shown


async def test_pending_batch(synced: Synced) -> None:
    row = (await explain(synced, "--id", "late", "--segment", "Explain"))["Explain"]
    assert row["pending"] == "add"
    # Sent again first (so delivered), then removed: the source does not hold it.
    assert row["next_run"]["action"] == "remove"
    assert "pending add batch holding it is sent again first" in row["next_run"]["why"]
    shown = await text(synced, "--id", "late", "--segment", "Explain")
    assert "in the add batch whose answer was lost" in shown


async def test_held_plan(synced: Synced) -> None:
    row = (await explain(synced, "--id", "g2", "--segment", "Guarded"))["Guarded"]
    assert row["last_result"] == "held"
    assert "3 of 4 members would be removed" in row["plan"]["held"]
    assert row["next_run"]["action"] == "held"
    shown = await text(synced, "--id", "g2", "--segment", "Guarded")
    assert "syncd sync --segment Guarded --force" in shown


async def test_json_shape(synced: Synced) -> None:
    code, out, _ = await run_cli_async(
        "explain", "--json", "--id", "kept", "--segment", "Explain", env=synced.env
    )
    assert code == 0
    document = json.loads(out)
    assert set(document) == {"id", "segments"}
    assert document["id"] == "kept"
    [row] = document["segments"]
    assert set(row) == {
        "segment",
        "id_rules",
        "source",
        "snapshot",
        "quarantine",
        "pending",
        "plan",
        "last_result",
        "next_run",
    }
    assert set(row["source"]) == {"describe", "error", "in_source", "values_found", "originals"}
    assert set(row["snapshot"]) == {"delivered", "run_id", "run_started_at"}
    assert set(row["plan"]) == {"mode", "held"}
    assert set(row["next_run"]) == {"action", "why"}
    assert row["plan"]["mode"] == "update"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--id", "kept", "--segment", "Nope"], "--segment 'Nope': no such segment"),
        (["--id", "  "], "--id: empty"),
    ],
)
async def test_bad_values_exit_2_in_one_line(synced: Synced, args: list[str], named: str) -> None:
    code, out, err = await run_cli_async("explain", *args, env=synced.env)
    assert code == 2, out + err
    assert out == ""
    [line] = err.strip().splitlines()
    assert named in line


async def test_nothing_sent_or_written(synced: Synced) -> None:
    sandbox: WalkMeSandbox = synced.harness.sandbox
    sandbox.clear_requests()
    files = sorted(synced.harness.folder.glob("state.db*"))  # with a WAL, if any
    before = [path.read_bytes() for path in files]
    await explain(synced, "--id", "new")
    assert list(sandbox.requests) == []
    assert sorted(synced.harness.folder.glob("state.db*")) == files
    assert [path.read_bytes() for path in files] == before


async def test_an_id_is_explained_after_the_mappings_transform(
    make_harness: HarnessFactory,
) -> None:
    """The id asked about is the one WalkMe holds (after the transform); the source's
    own spellings of it are shown, and a value the transform drops is not it."""
    harness = await make_harness()
    mappings = [
        harness.mapping(
            "Lowered",
            ["Ann@X.com", "ANN@x.COM", "heap|bob@x.com"],
            transform=["lower", "strip_prefix:heap|"],
        )
    ]
    settings = harness.settings(mappings)
    [outcome] = await harness.sync(settings)
    assert outcome.result == "synced"
    assert harness.sandbox.members(harness.guid("Lowered")) == {"ann@x.com", "bob@x.com"}
    env = cli_env(harness.sandbox.url, harness.folder, mappings)
    code, out, err = await run_cli_async("explain", "--json", "--id", "ann@x.com", env=env)
    assert code == 0, out + err
    [row] = json.loads(out)["segments"]
    assert row["source"]["in_source"] is True
    assert row["source"]["originals"] == ["Ann@X.com", "ANN@x.COM"]
    assert row["snapshot"]["delivered"] is True
    assert row["next_run"]["action"] == "nothing"
    code, out, err = await run_cli_async("explain", "--json", "--id", "Ann@X.com", env=env)
    assert code == 0, out + err
    [row] = json.loads(out)["segments"]
    assert row["source"]["in_source"] is False  # no source value becomes this id
